"""Load once, call many times: text generation and MNLI-style entailment by label likelihood
(MNLI's instance of gptj/execution/inference/classification.py, which classifies with any task).

    from gptj.execution.inference.pipelines import TextGenerationPipeline, EntailmentPipeline
    generator = TextGenerationPipeline.from_pretrained("EleutherAI/gpt-j-6b", precision="bf16")
    small = TextGenerationPipeline.from_pretrained("EleutherAI/gpt-j-6b", quantize="int4", group_size=128)
    generator("The capital of France is", max_new_tokens=8)           # -> str
    nli = EntailmentPipeline.from_pretrained("runs/mnli")              # run_finetuning.py output
    nli("A man plays a guitar.", "A person makes music.")              # -> {"label", "scores"}

`model_dir_or_id` is a Hugging Face directory or Hub id, the output directory of
run_finetuning.py (its `hf/` export, which includes the tokenizer, is used), or
`random:PRESET` for a seeded random model of a gptj.ModelConfig preset (offline tests/demos).
`adapter=DIR` adds a PEFT LoRA adapter directory (e.g. run_finetuning.py's OUTPUT_DIR/adapter).
`adapters={"mnli": DIR, ...}` holds several over the unmerged base (gptj/model/multi_lora.py) and a
call's `adapter="mnli"` chooses one (None: the base):

    tasks = TextGenerationPipeline.from_pretrained("runs/base", adapters={"mnli": "a/", "sst2": "b/"})
    tasks("review: great film. sentiment:", adapter="sst2")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gptj.errors import UsageError
from gptj.execution.inference.classification import ClassificationPipeline, check_trained_task
from gptj.execution.inference.generation import GenerationEngine, GenerationStats
from gptj.execution.inference.sampling import SamplingParams
from gptj.execution.runtime.precision import parse_dtype, pick_device
from gptj.execution.runtime.preflight import resolve_model_source
from gptj.model import GPTJ, ParallelContext


def resolve_model_dir(name_or_path: str) -> str:
    """A run_finetuning.py output dir becomes its hf/ export; a Hub id is returned as is; a local
    path that holds no model is a ValueError naming the problem."""
    return resolve_model_source(name_or_path, option="model")


def load_model_and_tokenizer(
    name_or_path: str,
    tokenizer: str | None = None,
    precision: str = "auto",
    device: str | torch.device | None = None,
    ctx: ParallelContext | None = None,
    offload_weights: bool = False,
    init_seed: int = 0,
    quantize: str | None = None,
    group_size: int = 128,
    *,
    adapter: str | None = None,
    pack_weights: bool = True,
):
    """(GPTJ in eval mode, data.Tokenizer). Raises ValueError subclasses with a clear message.

    precision "auto": the fastest dtype this device runs natively for the model's size
    (gptj.execution.runtime.defaults.resolve_precision); a dtype without native kernels here is used as
    asked, after one warning line on stderr.

    quantize: "int8" / "int4" (with `group_size`) quantizes the projections while loading,
    tensor by tensor and per tensor-parallel rank (gptj/model/quantized_model.py); a checkpoint written by
    `gptj-quantize` loads quantized without it.

    `adapter`: a PEFT LoRA adapter directory for this base model. On plain weights it is merged
    into them, so generation costs exactly what the base model's does; on quantized weights it
    stays attached beside them (the quantized base plus the adapters, as trained with LoRA on a
    quantized base).

    `pack_weights`: float projections in oneDNN's layout where that is faster on this CPU
    (gptj/model/packed_linear.py): for inference only (`unpack_projections` to train or save).
    """
    from gptj.execution.runtime.model_files import model_file_errors

    with model_file_errors(name_or_path, adapter):  # a cut weight file: one line naming it
        return _load_model_and_tokenizer(name_or_path, tokenizer, precision, device, ctx, offload_weights,
                                         init_seed, quantize, group_size, adapter, pack_weights)


def _load_model_and_tokenizer(name_or_path, tokenizer, precision, device, ctx, offload_weights, init_seed,
                              quantize, group_size, adapter, pack_weights):
    from gptj.execution.runtime.memory_fit import check_model
    from gptj.execution.runtime.model_loading import load_model
    from gptj.model.quantized_linear import QuantSpec

    # The weights in their final form must fit the memory there is, before any is read or built.
    check_model(name_or_path, precision=precision, quantize=quantize, group_size=group_size,
                device=pick_device(device), tensor_parallel=ctx.tensor_parallel if ctx is not None else 1,
                offload_weights=offload_weights)
    loaded = load_model(name_or_path, ctx, device=pick_device(device), precision=precision,
                        quantize=QuantSpec.parse(quantize, group_size), adapters=adapter or None,
                        offload=offload_weights, init_seed=init_seed, tokenizer=tokenizer,
                        load_tokenizer=True, pack_weights=pack_weights)
    if loaded.streamer is not None:
        # Streaming hooks stay attached for the model's lifetime (it holds the streamer).
        loaded.model.weight_streamer = loaded.streamer
    return loaded.model, loaded.tokenizer


def kv_cache_dtype_of(name: str) -> torch.dtype | None:
    """"auto" -> None (gptj/model/kv_cache.py decides: fp32 for bf16/fp16 models on CPU), else the dtype."""
    return None if name == "auto" else parse_dtype(name)


def fit_prompts(encoded: list[list[int]], context: int, max_new_tokens: int = 1,
                truncate: bool = False) -> list[list[int]]:
    """Check prompt lengths against the context. A prompt with no room to generate is an error;
    with `truncate`, a prompt longer than context - max_new_tokens keeps its last that many
    tokens (at least one), so the requested new tokens fit."""
    keep = max(1, context - max_new_tokens)
    for i, ids in enumerate(encoded):
        if not ids:
            raise UsageError(f"prompt {i} is empty")
        if truncate and len(ids) > keep:
            encoded[i] = ids[len(ids) - keep :]
        elif len(ids) >= context:
            raise UsageError(
                f"prompt {i} has {len(ids)} tokens but the model context is {context}; "
                "shorten it, or keep its last tokens with --truncate-prompts (truncate_prompts=True)"
            )
    return encoded


def trim_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string in it."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@dataclass
class GeneratedText:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds from the start of the run (queue wait included)
    total_seconds: float = 0.0  # seconds from the start of the run to this prompt's end

    def timings(self) -> dict:
        """This prompt's own figures (generated_tokens counts the text's tokens, EOS excluded)."""
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": len(self.token_ids),
                "time_to_first_token_s": round(self.time_to_first_token, 6),
                "total_s": round(self.total_seconds, 6)}


def attach_named_adapters(model, adapters: dict[str, str] | None, ctx=None):
    """A gptj.model.multi_lora.MultiLoRA of the named PEFT directories attached to `model`, or None."""
    if not adapters:
        return None
    from gptj.model.multi_lora import load_adapters

    return load_adapters(adapters, model, ctx)


def using_adapter(adapters, name: str | None):
    """A context in which the model runs adapter `name` (None: the base); a ValueError naming
    an adapter that is not held."""
    if adapters is None:
        if name is not None:
            raise UsageError(f"adapter {name!r} is not loaded: this pipeline holds no adapters "
                             "(from_pretrained(..., adapters={name: DIR}))")
        return contextlib.nullcontext()
    try:
        adapters.index(name)
    except KeyError as err:
        raise UsageError(err.args[0]) from None
    return adapters.use(name)


class TextGenerationPipeline:
    def __init__(self, model: GPTJ, tokenizer, batch_size: int = 16, compile_decode: bool = False,
                 kv_cache_dtype: str = "auto", adapters=None):
        if adapters is not None and compile_decode:
            raise UsageError("a compiled decode step does not take LoRA adapters chosen per call: "
                             "drop compile_decode")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.adapters = adapters  # gptj.model.multi_lora.MultiLoRA: `adapter=` of a call chooses one
        self.engine = GenerationEngine(model, compile_decode=compile_decode,
                                       cache_dtype=kv_cache_dtype_of(kv_cache_dtype))

    @classmethod
    def from_pretrained(
        cls, model_dir_or_id: str, tokenizer: str | None = None, precision: str = "auto",
        device: str | None = None, ctx: ParallelContext | None = None, offload_weights: bool = False,
        compile_decode: bool = False, batch_size: int = 16, init_seed: int = 0,
        quantize: str | None = None, group_size: int = 128, adapter: str | None = None,
        kv_cache_dtype: str = "auto", adapters: dict[str, str] | None = None,
    ) -> TextGenerationPipeline:
        model, tok = load_model_and_tokenizer(
            model_dir_or_id, tokenizer, precision, device, ctx, offload_weights, init_seed,
            quantize=quantize, group_size=group_size, adapter=adapter,
            pack_weights=not compile_decode,  # a compiled decode step traces plain weights
        )
        return cls(model, tok, batch_size=batch_size, compile_decode=compile_decode, kv_cache_dtype=kv_cache_dtype,
                   adapters=attach_named_adapters(model, adapters, ctx))

    @property
    def stats(self) -> GenerationStats:
        return self.engine.stats

    def encode_prompts(self, prompts: list[str], truncate: bool = False,
                       max_new_tokens: int = 1) -> list[list[int]]:
        """Token ids per prompt; see fit_prompts for too-long prompts."""
        encoded = self.tokenizer.encode(prompts)
        return fit_prompts(encoded, self.model.config.max_positions, max_new_tokens, truncate)

    def generate(
        self, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, stop: list[str] | None = None, batch_size: int | None = None,
        truncate_prompts: bool = False, on_token=None, on_finish=None, adapter: str | None = None,
        prompt_ids: list[list[int]] | None = None,
    ) -> list[GeneratedText]:
        """on_token(prompt_index, token) as tokens come; on_finish(prompt_index, GeneratedText)
        as each prompt is done. adapter: one of the pipeline's named adapters (None: the base).
        prompt_ids: the prompts already tokenized and fitted (encode_prompts), not encoded again."""
        with using_adapter(self.adapters, adapter):
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, batch_size,
                                  truncate_prompts, on_token, on_finish, prompt_ids)

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, batch_size,
                  truncate_prompts, on_token, on_finish, prompt_ids=None) -> list[GeneratedText]:
        ids = prompt_ids if prompt_ids is not None else self.encode_prompts(prompts, truncate_prompts, max_new_tokens)
        stop = [s for s in (stop or []) if s]

        def as_text(index, result) -> GeneratedText:
            text = self.tokenizer.decode(result.token_ids)
            if result.finish_reason == "stop":
                text = trim_at_stop(text, stop)
            return GeneratedText(prompts[index], text, result.token_ids, result.finish_reason,
                                 result.prompt_length, result.time_to_first_token, result.total_seconds)

        results = self.engine.run(
            ids, max_new_tokens, self.tokenizer.eos_id,
            SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), seed=seed,
            batch_size=batch_size or self.batch_size, stop_strings=stop, decode=self.tokenizer.decode,
            on_token=on_token,
            on_finish=None if on_finish is None else (lambda i, r: on_finish(i, as_text(i, r))),
        )
        return [as_text(i, result) for i, result in enumerate(results)]

    def __call__(
        self, prompts: str | list[str], max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, stop: list[str] | None = None, batch_size: int | None = None,
        truncate_prompts: bool = False, adapter: str | None = None, stream: bool = False,
    ):
        """Generated text (without the prompt) for one prompt, or a list for a list.

        stream=True: an iterator of text pieces as they are generated instead, for one prompt
        (str pieces) or a list ((prompt index, piece) pairs); a prompt's pieces join to the text
        the same call without streaming returns (stop strings included: text that may still turn
        out to start one is held back until it does not)."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, stop=stop, batch_size=batch_size, truncate_prompts=truncate_prompts,
                       adapter=adapter)
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if stream:
            pieces = self._stream(prompts, options)
            return (piece for _, piece in pieces) if single else pieces
        texts = [g.text for g in self.generate(prompts, **options)]
        return texts[0] if single else texts

    def stream(self, prompt: str, **options):
        """The text pieces of one prompt's continuation as they come: self(prompt, stream=True, ...)."""
        return self(prompt, stream=True, **options)

    def _stream(self, prompts: list[str], options: dict):
        """(prompt index, text piece) pairs as tokens come: generation runs in a worker thread
        and hands its tokens over a queue; closing the iterator early stops it."""
        import queue
        import threading

        incomplete = "\ufffd"  # a character cut in the middle: wait for its other bytes
        stops = [s for s in options["stop"] or [] if s]
        hold = max(map(len, stops), default=1) - 1  # the start of a stop string the next token may complete
        events, stopped, finished = queue.Queue(), threading.Event(), object()

        class Stopped(Exception):
            pass

        def on_token(index, token):
            if stopped.is_set():
                raise Stopped
            events.put((index, token))

        def work():
            try:
                events.put((finished, self.generate(prompts, on_token=on_token, **options)))
            except BaseException as err:  # noqa: BLE001 - raised again by the reader
                events.put((finished, err))

        worker = threading.Thread(target=work, name="text-generation-stream", daemon=True)
        worker.start()
        tokens, sent = [[] for _ in prompts], [0] * len(prompts)
        try:
            while True:
                index, item = events.get()
                if index is finished:
                    if isinstance(item, Stopped):
                        return
                    if isinstance(item, BaseException):
                        raise item
                    for i, generated in enumerate(item):  # the rest, cut at the first stop string
                        if len(generated.text) > sent[i]:
                            yield i, generated.text[sent[i]:]
                    return
                tokens[index].append(item)
                text = self.tokenizer.decode(tokens[index])
                safe = min(len(text) - hold, len(trim_at_stop(text, stops)))
                while safe > sent[index] and text[safe - 1] == incomplete:
                    safe -= 1
                if safe > sent[index]:
                    yield index, text[sent[index]:safe]
                    sent[index] = safe
        finally:
            stopped.set()
            worker.join()


