"""Layout planner: bytes per device, communication per step and host bytes for every layout.

A layout is tensor parallel t x replicas r (t * r = every device of the machine) plus three
switches: optimizer offload (fp32 master + Adam state on the host), block-weight streaming
(only ~2 blocks of weights/gradients resident on the device) and activation recomputation.
For each layout the planner counts, per device, exactly what this project's training step
keeps (see gptj/execution/training/optimizer.py for the optimizer's buffers) and says which layouts fit.

    python -m gptj.execution.training.planner --model gptj-6b --seq 1024 --micro-batch 1 --global-batch 128 \
        --machine h100-80gb-x8
    python -m gptj.execution.training.planner --model path/to/config.json --machine cpu-24gb --json
    python -m gptj.execution.training.planner --lora-rank 8 --quantize int4 --machine gpu-12gb-x1 --micro-batch 0

LoRA layouts (`--lora-rank R`) keep the base frozen (in the model dtype, or int8 / int4) and
train only the adapters; `--micro-batch 0` picks the micro-batch too (see `choose_micro_batch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from gptj.execution.runtime.precision import DTYPES, PRECISIONS
from gptj.execution.training.planner_machines import GB, MACHINES, GiB, Machine, h100_machine  # noqa: F401
from gptj.execution.training.planner_table import format_table, why_nothing_fits  # noqa: F401 - printed by main, used by callers
from gptj.model import ConfigError, ModelConfig
from gptj.model.lora import ROW_PARALLEL, lora_flops_per_token, target_dims
from gptj.model.lora import TARGETS as LORA_TARGETS
from gptj.model.quantized_linear import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    GROUP_SIZES_TEXT,
    QUANTIZE_MODES,
    QuantSpec,
)

PRECISION_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}  # per element
ADAM_MOMENT_BYTES = 8  # fp32 m and v, per parameter


def fp32_state_bytes(precision: str, offload: bool) -> int:
    """ShardedAdamW's fp32 state per parameter, before dividing by the replicas (its docstring
    has the formula): the moments, and a master copy unless the weights are fp32 and stay on
    the device (then the weights are their own master)."""
    return ADAM_MOMENT_BYTES + (0 if precision == "fp32" and not offload else 4)
STEP_TRANSIENT_BYTES = 8  # unfused AdamW's sqrt(v) and sqrt(v)/bias_correction temporaries, fp32
ASSUMED_MFU = 0.5  # for the rough step-time estimate used to rank layouts


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    replicas: int
    offload: bool
    streaming: bool
    recompute: bool

    @property
    def name(self) -> str:
        flags = [f for f, on in (("offload", self.offload), ("stream", self.streaming),
                                 ("recompute", self.recompute)) if on]
        return f"tp{self.tensor_parallel}xr{self.replicas}" + ("+" + "+".join(flags) if flags else "")


def load_model_config(spec: str) -> ModelConfig:
    """A preset name, the path of a Hugging Face config.json, its directory, or a fine-tuning run
    directory (its hf/ export)."""
    path = Path(spec)
    if path.suffix != ".json" and not path.is_dir() and "/" not in spec:  # presets have no "/"
        return ModelConfig.preset(spec)
    from gptj.execution.runtime.preflight import InputError
    from gptj.execution.runtime.run_dirs import resolve_model_dir
    from gptj.model.hf import CONFIG_FILE, CheckpointError, read_checkpoint_info

    try:
        if path.suffix == ".json":
            if path.name != CONFIG_FILE:
                raise ConfigError(f"{path}: expected a Hugging Face model's {CONFIG_FILE} (or its directory)")
            if not path.is_file():
                raise ConfigError(f"{path}: no such {CONFIG_FILE}")
            path = path.parent
        return read_checkpoint_info(Path(resolve_model_dir(str(path)))).config
    except (InputError, CheckpointError) as err:
        raise ConfigError(str(err)) from None


def parameter_counts(config: ModelConfig, tp: int) -> dict[str, int]:
    """Parameters held by one TP rank: per block, outside blocks, and in total."""
    d, f, vp = config.hidden_size, config.ffn_dim, config.padded_vocab_size(tp)
    width = config.num_heads // tp * config.head_dim
    block = 2 * d + 3 * width * d + width * d + (f // tp) * d + f // tp + d * (f // tp) + d
    outside = (vp // tp) * d + 2 * d + (vp // tp) * (d + 1)
    return {"block": block, "outside": outside, "total": outside + config.num_layers * block}


def activation_bytes(config: ModelConfig, tp: int, tokens: int, seq: int, pb: int, recompute: bool) -> dict:
    """Bytes kept for backward over one micro-batch (`tokens` = micro_batch * seq).

    Per block and token, without recomputation: the block input x and ln_1 output (d each),
    q, k, v and the attention output (4 d/t), fc_in output and gelu output (2 f/t). The CPU
    and GPU fused attention kernels keep no S x S scores. With recomputation only the block
    inputs stay, plus one block's full set while it is recomputed.
    """
    d, f = config.hidden_size, config.ffn_dim
    full_block = (2 * d + 4 * d // tp + 2 * f // tp) * pb * tokens
    inputs = d * pb * tokens
    blocks = (config.num_layers * inputs + full_block) if recompute else config.num_layers * full_block
    vocab_local = config.padded_vocab_size(tp) // tp
    if tp == 1:  # fused head + loss: one [T, V] buffer in the model dtype + a small fp32 chunk
        logits = tokens * vocab_local * pb + min(tokens, max(1, (1 << 23) // vocab_local)) * vocab_local * 4
    else:  # model-dtype logits, fp32 logits, fp32 softmax kept for backward
        logits = tokens * vocab_local * (pb + 4 + 4)
    return {"blocks": blocks, "logits": logits, "mask": tokens * seq}  # bool segment mask [B,1,S,S]


def layout_problems(config: ModelConfig, machine: Machine, t: int, r: int, micro_batch: int,
                    global_batch: int) -> list[str]:
    """Why a layout of t tensor-parallel ranks x r replicas cannot run, memory aside."""
    problems = []
    if config.num_heads % t or config.ffn_dim % t:
        problems.append(f"num_heads {config.num_heads} / ffn {config.ffn_dim} not divisible by tp {t}")
    if t > machine.devices_per_node:
        problems.append(f"tensor parallel {t} spans nodes ({machine.devices_per_node} devices per node)")
    accumulation = global_batch / (micro_batch * r)
    if abs(accumulation - round(accumulation)) > 1e-9 or accumulation < 1:
        problems.append(f"global batch {global_batch} is not a multiple of micro-batch x replicas "
                        f"({micro_batch} x {r})")
    return problems


def plan_layout(config, layout: Layout, machine: Machine, seq: int, micro_batch: int,
                global_batch: int, precision: str, fused_adamw: bool = True) -> dict:
    t, r = layout.tensor_parallel, layout.replicas
    pb = PRECISION_BYTES[precision]
    counts = parameter_counts(config, t)
    p_local = counts["total"]
    tokens = micro_batch * seq
    resident_params = counts["outside"] + 2 * counts["block"] if layout.streaming else p_local

    device = {
        "weights": resident_params * pb,
        "gradients": resident_params * pb,
        "optimizer": 0 if layout.offload else fp32_state_bytes(precision, False) * p_local / r,
    }
    act = activation_bytes(config, t, tokens, seq, pb, layout.recompute)
    device["activations"] = act["blocks"] + act["mask"]
    device["logits"] = act["logits"]
    # The embedding's and lm_head's gradients go straight into the optimizer's flat buffer
    # (gptj/model/main_grad.py) unless that buffer is on the host (offload without replicas):
    # then backward holds them dense, [V/t, d] each, before they are copied there.
    grads_on_host = layout.offload and r == 1
    device["backward_transient"] = 2 * (config.padded_vocab_size(t) // t) * config.hidden_size * pb * grads_on_host
    # The unfused torch.optim.AdamW makes two fp32 temporaries the size of the flat master slice
    # (the fused kernel none). The step runs after backward has freed the activations, so the
    # peak is the larger of the two phases.
    step_transient = 0 if fused_adamw else STEP_TRANSIENT_BYTES * p_local / r
    device["step_transient"] = 0 if layout.offload else step_transient
    device["reserved"] = machine.reserved
    backward_peak = device["activations"] + device["logits"] + device["backward_transient"]
    device_total = (sum(device.values()) - backward_peak - device["step_transient"]
                    + max(backward_peak, device["step_transient"]))

    host = 0.0
    if layout.offload:  # fp32 state + staging buffers for the slice crossing the bus
        host += (fp32_state_bytes(precision, True) * p_local + step_transient * r) / r + 2 * pb * p_local / r
        if r == 1:  # without replicas the optimizer keeps the flat gradient buffer on the host
            host += pb * p_local
    if layout.streaming:  # the block weights and their gradients live on the host
        host += 2 * (p_local - resident_params) * pb
    host_per_node = host * machine.devices_per_node

    # Communication per optimizer step, bytes sent+received per device (ring algorithms).
    accumulation, passes, tp_volume = activation_traffic(config, layout, tokens, pb, micro_batch, global_batch)
    replica_volume = p_local * pb * 2 * (r - 1) / r if r > 1 else 0.0  # reduce-scatter + all-gather
    host_volume = 0.0
    if layout.offload:
        host_volume += 2 * p_local * pb / r  # gradient slice down, updated weights up
    if layout.streaming:  # weights in for forward and backward (+ recompute), gradients out
        host_volume += accumulation * (passes + 1) * (p_local - resident_params) * pb

    flops = config.flops_per_token(seq) * global_batch * seq / machine.devices
    if layout.recompute:
        flops *= 4 / 3  # one more forward
    volumes = {"tensor_parallel": tp_volume, "replicas": replica_volume, "host": host_volume}
    problems = layout_problems(config, machine, t, r, micro_batch, global_batch)
    memory = machine.device_memory
    if machine.shared_host:  # host and device share the same RAM
        if device_total + host > memory:
            problems.append(f"needs {(device_total + host) / GiB:.1f} GiB of {memory / GiB:.1f} GiB RAM")
    else:
        if device_total > memory:
            problems.append(f"needs {device_total / GiB:.1f} GiB per device of {memory / GiB:.1f} GiB")
        if host_per_node > machine.host_memory:
            problems.append(f"needs {host_per_node / GiB:.0f} GiB host memory per node "
                            f"of {machine.host_memory / GiB:.0f} GiB")
    return layout_result(layout.name, layout, machine, {"params_per_device": p_local}, accumulation, device,
                         device_total, host, host_per_node, volumes, flops, problems)


def activation_traffic(config, layout: Layout, tokens: int, pb: int, micro_batch: int,
                       global_batch: int) -> tuple[float, int, float]:
    """(micro-batches per replica and step, activation all-reduce passes per block, bytes each
    device sends + receives in the tensor-parallel all-reduces of one optimizer step)."""
    t, r = layout.tensor_parallel, layout.replicas
    accumulation = global_batch / (micro_batch * r)
    passes = 3 if layout.recompute else 2  # forward all-reduce is repeated when recomputing
    tp_volume = 0.0
    if t > 1:
        per_allreduce = tokens * config.hidden_size * pb * 2 * (t - 1) / t
        tp_volume = accumulation * (passes * config.num_layers + 2) * per_allreduce
    return accumulation, passes, tp_volume


def layout_result(name: str, layout: Layout, machine: Machine, params: dict, accumulation: float,
                  device: dict, device_total: float, host: float, host_per_node: float,
                  volumes: dict, flops: float, problems: list[str]) -> dict:
    """One layout's row: memory, traffic, the estimated step time (compute at ASSUMED_MFU plus
    each transfer at its link's bandwidth) and whether it fits."""
    spans_nodes = machine.nodes > 1 and layout.replicas > 1
    replica_bw = machine.inter_bandwidth if spans_nodes else machine.intra_bandwidth
    times = {
        "compute": flops / (machine.matmul_flops * ASSUMED_MFU),
        "tp_comm": volumes["tensor_parallel"] / machine.intra_bandwidth if volumes["tensor_parallel"] else 0.0,
        "replica_comm": volumes["replicas"] / replica_bw if volumes["replicas"] else 0.0,
        "host_transfer": volumes["host"] / machine.host_link_bandwidth if volumes["host"] else 0.0,
    }
    return {
        "layout": name,
        **dataclasses.asdict(layout),
        **params,
        "grad_accumulation": accumulation,
        "device_bytes": device,
        "device_total": device_total,
        "host_bytes_per_device": host,
        "host_bytes_per_node": host_per_node,
        "comm_bytes_per_step": volumes,
        "estimated_seconds": {**times, "step": sum(times.values())},
        "fits": not problems,
        "problems": problems,
    }


