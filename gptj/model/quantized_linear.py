"""Quantization of a linear layer: int8 per output channel, int4 group-wise, and W8A8.

`QuantizedLinear(x) -> y` computes `x @ W^T (+ bias)` for x [..., in_features] with W stored as:

- int8: W[n, k] ~= q[n, k] * scale[n]; q int8 in [-127, 127], one scale per output row
  (symmetric, scale = max |W[n, :]| / 127).
- int4: W[n, k] ~= (q[n, k] - 8) * scale[n, j] + zero[n, j] for the group j = k // group_size;
  q in [0, 15] from the group's min and max (scale = (max - min) / 15, zero = min + 8 * scale).
  Two values per byte: `qweight[n, k // 2]` holds column 2i in the high nibble, 2i + 1 in the low.
- w8a8: the int8 weight above, and on CPU the activations quantized per token (row) as they
  come: x[m, k] ~= a[m, k] * s[m], a int8 in [-127, 127], s = max |x[m, :]| / 127 (symmetric,
  nothing saturates). `torch._int_mm` sums a @ q^T in int32 (oneDNN's VNNI / AMX kernels), and
  y = (acc * s[m]) * scale[n] in fp32, cast to x's dtype (`_int8_activation_matmul`).

Scales and zero points are rounded to bf16 when the weight is quantized, so the fused kernels
(which take them in bf16) and `dequantize()` compute with exactly the same weight. The bias is
added after the matmul, in the activation dtype.

Which path a CPU call takes is measured on the machine (gptj/model/matmul_probe.py): the packed
kernel, the dequantizing path in fp32 or bf16, or (w8a8 only, where the CPU has VNNI or AMX)
int8 x int8; the cutoffs below are the fallback when probing is off. What they were set from
(measured on CPU, benchmarks/NOTES.md "Weight-only quantization"):
- CPU, few rows (decode), or fp32 activations: torch's `_weight_int8pack_mm` /
  `_weight_int4pack_mm_for_cpu`, fed bf16 activations (their fp32 paths are far slower) and
  cast back to the activation dtype. With fp32 activations they beat dequantize + fp32 matmul
  at every row count measured (16 to 1024).
- CPU, many rows (prefill, scoring) with bf16/fp16 activations: the weight is dequantized to
  the activation dtype and multiplied by the ordinary matmul, which beats the packed kernels
  once the matmul stops being bound by reading the weight (int8 in bf16: the int8 values are
  converted and the product's rows scaled after, `_dequantized_matmul`).
- CUDA: int4 through `_weight_int4pack_mm` (tinygemm, bf16). int8 as
  `F.linear(x, q.to(x.dtype)) * scale` (`_int8_cuda_matmul`): run eagerly, the conversion writes
  the whole weight in bf16 first, so a call reads and writes ~5 bytes a weight, slower than a
  bf16 weight; only under `torch.compile` with coordinate-descent tuning and ONE row (batch-1
  decode) does inductor turn the matmul into a reduction that reads the int8 weight directly
  (~1 byte a weight). Nothing fuses the conversion at more rows. w8a8 layers multiply there as
  int8 (int8 activations are a CPU path for now; not measured on a GPU).

Every layer records the kernel it prepared (`kernel_name`); a packing the kernel refuses (a
shape it does not take) falls back to dequantize + matmul with a warning and the reason in
`kernel_refused`. The packed kernels take a contiguous 2-D input: `forward` makes it so (the
last position of a [B, S, d] batch, for one, is a strided view).

The persistent buffers (`qweight`, `scales`, `zeros`) are the saved format; kernel-specific
layouts are built from them, by the loaders while loading (gptj/model/quantized_model.py) or on the first
call. On CPU the int4 kernel's reordered copy then replaces the stored buffers (the model holds
each weight once); `dequantize()` and `stored_components()` read the values back from it.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptj.errors import GPTJError

from . import main_grad, matmul_probe
from .int4_cpu_layout import CPU_INT4_BLOCK_ROWS, int4_cpu_pack, int4_cpu_unpack, unpack_int4

BITS = (8, 4)
# The names options and configs use: int8 / int4 weight-only, w8a8 (int8 weights and activations).
QUANTIZE_MODES = ("int8", "int4", "w8a8")
GROUP_SIZES = (32, 64, 128, 256)  # int4 only
GROUP_SIZES_TEXT = ", ".join(map(str, GROUP_SIZES[:-1])) + f" or {GROUP_SIZES[-1]}"  # for messages
DEFAULT_GROUP_SIZE = 128
# Rows up to which the packed CPU kernels beat dequantize + bf16 matmul (measured: NOTES.md,
# "Numbers behind code comments"). The int4 kernel's time grows with the rows at about the
# dequantizing path's slope only past ~128 rows, so short prompts prefill through it; the int8
# kernel loses to converting its values + one matmul from ~32 rows on.
CPU_KERNEL_MAX_ROWS = 16
CPU_INT4_KERNEL_MAX_ROWS = 128
# w8a8 without probing: int8 x int8 from this many rows on where the CPU has int8 dot products,
# the packed int8 kernel below (decode reads the weight either way). torch's CPU _int_mm takes
# any row count and widths (its CUDA one wants > 16 rows and widths that are multiples of 8).
W8A8_MIN_ROWS = 17
# The paths of a CPU call, by the names the probe logs and caches.
PACKED = "packed"
INT8_ACTIVATIONS = "int8xint8"
DEQUANTIZE_PATHS = {"dequantize+fp32": torch.float32, "dequantize+bf16": torch.bfloat16,
                    "dequantize+fp16": torch.float16, "dequantize+fp64": torch.float64}
# fp32 temporaries of dequantize(): about this many elements at a time (4 MB, cache sized).
DEQUANTIZE_ELEMENTS = 1 << 20
# Prefill on CPU: weight elements dequantized into one reused buffer per matmul slice (16 MB bf16).
PREFILL_WEIGHT_ELEMENTS = 1 << 23


class QuantizationError(GPTJError, ValueError):
    """A quantization setting that cannot work for this weight, explained in words."""


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize: `bits` 8 or 4, `group_size` (int4 only), whether lm_head too, and
    whether the activations too (`int8_activations`: w8a8, 8 bits only)."""

    bits: int
    group_size: int = 128
    quantize_head: bool = True
    int8_activations: bool = False

    @classmethod
    def parse(cls, name: str | None, group_size: int = 128) -> QuantSpec | None:
        """'int8' / 'int4' / 'w8a8' / None -> a spec (None: no quantization). w8a8 keeps lm_head
        in float: its logits are what sampling and label scores read."""
        if name in (None, "", "none"):
            return None
        if name not in QUANTIZE_MODES:
            raise QuantizationError(f"unknown quantization {name!r}; expected one of {', '.join(QUANTIZE_MODES)}")
        if name == "w8a8":
            spec = cls(8, group_size, quantize_head=False, int8_activations=True)
        else:
            spec = cls(int(name.removeprefix("int")), group_size)
        spec.check()
        return spec

    @property
    def name(self) -> str:
        return "w8a8" if self.int8_activations else f"int{self.bits}"

    def check(self) -> None:
        if self.bits not in BITS:
            raise QuantizationError(f"bits must be 8 or 4, got {self.bits}")
        if self.int8_activations and self.bits != 8:
            raise QuantizationError(f"int8 activations (w8a8) need 8-bit weights, got {self.bits} bits")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise QuantizationError(
                f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}"
            )

    def to_dict(self) -> dict:
        method = "w8a8" if self.int8_activations else "weight_only"
        out = {"method": method, "bits": self.bits, "quantize_head": self.quantize_head}
        if self.bits == 4:
            out["group_size"] = self.group_size
        return out

    @classmethod
    def from_dict(cls, values: dict) -> QuantSpec:
        method = values.get("method")
        if method not in ("weight_only", "w8a8"):
            raise QuantizationError(f"unknown quantization method {method!r}; expected weight_only or w8a8")
        spec = cls(int(values["bits"]), int(values.get("group_size", 128)), bool(values.get("quantize_head", True)),
                   int8_activations=method == "w8a8")
        spec.check()
        return spec


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """fp32 values that bf16 represents exactly (what the kernels will see)."""
    return t.to(torch.bfloat16).float()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scale fp32 [N]) with W ~= q * scale[:, None]."""
    w = weight.float()
    scale = _bf16_exact(w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (packed uint8 [N, K/2], scale fp32 [N, K/g], zero fp32 [N, K/g])."""
    n, k = weight.shape
    if k % group_size:
        raise QuantizationError(f"int4 group size {group_size} does not divide the input width {k}")
    w = weight.float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = _bf16_exact((high - low) / 15.0).clamp_min(1e-8)
    zero = _bf16_exact(low + 8.0 * scale)
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15).to(torch.uint8)
    q = q.view(n, k)
    return (q[:, 0::2] << 4) | q[:, 1::2], scale, zero


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (a int8 [M, K], s fp32 [M]) with x ~= a * s[:, None], per row (token),
    symmetric: s = max |x[m, :]| / 127, so the largest value maps to +-127 and none is clipped.
    An all-zero row gets s = 1 (a = 0)."""
    largest = torch.linalg.vector_norm(x2d, ord=float("inf"), dim=1, dtype=torch.float32)
    scale = torch.where(largest > 0, largest / 127.0, torch.ones_like(largest))
    # bf16 / fp32 divides in fp32 (x converted exactly, no fp32 copy of x made first)
    a = torch.div(x2d, scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return a, scale


def _row_block(width: int, elements: int, align: int = CPU_INT4_BLOCK_ROWS) -> int:
    """Rows of `width` elements to take at a time for about `elements` (a multiple of `align`)."""
    return max(align, elements // width // align * align)


_scratch = threading.local()
_said_no_int8_dots: list[bool] = []  # the w8a8 fallback is said once per process


def _prefill_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer per thread, dtype and device, reused by every quantized matmul of a prefill."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]


class QuantizedLinear(nn.Module):
    """A frozen linear layer with int8 or int4 weights: `forward(x) -> x @ W^T (+ bias)`.

    Build one with `QuantizedLinear.from_weight(weight, bits, group_size)` or from stored
    components with `QuantizedLinear(bits, qweight, scales, zeros, group_size)`;
    `dequantize()` gives W [out_features, in_features] back (e.g. to merge an adapter).
    """

    def __init__(
        self,
        bits: int,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None = None,
        group_size: int = 0,
        bias: torch.Tensor | None = None,
        int8_activations: bool = False,
    ):
        super().__init__()
        if int8_activations and bits != 8:
            raise QuantizationError(f"int8 activations (w8a8) need 8-bit weights, got {bits} bits")
        self.bits, self.group_size = bits, group_size if bits == 4 else 0
        self.int8_activations = int8_activations  # w8a8: int8 x int8 where the probe finds it fastest
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (2 if bits == 4 else 1)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        if bits == 4:
            if zeros is None:
                raise QuantizationError("int4 weights need zero points")
            self.register_buffer("zeros", zeros.float())
        self.bias = bias
        self._kernel, self._kernel_ready = None, False  # built on first use: see prepare_kernel
        self.kernel_refused: str | None = None  # why the device's kernel refused this weight, if it did
        self.use_kernels = True  # False: always dequantize + matmul (a training run's frozen base)
        self.forced_path: str | None = None  # a CPU path to take always (tests, quality benchmarks)
        self._paths: dict[tuple[int, torch.dtype], str] = {}  # the probe's choice per row bucket and dtype

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bits: int, group_size: int = 128, bias: torch.Tensor | None = None,
        int8_activations: bool = False,
    ) -> QuantizedLinear:
        """Quantize a float weight [out_features, in_features] (on its own device)."""
        if bits == 8:
            q, scale = quantize_int8(weight)
            return cls(8, q, scale, bias=bias, int8_activations=int8_activations)
        if int8_activations:
            raise QuantizationError(f"int8 activations (w8a8) need 8-bit weights, got {bits} bits")
        if bits == 4:
            q, scale, zero = quantize_int4(weight, group_size)
            return cls(4, q, scale, zero, group_size, bias=bias)
        raise QuantizationError(f"bits must be 8 or 4, got {bits}")

    # ---- kernel layouts --------------------------------------------------------------------
    def prepare_kernel(self) -> QuantizedLinear:
        """Build the kernel-specific operands (not saved: rebuilt from qweight/scales/zeros).

        Done on the first call without gradients, or up front by the loaders (before any
        compilation). Training a frozen base's adapters never builds them: its matmuls use the
        dequantized weight, and the int4 kernels' packed copy would cost another half byte a weight.
        """
        if not self._kernel_ready:
            self._kernel_ready = True
            self._build_kernel()
        return self

    def _build_kernel(self) -> None:
        device = self.qweight.device
        if self.bits == 8 and device.type == "cuda":
            self._build_int8_cuda_kernel()
        elif self.bits == 8 and device.type == "cpu":
            self._kernel = "int8_cpu"
            self.register_buffer("_kernel_scales", self.scales.to(torch.bfloat16), persistent=False)
        elif self.bits == 4 and device.type == "cpu":
            self._build_int4_cpu_kernel()
        elif self.bits == 4 and device.type == "cuda":
            scales_and_zeros = torch.stack((self.scales.t(), self.zeros.t()), dim=-1)  # [K/g, N, 2]
            try:
                packed = torch._convert_weight_to_int4pack(self.qweight.contiguous(), 8)
            except RuntimeError as error:  # shapes the kernel does not take: dequantize + matmul instead
                self._refuse_kernel("int4_cuda", error)
                return
            self._kernel = "int4_cuda"
            self.register_buffer("_kernel_weight", packed, persistent=False)
            self.register_buffer(
                "_kernel_scales", scales_and_zeros.to(torch.bfloat16).contiguous(), persistent=False
            )

    def _refuse_kernel(self, kernel: str, error: Exception) -> None:
        self.kernel_refused = f"{kernel} packing refused [{self.out_features}, {self.in_features}]: {error}"
        warnings.warn(f"{self.kernel_refused}; this layer dequantizes + multiplies instead", stacklevel=3)

    def _build_int8_cuda_kernel(self) -> None:
        self._kernel = "int8_cuda"
        self.register_buffer("_kernel_scales", self.scales.to(torch.bfloat16), persistent=False)

    @property
    def kernel_name(self) -> str:
        """The kernel this layer multiplies with once prepared ("dequantize": none)."""
        return self._kernel or "dequantize"

    def _build_int4_cpu_kernel(self) -> None:
        """The CPU kernel's operands, which then replace the stored buffers: the values are read
        back from the kernel's layout, and the scales and zeros (bf16-exact) from its bf16 copy."""
        packed = int4_cpu_pack(self.qweight)
        if packed is None:  # shapes or a layout the kernel does not take: dequantize + matmul
            self._refuse_kernel("int4_cpu", RuntimeError("no int4 CPU layout for this shape"))
            return
        scales_and_zeros = torch.stack((self.scales.t(), self.zeros.t()), dim=-1)  # [K/g, N, 2]
        self._kernel = "int4_cpu"
        self.register_buffer("_kernel_weight", packed, persistent=False)
        self.register_buffer("_kernel_scales", scales_and_zeros.to(torch.bfloat16).contiguous(), persistent=False)
        for name in ("qweight", "scales", "zeros"):
            del self._buffers[name]

    @property
    def holds_stored(self) -> bool:
        """False once the CPU int4 kernel's copy has replaced qweight / scales / zeros."""
        return "qweight" in self._buffers

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def stored_components(self) -> dict[str, torch.Tensor]:
        """{"qweight", "scales"(, "zeros")} in the saved format, rebuilt from the kernel's copy
        when the model no longer holds them."""
        if self.holds_stored:
            names = ("qweight", "scales") if self.bits == 8 else ("qweight", "scales", "zeros")
            return {name: self._buffers[name] for name in names}
        values = int4_cpu_unpack(self._kernel_weight, 0, self.out_features)
        scales, zeros = self._int4_scales_zeros(0, self.out_features)
        return {"qweight": (values[:, 0::2] << 4) | values[:, 1::2], "scales": scales, "zeros": zeros}

    def _int4_values(self, start: int, stop: int) -> torch.Tensor:
        if self.holds_stored:
            return unpack_int4(self.qweight[start:stop])
        return int4_cpu_unpack(self._kernel_weight, start, stop)

    def _int4_scales_zeros(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.holds_stored:
            return self.scales[start:stop], self.zeros[start:stop]
        both = self._kernel_scales[:, start:stop].float()  # [K/g, rows, 2]
        return both[..., 0].t(), both[..., 1].t()

    # ---- math --------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight the layer multiplies by, [out_features, in_features] (or output `rows`
        [start, stop)), in `dtype`, written into `out` when given.

        Computed in blocks of about DEQUANTIZE_ELEMENTS, so that the fp32 temporaries stay
        small beside the result (a 6B model's lm_head would otherwise need 8 bytes a weight).
        """
        start, stop = rows or (0, self.out_features)
        if out is None:
            out = torch.empty(stop - start, self.in_features, dtype=dtype, device=self.device)
        step = _row_block(self.in_features, DEQUANTIZE_ELEMENTS)
        for first in range(start, stop, step):
            last = min(first + step, stop)
            target = out[first - start : last - start]
            if self.bits == 8:  # q * scale rounded once to dtype, written in place (no temporary)
                target.copy_(self.qweight[first:last]).mul_(self.scales[first:last, None].to(dtype))
                continue
            q = self._int4_values(first, last).view(last - first, -1, self.group_size).to(torch.float32)
            scales, zeros = self._int4_scales_zeros(first, last)
            q.sub_(8.0).mul_(scales[:, :, None]).add_(zeros[:, :, None])  # (q - 8) * scale + zero
            target.copy_(q.view(last - first, self.in_features))
        return out

    def _int8_cuda_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """(x @ q^T) * scale in x's dtype; the scale is per output row, so it can follow the
        matmul. See the module docstring for what this reads eagerly and compiled."""
        return F.linear(x2d, self.qweight.to(x2d.dtype)) * self._kernel_scales.to(x2d.dtype)

    def _dequantized_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d @ W^T with W dequantized slice by slice of output rows into one reused buffer:
        the ordinary matmul's speed for many rows, without a full-size temporary per call.

        int8 with bf16 activations multiplies by the int8 values themselves (exact in bf16) and
        scales the product's rows after: one conversion pass over the weight instead of a
        conversion and a multiply (faster from 32 rows on, NOTES.md). The product is
        rounded to bf16 before the scale, one rounding more than the dequantized weight's; fp16
        keeps the dequantized weight, whose unscaled product could pass fp16's range."""
        y = torch.empty(x2d.shape[0], self.out_features, dtype=x2d.dtype, device=x2d.device)
        step = _row_block(self.in_features, PREFILL_WEIGHT_ELEMENTS)
        buffer = _prefill_buffer(min(step, self.out_features) * self.in_features, x2d.dtype, x2d.device)
        scale_after = self.bits == 8 and x2d.dtype == torch.bfloat16
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            weight = buffer[: (stop - start) * self.in_features].view(stop - start, self.in_features)
            if scale_after:
                weight.copy_(self.qweight[start:stop])
            else:
                self.dequantize(x2d.dtype, rows=(start, stop), out=weight)
            torch.matmul(x2d, weight.t(), out=y[:, start:stop])
        return y.mul_(self.scales.to(x2d.dtype)) if scale_after else y

    def _int8_activation_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """w8a8: x2d's rows quantized (quantize_activations), a @ q^T summed in int32 by
        `torch._int_mm`, then (acc * s[m]) * scale[n] in fp32. Products and sums are exact in
        int32 (|a|, |q| <= 127: at most 2^14 per product, 2^17 products before 2^31), so the
        result differs from the exact one only by the fp32 conversion and the two multiplies."""
        a, s = quantize_activations(x2d)
        acc = torch._int_mm(a, self.qweight.t())  # the transposed view: as fast as a [K, N] copy
        return torch.mul(acc, s[:, None]).mul_(self.scales)  # int32 * fp32: acc converted, then multiplied

    # ---- which path a CPU call takes ------------------------------------------------------
    def cpu_paths(self, dtype: torch.dtype) -> list[str]:
        """The paths a CPU call with `dtype` activations may take here (the probe's candidates)."""
        if self._kernel is None:  # no packed kernel (refused, or use_kernels off): dequantize in x's dtype
            return [_dequantize_path(dtype)]
        paths = [PACKED, _dequantize_path(dtype)]
        if dtype == torch.float32:
            paths.append("dequantize+bf16")
        elif not (dtype == torch.bfloat16 and matmul_probe.native_bf16()):
            paths.append("dequantize+fp32")
        if self.int8_activations:
            if matmul_probe.int8_dot_products():
                paths.append(INT8_ACTIVATIONS)
            elif not _said_no_int8_dots:
                _said_no_int8_dots.append(True)
                warnings.warn("w8a8: this CPU has no int8 dot products that torch._int_mm runs on (AVX512-VNNI "
                              "or AMX); the w8a8 layers multiply as weight-only int8", stacklevel=4)
        return paths

    def cpu_path(self, rows: int, dtype: torch.dtype) -> str:
        """The path a CPU call with `rows` rows of `dtype` takes: forced, else the probe's measured
        choice (gptj/model/matmul_probe.py), else (probing off, or compiling) the fixed cutoffs."""
        if self.forced_path is not None:
            return self.forced_path
        paths = self.cpu_paths(dtype)
        if len(paths) == 1:
            return paths[0]
        if torch.compiler.is_compiling() or not matmul_probe.enabled():  # a traced graph: fixed choices
            return self._fixed_path(rows, dtype, paths)
        bucket = matmul_probe.row_bucket(rows)
        path = self._paths.get((bucket, dtype))
        if path is None:
            x = torch.randn(bucket, self.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
            family = self.extra_repr().split(",")[0] + (f" g{self.group_size}" if self.bits == 4 else "")
            candidates = {name: functools.partial(self._cpu_matmul, name, x) for name in paths}
            path = matmul_probe.choose(family, dtype, rows, self.out_features, self.in_features, candidates)
            self._paths[(bucket, dtype)] = path
        return path

    def _fixed_path(self, rows: int, dtype: torch.dtype, paths: list[str]) -> str:
        """The cutoffs measured on the machines in NOTES.md (probing off)."""
        if INT8_ACTIVATIONS in paths and rows >= W8A8_MIN_ROWS:
            return INT8_ACTIVATIONS
        if rows <= CPU_KERNEL_MAX_ROWS or dtype == torch.float32:
            return PACKED
        if self._kernel == "int4_cpu" and rows <= CPU_INT4_KERNEL_MAX_ROWS:
            return PACKED
        return _dequantize_path(dtype)

    def _cpu_matmul(self, path: str, x2d: torch.Tensor) -> torch.Tensor:
        """x2d @ W^T through `path` (one of cpu_paths), in x2d's dtype."""
        if path == PACKED:  # the packed kernels need a contiguous 2-D input
            return self._packed_matmul(x2d.contiguous()).to(x2d.dtype)
        if path == INT8_ACTIVATIONS:
            return self._int8_activation_matmul(x2d).to(x2d.dtype)
        if path not in DEQUANTIZE_PATHS:
            raise QuantizationError(f"unknown matmul path {path!r}; expected {PACKED}, {INT8_ACTIVATIONS} "
                                    f"or one of {', '.join(DEQUANTIZE_PATHS)}")
        return self._dequantized_matmul(x2d.to(DEQUANTIZE_PATHS[path])).to(x2d.dtype)

    def _packed_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self._kernel == "int8_cuda":
            return self._int8_cuda_matmul(x2d)
        xb = x2d.to(torch.bfloat16)
        if self._kernel == "int8_cpu":
            return torch._weight_int8pack_mm(xb, self.qweight, self._kernel_scales)
        if self._kernel == "int4_cpu":
            return torch._weight_int4pack_mm_for_cpu(xb, self._kernel_weight, self.group_size, self._kernel_scales)
        return torch._weight_int4pack_mm(xb, self._kernel_weight, self.group_size, self._kernel_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        if torch.is_grad_enabled():  # training a frozen base's adapters: x's dtype, both directions
            y = _FrozenQuantizedMatmul.apply(x, self)
            return y if self.bias is None else y + self.bias
        if self.use_kernels:
            self.prepare_kernel()
        rows = x.numel() // self.in_features
        if x.device.type == "cpu":
            x2d = x.reshape(rows, self.in_features)
            y = self._cpu_matmul(self.cpu_path(rows, x.dtype), x2d).view(*x.shape[:-1], self.out_features)
        elif self._kernel is not None:  # CUDA: the packed kernels need a contiguous 2-D input
            y = self._packed_matmul(x.reshape(rows, self.in_features).contiguous()).to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        kind = "w8a8" if self.int8_activations else f"int{self.bits}"
        return f"{kind}, in_features={self.in_features}, out_features={self.out_features}{group}"

    def decode_bytes(self) -> int:
        """Bytes one call with few rows reads: the packed kernel's operands, or the stored form."""
        self.prepare_kernel()
        kernel = [b for n, b in self.named_buffers() if n.startswith("_kernel")]
        if self._kernel in ("int8_cpu", "int8_cuda"):  # read as stored (int8_cuda: compiled, one row)
            kernel.append(self.qweight)
        return sum(b.numel() * b.element_size() for b in kernel) if self._kernel else self.nbytes()

    def nbytes(self) -> int:
        """Bytes of the saved quantized weight (qweight + scales + zeros, as stored: fp32 scales)."""
        n, k = self.out_features, self.in_features
        if self.bits == 8:
            return n * k + n * 4
        return n * k // 2 + 2 * n * (k // self.group_size) * 4

    def resident_bytes(self) -> int:
        """Bytes this layer holds now (stored buffers and kernel copies)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _dequantize_path(dtype: torch.dtype) -> str:
    """The dequantizing path that computes in `dtype`."""
    return next(name for name, d in DEQUANTIZE_PATHS.items() if d == dtype)


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = x @ W^T with the gradient to x only (W is frozen). The dequantized W is a temporary
    in both directions, never saved for backward: keeping it would hold a full-precision copy
    of every quantized weight until the backward pass, undoing the memory quantization saves.
    Both directions compute in x's dtype with exactly the weight `dequantize()` gives."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, _reused_dequantized(layer, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ _reused_dequantized(ctx.layer, grad.dtype), None


def _reused_dequantized(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight dequantized into the thread's reused buffer: one weight-sized
    temporary at a time (what the planner counts), not a fresh allocation per matmul, whose
    pages the system would map anew on every call."""
    shape = (layer.out_features, layer.in_features)
    buffer = _prefill_buffer(shape[0] * shape[1], dtype, layer.device)
    return layer.dequantize(dtype, out=buffer.view(shape))


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias), where `weight` is a tensor or a QuantizedLinear."""
    if isinstance(weight, torch.Tensor):
        return main_grad.linear(x, weight, bias)
    y = weight(x)
    return y if bias is None else y + bias
