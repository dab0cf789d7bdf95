"""LoRA adapters beside the frozen GPT-J layers, sharded like the weights they adapt.

For a target linear map y = W x (W [out, in]) an adapter adds

    delta = B A dropout(x) * (alpha / rank)        A [rank, in], B [out, rank]

to the target's output. B starts at zero, so a fresh adapter leaves the model's output exactly
as it was. The base weights are never touched: the layers ask their block's `lora` (a
`BlockLoRA`, None without adapters) for deltas at three marked points in gptj/model/layers.py.

Tensor parallelism follows the target's own split:
- column-parallel targets (q, k, v, fc_in; W split by output rows): A whole, B split by output
  rows, so this rank's delta covers exactly its slice of the output;
- row-parallel targets (out_proj, fc_out; W split by input columns): A split by input columns,
  B whole. Each rank's delta B (A_r x_r) is a partial sum, added to the target's partial sum
  BEFORE the block's all-reduce, which sums it exactly once.
The whole (replicated) factor of each pair gets a different gradient on every TP rank (its
gradient is a sum over the ranks' slices), so those gradients are summed over the TP group once
per optimizer step (`LoraAdapters.REPLICATED_GRADS_ARE_PARTIAL`, read by the optimizer).

Names follow PEFT for GPT-J (`transformer.h.{i}.attn.q_proj.lora_A.weight`, ...), so adapters
load from and export to a PEFT adapter directory; see `peft_shard_rules`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gptj.errors import GPTJError

from .config import ModelConfig
from .parallel import ParallelContext, all_gather
from .sharding import ShardRule, SliceReader, slice_range

TARGETS = ("q", "k", "v", "out_proj", "fc_in", "fc_out")
ROW_PARALLEL = ("out_proj", "fc_out")
# Our target name -> the Hugging Face / PEFT module path inside `transformer.h.{i}`.
HF_MODULES = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "out_proj": "attn.out_proj",
              "fc_in": "mlp.fc_in", "fc_out": "mlp.fc_out"}


class LoraConfigError(GPTJError, ValueError):
    """LoRA settings that cannot work, in one line."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float | None = None  # None: 2 x rank
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=TARGETS)

    def __post_init__(self):
        if self.rank < 1:
            raise LoraConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise LoraConfigError(f"lora.targets {list(self.targets)}: expected a non-empty subset of "
                                  f"{', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


def target_dims(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of the full (unsharded) target."""
    d, f = config.hidden_size, config.ffn_dim
    return {"fc_in": (d, f), "fc_out": (f, d)}.get(target, (d, d))


def adapter_parameter_count(config: ModelConfig, settings: LoraSettings) -> int:
    """Trainable parameters of the whole (unsharded) model's adapters. `settings` needs only
    `rank` and `targets` (the planner passes its LoraPlan)."""
    per_block = sum(settings.rank * sum(target_dims(config, t)) for t in settings.targets)
    return config.num_layers * per_block


def lora_flops_per_token(config: ModelConfig, settings: LoraSettings, sequence_length: int) -> float:
    """Training FLOPs per token with a frozen base: ModelConfig.flops_per_token less the base's
    weight-gradient matmuls (2 per matmul weight), plus 6 per adapter weight."""
    base = config.flops_per_token(sequence_length) - 2 * config.matmul_parameters()
    return base + 6 * adapter_parameter_count(config, settings)


def peft_shard_rules(config: ModelConfig, settings: LoraSettings) -> dict[str, ShardRule]:
    """Our adapter parameter name (in `LoraAdapters`) -> rule over the PEFT tensor names.

    PEFT names inside `adapter_model.safetensors` carry the prefix `base_model.model.`; the
    rules use the bare Hugging Face module names.
    """
    rules = {}
    for i in range(config.num_layers):
        for target in settings.targets:
            hf = f"transformer.h.{i}.{HF_MODULES[target]}"
            row = target in ROW_PARALLEL
            rules[f"blocks.{i}.{target}.lora_A"] = ShardRule((hf + ".lora_A.weight",), 1 if row else None)
            rules[f"blocks.{i}.{target}.lora_B"] = ShardRule((hf + ".lora_B.weight",), None if row else 0)
    return rules


def peft_shapes(config: ModelConfig, settings: LoraSettings) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(config.num_layers):
        for target in settings.targets:
            hf = f"transformer.h.{i}.{HF_MODULES[target]}"
            fan_in, fan_out = target_dims(config, target)
            shapes[hf + ".lora_A.weight"] = (settings.rank, fan_in)
            shapes[hf + ".lora_B.weight"] = (fan_out, settings.rank)
    return shapes


class LoraPair(nn.Module):
    """One target's A [rank, in_local] and B [out_local, rank] (`BlockLoRA.add` applies them)."""

    def __init__(self, fan_in: int, fan_out: int, settings: LoraSettings, dtype, device=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(settings.rank, fan_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, settings.rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.scaling = settings.scaling


class BlockLoRA(nn.Module):
    """The adapters of one block, keyed by target; the layers call `add`."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, settings: LoraSettings, dtype, device=None):
        super().__init__()
        t = ctx.tensor_parallel
        self.widths = {}  # local output width of every target, adapted or not
        pairs = {}
        for target in TARGETS:
            fan_in, fan_out = target_dims(config, target)
            if target in ROW_PARALLEL:
                fan_in //= t
            else:
                fan_out //= t
            self.widths[target] = fan_out
            if target in settings.targets:
                pairs[target] = LoraPair(fan_in, fan_out, settings, dtype, device)
        self.pairs = nn.ModuleDict(pairs)

    def add(self, targets: tuple[str, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the outputs of `targets` side by side, this rank's slices) plus their deltas from
        the common input x. A target without an adapter contributes nothing.

        One GEMM adds every delta into y (addmm, beta 1): the rank-r products of the targets
        are laid side by side, [T, k r], and multiplied by their B factors placed block-diagonally
        in a [sum of widths, k r] matrix (zero rows for targets without adapters). Scaling is
        applied to the [T, k r] products, never to a full-width tensor.
        """
        present = [t for t in targets if t in self.pairs]
        if not present:
            return y
        pairs = [self.pairs[t] for t in present]
        if all(isinstance(p.dropout, nn.Identity) for p in pairs):  # one matmul for every A
            low = F.linear(x, torch.cat([p.lora_A for p in pairs]) if len(pairs) > 1 else pairs[0].lora_A)
        else:  # each adapter draws its own dropout mask, as PEFT does
            low = torch.cat([F.linear(p.dropout(x), p.lora_A) for p in pairs], dim=-1)
        low = low * pairs[0].scaling
        if len(targets) == 1:
            up = pairs[0].lora_B
        else:
            rank, k = pairs[0].lora_A.shape[0], len(pairs)
            rows, i = [], 0
            for t in targets:
                if t in self.pairs:
                    rows.append(F.pad(self.pairs[t].lora_B, (i * rank, (k - i - 1) * rank)))
                    i += 1
                else:
                    rows.append(y.new_zeros(self.widths[t], k * rank))
            up = torch.cat(rows)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), up.t())
        return out.view(y.shape)


class LoraAdapters(nn.Module):
    """Every block's adapters, as one module: what the optimizer trains and checkpoints hold.

    Parameter names are `blocks.{i}.pairs.{target}.lora_A|lora_B`; `attach` hands each block
    its `BlockLoRA` (registering it inside the model too) and freezes the base weights.
    """

    # The optimizer sums the gradients of replicated parameters over the TP group (see above).
    REPLICATED_GRADS_ARE_PARTIAL = True

    def __init__(self, config: ModelConfig, settings: LoraSettings, ctx: ParallelContext | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config, self.settings = config, settings
        self.ctx = ctx or ParallelContext.single()
        self.blocks = nn.ModuleList(BlockLoRA(config, self.ctx, settings, dtype, device)
                                    for _ in range(config.num_layers))
        self._rules = {self._param_name(name): rule for name, rule in peft_shard_rules(config, settings).items()}

    @staticmethod
    def _param_name(rule_name: str) -> str:
        i, target, which = rule_name.removeprefix("blocks.").split(".")
        return f"blocks.{i}.pairs.{target}.{which}"

    def rules(self) -> dict[str, ShardRule]:
        """Parameter name -> shard rule over the PEFT tensor names."""
        return self._rules

    def replicated_parameters(self) -> dict[str, bool]:
        return {name: rule.dim is None for name, rule in self._rules.items()}

    # ---- values ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> LoraAdapters:
        """PEFT's initialisation (A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0), identical for any TP
        size: each full A is drawn from a generator seeded by (seed, tensor name)."""
        shapes = peft_shapes(self.config, self.settings)

        def full(name, dim, start, stop):
            if ".lora_B." in name:
                value = torch.zeros(shapes[name])
            else:
                digest = hashlib.sha256(f"lora:{seed}:{name}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
                bound = shapes[name][1] ** -0.5
                value = torch.empty(shapes[name]).uniform_(-bound, bound, generator=gen)
            return value if dim is None else value.narrow(dim, start, stop - start)

        return self.load_shards(full)

    @torch.no_grad()
    def load_shards(self, read: SliceReader) -> LoraAdapters:
        """Fill every adapter from `read(peft_name, dim, start, stop)` (bare PEFT names)."""
        params = dict(self.named_parameters())
        shapes = peft_shapes(self.config, self.settings)
        for name, rule in self._rules.items():
            (hf_name,) = rule.hf_names
            if rule.dim is None:
                value = read(hf_name, None, 0, 0)
            else:
                start, stop = slice_range(shapes[hf_name][rule.dim], rule, self.ctx)
                value = read(hf_name, rule.dim, start, stop)
            if tuple(value.shape) != tuple(params[name].shape):
                raise LoraConfigError(f"adapter tensor {hf_name}: expected shape "
                                      f"{tuple(params[name].shape)} for this rank, found {tuple(value.shape)}")
            params[name].copy_(value.to(params[name].dtype))
        return self

    def gather_peft(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Full tensors (or gradients) under bare PEFT names; collective over the TP group."""
        params = dict(self.named_parameters())
        out = {}
        for name, rule in self._rules.items():
            tensor = params[name].grad if grads else params[name].detach()
            if tensor is None:
                raise ValueError(f"adapter {name} has no gradient")
            out[rule.hf_names[0]] = tensor if rule.dim is None else all_gather(tensor, self.ctx.tp_group, rule.dim)
        return out

    # ---- wiring into a model -----------------------------------------------------------------
    def attach(self, model) -> LoraAdapters:
        """Give every block of `model` its adapters and freeze the base weights."""
        if model.config.to_dict() != self.config.to_dict():
            raise LoraConfigError("adapters were built for a different model shape")
        for p in model.parameters():
            p.requires_grad_(False)
        for block, lora in zip(model.blocks, self.blocks):
            block.lora = lora
        return self

    @staticmethod
    def detach_from(model) -> None:
        for block in model.blocks:
            block.lora = None

    @torch.no_grad()
    def merge_into(self, model) -> None:
        """W += scaling * B A on every adapted weight of this rank (no communication: each
        rank's B_local A (column) or B A_local (row) is exactly its shard of the update), then
        detach: the model computes the same function with plain weights. A quantized base
        (gptj/model/quantized_linear.py) must be dequantized first (gptj.model.quantized_model.dequantize_model).
        """
        if model.quantization is not None:
            raise LoraConfigError(f"cannot merge adapters into {model.quantization.name} weights: "
                                  "dequantize the model first, or keep the adapters attached")
        for block, lora in zip(model.blocks, self.blocks):
            width, local = block.split
            # Rows of each target inside its weight: q, k, v and fc_in share the fused in_proj.
            rows = {"q": (0, width // 3), "k": (width // 3, 2 * width // 3), "v": (2 * width // 3, width),
                    "fc_in": (width, width + local)}
            owners = {"out_proj": (block.attn, "out_proj_weight"), "fc_out": (block.mlp, "fc_out_weight")}
            for target, pair in lora.pairs.items():
                module, attr = owners.get(target, (block, "in_proj_weight"))
                weight = getattr(module, attr)
                if target in rows:
                    weight = weight[slice(*rows[target])]
                update = (pair.lora_B.float() @ pair.lora_A.float()) * pair.scaling
                weight.copy_((weight.float() + update).to(weight.dtype))
        self.detach_from(model)


def base_fingerprint(model, source: str) -> str:
    """A short hash naming the base model: its shape, where it came from, and the bytes of its
    replicated weights (LayerNorms, fc_out biases: identical on every TP rank, and different
    between any two trained checkpoints)."""
    digest = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    digest.update(source.encode())
    for name, p in model.named_parameters():
        if ".lora." in name:
            continue
        if "ln_" in name or name.endswith("fc_out_bias"):
            digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