# ---- LoRA: a frozen base, adapters trained --------------------------------------------------------

# Bytes per element of a quantized frozen weight as a training run holds it (gptj/model/quantized_linear.py;
# no kernel copies). 8 bits: the int8 values (one fp32 scale per output row: negligible). int4
# with groups of g input columns: the nibbles (0.5) and an fp32 scale and zero point per group.
def quantized_bytes(base: str, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    return 1.0 if QuantSpec.parse(base, group_size).bits == 8 else 0.5 + 8 / group_size


# Bytes per element of the largest quantized weight while it is dequantized for a training
# matmul (forward and backward): the weight in the compute dtype (the fp32 temporaries cover
# 1024 rows at a time: counted as 1024 rows of 8 bytes besides).
def dequantize_transient_bytes(rows: int, columns: int, pb: int) -> float:
    return rows * columns * pb + min(rows, 1024) * columns * 8


@dataclass(frozen=True)
class LoraPlan:
    rank: int
    targets: tuple[str, ...] = LORA_TARGETS  # any of gptj.model.lora.TARGETS
    base: str = "model"  # frozen base weights: "model" (the compute dtype) or one of QUANTIZE_MODES
    dropout: float = 0.0  # > 0: each adapter keeps its dropped input (and a bool mask) for backward
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only


def lora_parameter_counts(config: ModelConfig, tp: int, lora: LoraPlan) -> dict[str, int]:
    """Adapter parameters on one TP rank, and how many of them are replicated (whole) there."""
    r = lora.rank
    local = replicated = 0
    for target in lora.targets:
        fan_in, fan_out = target_dims(config, target)
        row = target in ROW_PARALLEL
        whole = r * (fan_out if row else fan_in)  # B (row-parallel) or A (column-parallel)
        split = r * (fan_in if row else fan_out) // tp
        local += whole + split
        replicated += whole
    return {"total": config.num_layers * local, "replicated": config.num_layers * replicated}


def frozen_base_bytes(config: ModelConfig, tp: int, pb: int, lora: LoraPlan) -> float:
    """Bytes of one TP rank's frozen base. Quantized (gptj/model/quantized_model.py): every block matmul
    weight and lm_head (unless the quantization keeps it float); the embedding, LayerNorms and
    biases stay in pb."""
    total = parameter_counts(config, tp)["total"]
    if lora.base == "model":
        return total * pb
    blocks, head = quantized_weight_counts(config, tp)
    quantized = blocks + (head if QuantSpec.parse(lora.base, lora.group_size).quantize_head else 0)
    return quantized * quantized_bytes(lora.base, lora.group_size) + (total - quantized) * pb


def quantized_weight_counts(config: ModelConfig, tp: int) -> tuple[int, int]:
    """Elements of one TP rank's quantized weights: (all blocks' matmuls, lm_head)."""
    d, f = config.hidden_size, config.ffn_dim
    width = config.num_heads // tp * config.head_dim
    blocks = config.num_layers * (3 * width * d + width * d + 2 * (f // tp) * d)
    return blocks, config.padded_vocab_size(tp) // tp * d


def plan_lora_layout(config, layout: Layout, machine: Machine, seq: int, micro_batch: int,
                     global_batch: int, precision: str, lora: LoraPlan) -> dict:
    """plan_layout's counts for LoRA. The frozen base has no gradients and no optimizer state;
    the adapters have weights + gradients in the model dtype and the fp32 state of
    `fp32_state_bytes` over the replicas (ShardedAdamW). Backward keeps the same activations as full fine-tuning
    (each frozen matmul's input is still the input of a LoRA A, or of the next op's backward),
    plus each adapter's rank-r intermediate; backward builds no dense embedding / lm_head
    gradients but holds one block's activation gradients at a time.
    """
    t, r = layout.tensor_parallel, layout.replicas
    pb = PRECISION_BYTES[precision]
    adapters = lora_parameter_counts(config, t, lora)
    a_local = adapters["total"]
    tokens = micro_batch * seq
    device = {
        "weights": frozen_base_bytes(config, t, pb, lora) + a_local * pb,
        "gradients": a_local * pb,
        "optimizer": fp32_state_bytes(precision, False) * a_local / r,
    }
    act = activation_bytes(config, t, tokens, seq, pb, layout.recompute)
    per_block_lora = len(lora.targets) * lora.rank * pb * tokens
    if lora.dropout > 0:
        d, f = config.hidden_size, config.ffn_dim
        inputs = {"out_proj": d // t, "fc_out": f // t}
        per_block_lora += sum(inputs.get(target, d) for target in lora.targets) * (pb + 1) * tokens
    lora_act = per_block_lora * (1 if layout.recompute else config.num_layers)
    device["activations"] = act["blocks"] + act["mask"] + lora_act
    device["logits"] = act["logits"]
    # No dense embedding / lm_head gradients; what backward holds beyond the saved activations
    # is one block's activation gradients (x, h, q k v, attention output, fc_in and gelu outputs).
    d, f = config.hidden_size, config.ffn_dim
    device["backward_transient"] = (2 * d + 4 * d // t + 2 * f // t) * pb * tokens
    device["step_transient"] = 0  # fused AdamW; the adapter state is small anyway
    if lora.base != "model":  # one quantized weight at a time is dequantized for its matmul
        width = config.num_heads // t * config.head_dim
        rows = max(3 * width + f // t, config.padded_vocab_size(t) // t)
        device["dequantize_transient"] = dequantize_transient_bytes(rows, d, pb)
    device["reserved"] = machine.reserved
    device_total = sum(device.values())

    accumulation, _, tp_volume = activation_traffic(config, layout, tokens, pb, micro_batch, global_batch)
    if t > 1:
        tp_volume += adapters["replicated"] * pb * 2 * (t - 1) / t  # partial adapter gradients, once a step
    replica_volume = a_local * pb * 2 * (r - 1) / r if r > 1 else 0.0
    # The frozen base costs 4 FLOPs per weight and token (forward + input gradients), not 6;
    # recomputation adds one forward (2 per weight + a third of attention).
    flops_per_token = lora_flops_per_token(config, lora, seq)
    if layout.recompute:
        flops_per_token += 2 * config.matmul_parameters() + 4 * config.num_layers * config.hidden_size * seq
    flops = flops_per_token * global_batch * seq / machine.devices
    problems = layout_problems(config, machine, t, r, micro_batch, global_batch)
    if device_total > machine.device_memory:
        problems.append(f"needs {device_total / GiB:.1f} GiB per device of {machine.device_memory / GiB:.1f} GiB")
    name = layout.name + f"+lora{lora.rank}" + ("" if lora.base == "model" else f"+{lora.base}")
    params = {"params_per_device": parameter_counts(config, t)["total"], "trainable_params_per_device": a_local}
    volumes = {"tensor_parallel": tp_volume, "replicas": replica_volume, "host": 0.0}
    return layout_result(name, layout, machine, params, accumulation, device, device_total, 0.0, 0.0,
                         volumes, flops, problems)


def lora_layouts(machine: Machine):
    """TP x replicas x recomputation: the adapters' state is too small to offload or stream."""
    t = 1
    while t <= machine.devices:
        if machine.devices % t == 0:
            for recompute in (False, True):
                yield Layout(t, machine.devices // t, False, False, recompute)
        t *= 2


def choose_micro_batch(config: ModelConfig, machine: Machine, seq: int, global_batch: int,
                       precision: str = "bf16", lora: LoraPlan | None = None,
                       fused_adamw: bool = True) -> tuple[int | None, dict | None]:
    """The power-of-two micro-batch whose recommended layout has the lowest estimated step time
    (the largest such: bigger matmuls run closer to peak), with its plan; (None, None) if none fits."""
    best, best_key = (None, None), None
    micro = 1
    while micro <= global_batch:
        result = plan(config, machine, seq, micro, global_batch, precision, fused_adamw, lora=lora)
        if result["recommended"] is not None:
            row = next(r for r in result["layouts"] if r["layout"] == result["recommended"])
            key = (round(row["estimated_seconds"]["step"], 6), -micro)
            if best_key is None or key < best_key:
                best, best_key = (micro, result), key
        micro *= 2
    return best


def layouts(config: ModelConfig, machine: Machine):
    t = 1
    while t <= machine.devices:
        if machine.devices % t == 0:
            for offload in (False, True):
                for streaming in ((False, True) if offload else (False,)):
                    for recompute in (False, True):
                        yield Layout(t, machine.devices // t, offload, streaming, recompute)
        t *= 2


def plan(config: ModelConfig, machine: Machine, seq: int, micro_batch: int, global_batch: int,
         precision: str = "bf16", fused_adamw: bool = True, lora: LoraPlan | None = None) -> dict:
    """Every layout, and the recommended one: the fitting layout with the lowest estimated step time."""
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if lora is not None:
        rows = [plan_lora_layout(config, lay, machine, seq, micro_batch, global_batch, precision, lora)
                for lay in lora_layouts(machine)]
    else:
        rows = [plan_layout(config, lay, machine, seq, micro_batch, global_batch, precision, fused_adamw)
                for lay in layouts(config, machine)]
    fitting = [r for r in rows if r["fits"]]
    best = min(fitting, key=lambda r: (r["estimated_seconds"]["step"], r["device_total"]), default=None)
    return {
        "model": config.to_dict(),
        "parameters": config.num_parameters(),
        "machine": dataclasses.asdict(machine),
        "seq": seq, "micro_batch": micro_batch, "global_batch": global_batch, "precision": precision,
        "kv_cache_bytes_per_token": 2 * config.num_layers * config.hidden_size * PRECISION_BYTES[precision],
        "layouts": rows,
        "recommended": best["layout"] if best else None,
        **({"lora": dataclasses.asdict(lora)} if lora is not None else {}),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Memory and communication of every training layout.")
    parser.add_argument("--model", default="gptj-6b", help="preset name or Hugging Face config.json")
    parser.add_argument("--seq", type=int, default=None,
                        help="tokens per row (default: 1024, or the model's positions when fewer)")
    parser.add_argument("--micro-batch", type=int, default=1,
                        help="0: the power of two with the fastest fitting layout (the largest of equals)")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--machine", default="h100-80gb-x8", help=f"one of {', '.join(MACHINES)}")
    parser.add_argument("--device-memory-gib", type=float, help="override the machine's device memory")
    parser.add_argument("--host-memory-gib", type=float, help="override the machine's host memory per node")
    parser.add_argument("--unfused-adamw", action="store_true",
                        help="count the fp32 temporaries of the for-loop torch AdamW (8 B/param)")
    parser.add_argument("--lora-rank", type=int, default=0, help="plan LoRA on a frozen base (0: full fine-tuning)")
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="comma-separated LoRA targets")
    parser.add_argument("--quantize", default="none", choices=["none", *QUANTIZE_MODES],
                        help="frozen base weights quantized (LoRA only)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                        help=f"int4 group size of the quantized base: {GROUP_SIZES_TEXT} (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    for option in ("seq", "micro_batch", "global_batch"):
        value = getattr(args, option)
        if value is not None and value < 1 and not (option == "micro_batch" and value == 0):  # 0: the planner chooses
            extra = " (or 0: the planner chooses)" if option == "micro_batch" else ""
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}{extra}")
    for option in ("device_memory_gib", "host_memory_gib"):
        if getattr(args, option) is not None and getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if args.micro_batch and args.global_batch % args.micro_batch:
        parser.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    if args.machine not in MACHINES:
        parser.error(f"unknown machine {args.machine!r}; known: {', '.join(MACHINES)}")
    machine = MACHINES[args.machine]
    if args.device_memory_gib:
        machine = dataclasses.replace(machine, device_memory=args.device_memory_gib * GiB)
    if args.host_memory_gib:
        machine = dataclasses.replace(machine, host_memory=args.host_memory_gib * GiB)
    try:
        config = load_model_config(args.model)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.seq is None:
        args.seq = min(1024, config.max_positions)
    problem = _beyond_the_model(args, config)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    lora = None
    if args.lora_rank > 0:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            parser.error(f"--lora-targets {args.lora_targets!r}: expected a subset of {','.join(LORA_TARGETS)}")
        lora = LoraPlan(args.lora_rank, targets, "model" if args.quantize == "none" else args.quantize,
                        group_size=args.group_size)
    elif args.quantize != "none":
        parser.error("--quantize needs --lora-rank: quantized base weights are frozen")
    if args.micro_batch == 0:
        micro, result = choose_micro_batch(config, machine, args.seq, args.global_batch, args.precision,
                                           lora, fused_adamw=not args.unfused_adamw)
        if result is None:
            print("error: nothing fits at micro-batch 1", file=sys.stderr)
            return 1
    else:
        result = plan(config, machine, args.seq, args.micro_batch, args.global_batch, args.precision,
                      fused_adamw=not args.unfused_adamw, lora=lora)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0 if result["recommended"] else 1  # nothing fits: the table says why, the exit code too


def _beyond_the_model(args, config) -> str | None:
    """Why the asked shape cannot be trained on this model, or None."""
    if args.lora_rank < 0:
        return f"--lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}"
    if args.lora_rank > config.hidden_size:
        return (f"--lora-rank {args.lora_rank} is above the model's width {config.hidden_size}: "
                "a low-rank adapter needs a rank below it")
    if args.seq > config.max_positions:
        return f"--seq {args.seq} is beyond the model's {config.max_positions} positions"
    return None


if __name__ == "__main__":
    sys.exit(main())

