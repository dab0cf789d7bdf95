"""Hugging Face checkpoints in and out.

Loading reads only this rank's slices from safetensors, with plain reads into tensors the
model keeps (gptj/model/tensor_files.py: never a memory mapping, whose touched pages would count as
resident beside the model), so no rank materialises the full model and a load holds the model
plus the tensor in hand. Legacy `.bin` files are opened with
`torch.load(weights_only=True, mmap=True)`: never unpickled as code, and paged in lazily.
Export gathers each tensor across the tensor-parallel group and writes, from rank 0, a
directory that `transformers.GPTJForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptj.errors import GPTJError

from .config import ConfigError, ModelConfig
from .json_files import read_json
from .model import GPTJ
from .packed_linear import float_weights
from .parallel import ParallelContext
from .quantized_linear import QuantSpec
from .sharding import gather_to_hf, hf_shapes, shard_rules

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(GPTJError, ValueError):
    """A checkpoint that does not hold the GPT-J this config describes."""


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub id, downloaded (safetensors preferred)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json")
    text = str(name_or_path)
    if text.startswith((".", "/")) or text.count("/") > 1:
        raise CheckpointError(f"checkpoint directory {text} does not exist")
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError as err:  # pragma: no cover - transformers depends on it
        raise CheckpointError(f"{text} is not a local directory and huggingface_hub is missing") from err
    try:
        files = list_repo_files(text)
    except Exception as err:
        raise CheckpointError(
            f"{text} is neither a local directory nor a reachable Hugging Face Hub model ({err})"
        ) from err
    weights = ["*.safetensors", SAFE_INDEX] if any(f.endswith(".safetensors") for f in files) else ["*.bin", BIN_INDEX]
    patterns = ["config.json", "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", *weights]
    return Path(snapshot_download(text, allow_patterns=patterns))


CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory's config.json says: the model's shape and, for a checkpoint
    written quantized, its quantization (None: float weights)."""

    directory: Path
    config: ModelConfig
    quantization: QuantSpec | None = None


def read_config_json(directory: Path) -> dict:
    """The values of `directory`/config.json: the one place that file is read."""
    config_file = Path(directory) / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face model directory")
    values = read_json(config_file, CheckpointError)
    if not isinstance(values, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(values).__name__}")
    return values


def read_checkpoint_info(directory: Path) -> CheckpointInfo:
    """The model config and stored quantization of a checkpoint directory, from one read."""
    directory = Path(directory)
    values = read_config_json(directory)
    try:
        config = ModelConfig.from_hf(values)
    except ConfigError as err:
        raise CheckpointError(f"{directory}: {err}") from err
    quantization = values.get("quantization")
    if quantization is not None:
        try:
            quantization = QuantSpec.from_dict(quantization)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{directory / CONFIG_FILE}: bad quantization section {quantization}: {err}") from err
    return CheckpointInfo(directory, config, quantization)


def read_quantization(directory: Path) -> QuantSpec | None:
    """The `quantization` section of a checkpoint's config.json (None: float weights)."""
    return read_checkpoint_info(directory).quantization


def read_model_config(directory: Path) -> ModelConfig:
    return read_checkpoint_info(directory).config


def read_weight_map(directory: Path) -> dict[str, Path] | None:
    """{tensor name: file} from a sharded checkpoint's index (safetensors or .bin), or None
    when the directory has no index: the one parser of those files."""
    directory = Path(directory)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            values = read_json(index, CheckpointError)
            weight_map = values.get("weight_map") if isinstance(values, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no \"weight_map\" object naming each tensor's file")
            return {name: directory / file for name, file in weight_map.items()}
    return None