class EntailmentPipeline(ClassificationPipeline):
    """MNLI's classification pipeline (gptj/execution/inference/classification.py) called with
    (premise, hypothesis): the label, and "scores", the labels' probabilities (as
    "probabilities"; "log_likelihoods" beside them). `task` may name another task with premise
    and hypothesis fields."""

    def __init__(self, model: GPTJ, tokenizer, task: str = "mnli", batch_size: int = 8, adapters=None,
                 prefix_cache=True):
        super().__init__(model, tokenizer, task=task, batch_size=batch_size, adapters=adapters,
                         prefix_cache=prefix_cache)

    @classmethod
    def from_pretrained(
        cls, model_dir_or_id: str, tokenizer: str | None = None, precision: str = "auto",
        device: str | None = None, ctx: ParallelContext | None = None, task: str | None = None, init_seed: int = 0,
        quantize: str | None = None, group_size: int = 128, adapter: str | None = None,
        adapters: dict[str, str] | None = None,
    ) -> EntailmentPipeline:
        """task None: MNLI, refused for a run fine-tuned on another task (name the task to
        classify with MNLI's labels anyway)."""
        if task is None:
            check_trained_task(model_dir_or_id, "mnli")
        model, tok = load_model_and_tokenizer(model_dir_or_id, tokenizer, precision, device, ctx, False, init_seed,
                                              quantize=quantize, group_size=group_size, adapter=adapter)
        return cls(model, tok, task=task or "mnli", adapters=attach_named_adapters(model, adapters, ctx))

    def prompt(self, premise, hypothesis: str | None = None, index: int = 0) -> str:
        if isinstance(premise, dict):  # a row, as ClassificationPipeline passes it
            return super().prompt(premise, index)
        return self.task.render_prompt({"premise": premise, "hypothesis": hypothesis, self.task.label_field: ""})

    def __call__(self, premise, hypothesis=None, adapter: str | None = None):
        """(premise, hypothesis) -> {"label", "scores", "probabilities", "log_likelihoods"}; two
        lists (premises, hypotheses) or one list of (premise, hypothesis) pairs -> a list of
        those. adapter: one of the pipeline's named adapters (None: the base)."""
        single, pairs = _entailment_pairs(premise, hypothesis)
        out = self.classify([{"premise": p, "hypothesis": h} for p, h in pairs], adapter=adapter)
        for result in out:
            result["scores"] = result["probabilities"]
        return out[0] if single else out


