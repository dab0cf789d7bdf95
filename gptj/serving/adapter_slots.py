"""LoRA adapters loaded and unloaded while the server runs, on every rank's engine thread.

The commands arrive through the engine loop's inbox like requests do, so every
tensor-parallel rank changes its adapters between the same two steps (each rank reading its
own shards). A load happens at once. An unload waits until no queued or running request
uses the adapter (the server stops sending new ones at once), then frees its factors.

`limit` bounds how many adapters are held at a time, those still finishing requests included.
"""

from __future__ import annotations

from gptj.errors import GPTJError


class AdapterChangeError(GPTJError):
    """A refused load or unload; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def adapter_limit(config) -> int:
    """How many adapters a server holds at most: --max-adapters, else as many as it started with."""
    limit = config.server.max_adapters
    return len(config.model.adapters) if limit is None else limit


class AdapterSlots:
    def __init__(self, engine, ctx=None, limit: int = 0):
        self.engine, self.ctx, self.limit = engine, ctx, limit
        self.draining: dict[str, str] = {}  # adapter name -> the unload job waiting for it

    @property
    def held(self) -> list[str]:
        return list(self.engine.adapters.names) if self.engine.adapters is not None else []

    def load(self, name: str, path: str) -> dict:
        """Read and stack adapter `name` from PEFT directory `path`: {"loaded": name} or the error."""
        from gptj.execution.runtime.preflight import InputError
        from gptj.execution.runtime.run_dirs import resolve_adapter_dir
        from gptj.model.multi_lora import read_adapter

        held = self.held
        if name in held:
            still = " (it is finishing its requests before it unloads)" if name in self.draining else ""
            return AdapterChangeError(400, f"adapter {name!r} is already loaded{still}")
        if len(held) >= self.limit:
            return AdapterChangeError(400, f"the server holds {len(held)} adapters, its limit "
                                           f"(--max-adapters {self.limit}): unload one first or start the "
                                           f"server with a larger --max-adapters")
        try:
            directory = resolve_adapter_dir(path, "lora_path")  # an adapter or a LoRA run's directory
            self.engine.add_adapter(name, read_adapter(name, directory, self.engine.model, self.ctx))
        except (InputError, ValueError, OSError) as err:  # AdapterError and LoraConfigError are ValueErrors
            return AdapterChangeError(400, str(err))
        return {"loaded": name}

    def unload(self, name: str, job_id: str) -> AdapterChangeError | None:
        """Start unloading `name` (finished by `settle`); the error when it is not held."""
        if name not in self.held or name in self.draining:
            return AdapterChangeError(404, f"adapter {name!r} is not loaded "
                                           f"(loaded: {', '.join(self.held) or 'none'})")
        self.draining[name] = job_id
        return None

    def settle(self) -> dict:
        """Unload every draining adapter no request uses any more: {job id: {"unloaded": name}}."""
        done = {}
        for name, job_id in list(self.draining.items()):
            if not self.engine.adapter_in_use(name):
                self.engine.remove_adapter(name)
                del self.draining[name]
                done[job_id] = {"unloaded": name}
        return done