class CheckpointReader:
    """Reads slices of named HF tensors from safetensors (or legacy .bin) files.

    Every read is recorded in `self.requests` as (name, dim, start, stop) so tests and users
    can see exactly which bytes a rank asked for.
    """

    def __init__(self, directory: Path, config: ModelConfig, expected: dict[str, tuple[int, ...]] | None = None):
        self.directory = directory
        self.expected = expected if expected is not None else hf_shapes(config)
        self.requests: list[tuple[str, int | None, int, int]] = []
        self._open: dict[Path, Any] = {}
        self._files: dict[str, Path] = self._index()

    def _index(self) -> dict[str, Path]:
        d = self.directory
        indexed = read_weight_map(d)
        if indexed is not None:
            return indexed
        files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
        if not files:
            raise CheckpointError(f"{d} holds no *.safetensors or *.bin weight files")
        names = {}
        for file in files:
            for name in self._handle(file).keys():  # noqa: SIM118 - safe_open is not iterable
                names[name] = file
        return names

    def _handle(self, file: Path):
        if file not in self._open:
            if file.suffix == ".safetensors":
                from .tensor_files import SafetensorsFile, TensorFileError

                try:
                    self._open[file] = SafetensorsFile(file)
                except (OSError, TensorFileError) as err:
                    raise CheckpointError(f"cannot read {file}: {err}") from err
            else:
                self._open[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self._files[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return handle.shape(name)

    def check(self) -> None:
        """Every expected tensor is present with its expected shape."""
        missing = [n for n in self.expected if n not in self._files]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(
                f"checkpoint {self.directory} is missing tensor {', '.join(missing[:3])}{more}"
            )
        for name, want in self.expected.items():
            found = self.shape(name)
            if found != want:
                raise CheckpointError(
                    f"checkpoint {self.directory}: tensor {name} has shape {found}, expected {want}"
                )

    def __call__(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        self.requests.append((name, dim, start, stop))
        handle = self._handle(self._files[name])
        if isinstance(handle, dict):  # .bin: an mmap-backed tensor, sliced before copying
            full = handle[name]
            return full.clone() if dim is None else full.narrow(dim, start, stop - start).clone()
        if dim is None:
            return handle.read(name)
        if dim == 0:
            return handle.read(name, rows=(start, stop))
        # Columns: the whole tensor is the one temporary (tensor-parallel loads only).
        return handle.read(name).narrow(dim, start, stop - start).contiguous()


def load_pretrained(
    name_or_path: str | os.PathLike,
    ctx: ParallelContext | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    quantize: QuantSpec | None = None,
    kernels: bool = False,
    info: CheckpointInfo | None = None,
) -> tuple[GPTJ, CheckpointReader]:
    """A GPTJ holding this rank's shard of a Hugging Face checkpoint.

    quantize: quantize the projections while loading, one tensor at a time (gptj/model/quantized_model.py).
    A checkpoint written by `gptj-quantize` loads quantized as stored; asking
    for a different quantization of it is an error. kernels: build the quantized layers'
    kernel operands while loading (inference), not on the first call. info: the directory's
    config.json as already read (read_checkpoint_info), so it is not read again.
    """
    from .quantized_model import load_quantized_from_reader, quantize_from_reader, quantized_hf_shapes

    if info is None:
        info = read_checkpoint_info(resolve_checkpoint(name_or_path))
    directory, config, stored = info.directory, info.config, info.quantization
    if stored is not None:
        if quantize is not None and quantize != stored:
            raise CheckpointError(
                f"{directory} is already quantized ({stored.to_dict()}); it cannot be loaded as "
                f"{quantize.to_dict()}: quantize the float checkpoint instead"
            )
        reader = CheckpointReader(directory, config, expected=quantized_hf_shapes(config, stored))
        reader.check()
        return load_quantized_from_reader(config, ctx, dtype, device, stored, reader, kernels), reader
    reader = CheckpointReader(directory, config)
    reader.check()
    if quantize is not None:
        return quantize_from_reader(config, ctx, dtype, device, quantize, reader, kernels), reader
    model = GPTJ(config, ctx, dtype=dtype, device=device)
    model.load_shards(reader)
    return model, reader


def gather_hf_tensors(model: GPTJ, grads: bool = False) -> dict[str, torch.Tensor]:
    """All parameters (or their gradients) as full HF-named tensors, on every TP rank.

    Collective over the TP group. Meant for small models and tests; export streams instead.
    """
    params = float_weights(model)  # packed projections (packed_linear.py) as plain weights
    out = {}
    for name in shard_rules(model.config):
        tensor = params[name].grad if grads else params[name].detach()
        if tensor is None:
            raise ValueError(f"parameter {name} has no gradient")
        out.update(gather_to_hf(name, tensor, model.config, model.ctx))
    return out


class ShardedSafetensorsWriter:
    """Writes named tensors into `directory` as safetensors shards of about `max_shard_bytes`.

    Tensors are flushed to a shard file whenever the pending bytes reach the limit, so a
    caller that adds them one at a time never holds the whole model. `close()` names a single
    shard `model.safetensors`, or writes the index for several.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to("cpu").contiguous()
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        from .tensor_files import save_file

        if self.pending:
            file = f"model-{len(self.shard_files) + 1:05d}.safetensors"
            save_file(self.pending, str(self.directory / file), metadata={"format": "pt"})
            self.shard_files.append(file)
            self.weight_map.update(dict.fromkeys(self.pending, file))
            self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shard_files) == 1:
            (self.directory / self.shard_files[0]).rename(self.directory / "model.safetensors")
        else:
            index = {"metadata": {}, "weight_map": self.weight_map}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def replace_directory(tmp: Path, out_dir: Path) -> None:
    """Move a completely written `tmp` into place as `out_dir` (the old one removed after)."""
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(
    model: GPTJ,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    extra: Callable[[Path], None] | None = None,
) -> Path | None:
    """Write config.json + safetensors shards to out_dir, atomically; collective over TP.

    Only replica 0 / TP rank 0 writes. Tensors are gathered one at a time and flushed to a
    shard file whenever `max_shard_bytes` is reached, so the full model is never held in
    memory at once. `extra(tmp_dir)` may add files (e.g. the tokenizer) before the rename.
    """
    if model.quantization is not None:
        raise ValueError("a quantized model cannot be exported as float Hugging Face weights; "
                         "export the float model, or write a quantized checkpoint with gptj-quantize")
    ctx = model.ctx
    writes = ctx.rank == 0
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if writes:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    params = float_weights(model)  # packed projections (packed_linear.py) as plain weights
    writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
    for name in shard_rules(model.config):
        if ctx.replica_rank != 0:
            continue  # replicas hold identical weights; replica 0 exports
        full = gather_to_hf(name, params[name].detach(), model.config, ctx)
        if not writes:
            continue
        for hf_name, tensor in full.items():
            writer.add(hf_name, tensor.to(dtype or tensor.dtype))
    if not writes:
        return None
    writer.close()
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if extra is not None:
        extra(tmp)
    replace_directory(tmp, out_dir)
    return out_dir
