"""The bytes a decode step reads, for benchmarks/gpu_bench.py's decode rows: the weights as the
model holds them (quantized projections as their kernel reads them) and the KV cache slots the
step attends; and which kernel each quantized layer runs."""

from __future__ import annotations

from gptj.model import ModelConfig


def hf_decode_bytes_per_step(config: ModelConfig, batch: int, slots: float, element: int = 2) -> float:
    """Weights a decode step reads (all but the embedding table) + the KV cache slots it attends."""
    weights = config.num_parameters() - config.vocab_size * config.hidden_size
    kv = 2 * config.num_layers * batch * slots * config.hidden_size
    return (weights + kv) * element


def model_weight_bytes(model) -> int:
    """Weight bytes one decode step reads from a model as it is held: float parameters their
    own, quantized projections what their kernel reads (QuantizedLinear.decode_bytes)."""
    from gptj.model.quantized_linear import QuantizedLinear

    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    return weights + sum(m.decode_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))


def decode_step_bytes(model, batch: int, attended_slots: float, cache_element: int) -> dict:
    """Bytes per decode step: the weights, and the keys and values of the slots attended."""
    attn = model.blocks[0].attn
    kv = 2 * len(model.blocks) * batch * attended_slots * attn.local_heads * attn.head_dim * cache_element
    return {"weight_bytes": model_weight_bytes(model), "kv_bytes": kv}


def layer_kernels(model) -> tuple[dict[str, str], dict[str, str]]:
    """Each quantized layer's kernel, and the packings a kernel refused (with the reason)."""
    from gptj.model.quantized_linear import QuantizedLinear

    kernels, refused = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            kernels[name] = module.prepare_kernel().kernel_name
            if module.kernel_refused:
                refused[name] = module.kernel_refused
    return kernels, refused
