"""Loading streams: a multi-shard bf16 checkpoint loads holding the final model plus the tensor
in hand, never a second copy; int4 layers keep only the CPU kernel's copy of their weights.

Measured as the process's peak resident memory (VmHWM, reset just before the load) in a fresh
process, against the bytes the loaded model holds: a loader that maps the files, or keeps a
quantized weight beside its kernel copy, exceeds the bound by about the file size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptj.model import ModelConfig
from gptj.model.hf import ShardedSafetensorsWriter
from gptj.model.model import random_reader
from gptj.model.sharding import hf_shapes

# Large enough that the weights (~120 MB bf16) dwarf allocator noise; 6 shards.
CONFIG = ModelConfig(vocab_size=4096, hidden_size=1024, num_layers=4, num_heads=8, rotary_dim=32,
                     max_positions=128, eos_token_id=0, bos_token_id=0)
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

LOAD_SCRIPT = r"""
import json, sys, torch
from gptj.model.hf import load_pretrained
from gptj.model.quantized_linear import QuantSpec, QuantizedLinear

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

directory, quantize = sys.argv[1], sys.argv[2]
spec = None if quantize == "none" else QuantSpec.parse(quantize)
# Page in the code the load runs (library text counts as resident, ~100 MB, once per process).
for bits in (8, 4):
    QuantizedLinear.from_weight(torch.randn(128, 256).bfloat16(), bits).prepare_kernel().dequantize()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
model, _ = load_pretrained(directory, dtype=torch.bfloat16, quantize=spec, kernels=True)
peak = status("VmHWM")
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
print(json.dumps({"peak": peak - before, "held": held, "layers": len(layers),
                  "stored_kept": sum(m.holds_stored for m in layers)}))
"""


def write_checkpoint(directory: Path) -> int:
    """A random bf16 GPT-J in several shards, written tensor by tensor; its largest tensor's bytes."""
    directory.mkdir(parents=True)
    read = random_reader(CONFIG, seed=3)
    writer = ShardedSafetensorsWriter(directory, max_shard_bytes=24 * MiB)
    for name in hf_shapes(CONFIG):
        writer.add(name, read(name, None, 0, 0).to(torch.bfloat16))
    writer.close()
    config = CONFIG.to_hf_dict()
    config["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config))
    return max(2 * torch.Size(s).numel() for s in hf_shapes(CONFIG).values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, int]:
    directory = tmp_path_factory.mktemp("stream") / "bf16"
    largest = write_checkpoint(directory)
    assert len(list(directory.glob("*.safetensors"))) >= 4
    return directory, largest


def measure_load(directory: Path, quantize: str) -> dict:
    # A fixed mmap threshold: glibc otherwise raises it after each large free and keeps later
    # blocks of that size on its heap, which measures the allocator's cache, not the loader.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(directory), quantize],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_load_peak_is_the_model_plus_the_tensor_in_hand(checkpoint):
    directory, largest = checkpoint
    result = measure_load(directory, "none")
    # The fused q/k/v/fc_in weight is read as four pieces and joined (twice its size), plus the
    # largest HF tensor and allocator slack (freed small blocks that glibc keeps for reuse).
    fused = 2 * (3 * CONFIG.hidden_size + CONFIG.ffn_dim) * CONFIG.hidden_size
    bound = result["held"] + fused + largest + 24 * MiB
    assert result["peak"] <= bound, (result, bound)


def test_int4_kernel_copy_replaces_the_stored_weights(checkpoint, tmp_path):
    """Quantized on load and pre-quantized alike: after loading, every int4 layer holds only the
    CPU kernel's copy (no qweight / scales / zeros beside it)."""
    from gptj.execution.inference.quantized_checkpoints import quantize_checkpoint

    directory, _ = checkpoint
    on_load = measure_load(directory, "int4")
    assert on_load["layers"] == 3 * CONFIG.num_layers + 1 and on_load["stored_kept"] == 0
    stored = quantize_checkpoint(str(directory), tmp_path / "int4", 4, 128, progress=False)
    prequantized = measure_load(stored, "none")
    assert prequantized["stored_kept"] == 0 and prequantized["held"] == on_load["held"]