def _entailment_pairs(premise, hypothesis) -> tuple[bool, list[tuple[str, str]]]:
    """(one pair given?, the pairs); wrong shapes are a TypeError, empty texts a ValueError."""
    usage = ("EntailmentPipeline takes (premise, hypothesis), two lists (premises, hypotheses) "
             "or one list of (premise, hypothesis) pairs")
    if isinstance(premise, str) and isinstance(hypothesis, str):
        single, pairs = True, [(premise, hypothesis)]
    elif isinstance(premise, (list, tuple)) and isinstance(hypothesis, (list, tuple)):
        if len(premise) != len(hypothesis):
            raise UsageError(f"{len(premise)} premises but {len(hypothesis)} hypotheses")
        single, pairs = False, list(zip(premise, hypothesis))
    elif isinstance(premise, (list, tuple)) and hypothesis is None:
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in premise):
            raise TypeError(f"{usage}; got a list whose items are not (premise, hypothesis) pairs")
        single, pairs = False, [tuple(p) for p in premise]
    else:
        got = type(premise).__name__ + ("" if hypothesis is None else f" and {type(hypothesis).__name__}")
        raise TypeError(f"{usage}; got {got}")
    if not pairs:
        raise UsageError("no (premise, hypothesis) pairs given")
    for i, (p, h) in enumerate(pairs):
        for name, text in (("premise", p), ("hypothesis", h)):
            if not isinstance(text, str):
                raise TypeError(f"{name} {i} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise UsageError(f"{name} {i} is empty")
    return single, pairs
