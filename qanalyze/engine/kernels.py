"""Integer matrix products with integer accumulation: the bottom layer of the integer engine.

One contract, several paths: :func:`int_mm` returns the exact product of two matrices of signed
symmetric codes (``|v| <= 2**(bits-1) - 1``, 2 to 16 bits), whatever their shapes and strides.

- ``int8`` (both sides <= 8 bits): one ``torch._int_mm`` (int8 x int8 -> int32). The result is
  int32 when ``K * qmax_a * qmax_b`` fits int32, else K is cut into chunks that do and the chunk
  products are summed in int64.
- ``split`` (9 to 16 bits on either side): each operand wider than 8 bits is cut into two int8
  digits and every product goes through ``torch._int_mm`` (2 calls for 8 x 16 bits, 3 for 16 x 16,
  the two cross terms sharing one call); the int32 partial products are combined exactly, in int32
  as long as the bound allows and in int64 after (see :func:`_split_mm`).
- ``float`` (2 to 16 bits): the codes as floating-point numbers through one BLAS GEMM per chunk of K.
  Every product and every partial sum of integers is an integer, and a float holds every integer below
  ``2**24`` (float32) or ``2**53`` (float64) exactly, so when ``K * qmax_a * qmax_b`` stays under that
  bound no rounding happens in any order of summation (fused multiply-adds included): the result is the
  exact integer product. float32 takes chunks of up to ``2**24 / (qmax_a * qmax_b)`` columns (1,040 at
  8 x 8 bits), float64 the rest (16-bit codes); chunk results are summed in int64, like the int8 path's. It needs
  full float32 precision (no bfloat16 or TF32 GEMMs, `_float32_is_exact`), else it works in float64.
- ``avx2``: the ``int8`` and ``split`` paths with a compiled AVX2 kernel (`qanalyze.engine.avx2_gemm`) in place
  of ``torch._int_mm``, for x86 CPUs without VNNI; exact for every pair of 8-bit codes (int16 lanes, pair sums
  in int32), built on first use, absent where it cannot be built. Measured on the six products of
  benchmarks/kernels_matmul.py, AVX2 emulated on a VNNI AMD EPYC (oneDNN, ATen and MKL capped to AVX2), 2
  threads: 0.73x a float32 GEMM at 8 x 8 bits where the ``float`` path takes 1.19x; at 16 x 16 bits its four
  digit products take 3.6x, the ``float`` path's float64 GEMM 2.1x, so ``auto`` keeps ``float`` there. With the
  rescale in its epilogue (`int_mm_scaled`) the engine's products take no extra pass over their outputs.
- ``reference``: int64 matmul, the oracle every other path is tested against.

``auto`` takes ``int8`` / ``split`` where int8 GEMMs are fast, and ``float`` where they are not: without
AVX-512 VNNI, AVX-VNNI or AMX, oneDNN's ``torch._int_mm`` on the CPU falls back to a kernel 25 to 85 times
slower than a float32 GEMM of the same shape (measured on an AVX2-only AMD EPYC: 0.6 to 1.9 s against 23 ms
for 2048 x 384 x 1536), where a VNNI CPU runs it about 3.7 times faster than float32. Which one this CPU
is, is measured once per process (`int8_gemm_is_fast`): both paths give the same integers, so the choice
changes only the speed. Where ``torch._int_mm`` is slow and the AVX2 kernel builds, ``auto`` also times it
against ``float`` (once per process, per operand class: both sides <= 8 bits, or wider) and takes the faster.
``QANALYZE_KERNEL`` (`KERNEL_ENV`) forces what ``auto`` takes: ``reference``, ``float``, ``int_mm`` (``int8`` /
``split``) or ``avx2``; any other value is a ConfigError.

Around the products (issue 26's third way): :func:`int_mm_scaled` gives ``float32(a @ b) * scale + bias``, the
rescale done in the AVX2 kernel's epilogue on the ``avx2`` path; :func:`fused_codes` quantizes in one compiled
pass; :func:`fused_quantize_selected` says where the engine uses the latter (CPU, on the ``avx2`` and ``float``
paths, where the library builds; the VNNI paths keep the torch ops). Both give the same values as the torch ops.

Shape and hardware rules of ``torch._int_mm`` live in :func:`safe_int_mm`, nowhere else. Values
outside the declared code range are not checked (that would cost a pass over both operands per
call; the quantizers guarantee the range) and may give wrong results.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qanalyze.cpu import onednn_int8_is_exact
from qanalyze.engine.avx2_gemm import avx2_int8_mm_op, avx2_library_op
from qanalyze.errors import ConfigError
from qanalyze.quant.primitives import qmax

_Kernel = Callable[..., torch.Tensor]  # kernel(a, b, *, bits_a, bits_b) on validated operands
_Int8Mm = Callable[..., torch.Tensor]  # mm(a8, b8, *, out=None) -> int32, like safe_int_mm

KERNEL_ENV = "QANALYZE_KERNEL"
"""Environment variable that forces what ``int_mm(..., path="auto")`` takes (`FORCED_KERNELS`)."""

FORCED_KERNELS = ("auto", "reference", "float", "int_mm", "avx2")
"""Values of `KERNEL_ENV`: ``int_mm`` is ``int8`` for codes of <= 8 bits and ``split`` above, ``avx2`` is the
AVX2 kernel (`qanalyze.engine.avx2_gemm`) at every width; ``auto`` (or unset) lets the CPU check decide."""

KERNEL_PATHS: dict[str, _Kernel] = {}
"""Path name -> ``kernel(a, b, *, bits_a, bits_b)``, the exact product of validated operands.
``int_mm(..., path="auto")`` picks ``int8`` when both sides have <= 8 bits, else ``split``, on a device whose
int8 GEMMs are fast (`int8_gemm_is_fast`), and ``float`` on one where they are not."""

# signed only: the codes are signed, and uint8 would read -1 as 255
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)

_INT32_MAX = 2**31 - 1
_DIGIT_BITS = 8
_RADIX = 1 << _DIGIT_BITS
# x = 256 * hi + lo + 128 with hi, lo int8: x - 128 spans [-32896, 32639], which holds every 16-bit code
# [-32767, 32767]; a plain signed split (x = 256 * hi + lo) stops at 32639 and hi would need 128.
_OFFSET = 128
_SIGNED_SPLIT_MAX = 127 * _RADIX + 127  # 32639: the largest x = 256 * hi + lo with hi, lo int8
# Output elements per block of rows in the split path: a block's int32 partial products are still in
# cache when they are combined, while each block's int_mm repacks b, so blocks must not be too small.
# 2-core machine, 2 threads, the six products of benchmarks/kernels_matmul.py at 16 x 16 bits: 768K
# took 58 ms in all, 384K 61, 192K 68, unblocked 80 (2x slower on the 2048 x 1536 outputs).
_BLOCK_ELEMENTS = 3 << 18
_FLOAT32_EXACT = 1 << 24  # every integer up to 2**24 is a float32
_FLOAT64_EXACT = 1 << 53
# fewer than this many columns of K per float32 GEMM and float64 in one GEMM is cheaper than the chunks
_FLOAT32_MIN_STEP = 256


def _register(name: str) -> Callable[[_Kernel], _Kernel]:
    def add(kernel: _Kernel) -> _Kernel:
        KERNEL_PATHS[name] = kernel
        return kernel

    return add


# ---------------------------------------------------------------------------------------------------------------------
# the public entry points


def int_mm(a: torch.Tensor, b: torch.Tensor, *, bits_a: int, bits_b: int, path: str = "auto") -> torch.Tensor:
    """Exact ``a @ b`` for integer tensors a (M, K) and b (K, N) holding values of signed bits_a / bits_b-bit
    symmetric codes (|value| <= 2**(bits-1) - 1, bits in 2..16). Returns the exact integer product:
    int32 when it provably fits (paths int8 and float), else int64.

    "Provably" is decided from the bits and K alone, never from the values, so the dtype is a function
    of the call's shape and path: the int8 and float paths give int32 unless K * qmax_a * qmax_b >= 2**31
    (K > 133144 at 8 x 8 bits); the split path gives int32 when its digits' bound fits (8 x 16 bits up to
    K = 512, 16 x 16 bits only at K = 1); the reference path always gives int64. ``auto`` picks a path by
    device (`int8_gemm_is_fast`) or by `KERNEL_ENV`, so callers should not depend on which of int32 and int64
    they get.

    ``a`` and ``b`` may have any signed integer dtype (int8, int16, int32, int64) and any strides (a
    transposed view is used as it is). ``path`` is ``"auto"`` or a name in :data:`KERNEL_PATHS`.
    Raises ConfigError for a non-integer dtype, operands that are not 2-D or do not chain, bits
    outside 2..16, an unknown path, or the ``int8`` path asked for more than 8 bits.
    """
    _check_operands(a, b, bits_a, bits_b)
    name = _auto_path(bits_a, bits_b, a.device) if path == "auto" else path
    if name not in KERNEL_PATHS:
        raise ConfigError(f"unknown kernel path {path!r}; known: auto, {', '.join(KERNEL_PATHS)}")
    return KERNEL_PATHS[name](a, b, bits_a=bits_a, bits_b=bits_b)


def int_mm_scaled(a: torch.Tensor, b: torch.Tensor, *, bits_a: int, bits_b: int, row_scale: torch.Tensor | None = None,
                  col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  path: str = "auto") -> torch.Tensor:
    """``int_mm(a, b).to(float32).mul_(row_scale * col_scale).add_(bias)``, the same float32 values on every path:
    ``row_scale`` (M, 1), ``col_scale`` (N,) or 0-d, ``bias`` (N,), each float32 and optional (a missing scale
    is 1; with both, their float32 product is the scale, as torch's broadcast forms it).

    On the ``avx2`` path with codes of <= 8 bits and K within int32 the kernel applies them in its epilogue, in
    its int32 result's memory while each block of rows is in cache: one pass instead of a conversion, a multiply
    and an add over the whole output. The ``float`` path's exact float product goes to float32 directly."""
    _check_operands(a, b, bits_a, bits_b)
    name = _auto_path(bits_a, bits_b, a.device) if path == "auto" else path
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    scaled = avx2_library_op("int8_mm_scaled") if name == "avx2" and a.device.type == "cpu" else None
    if scaled is not None and max(bits_a, bits_b) <= 8 and k <= _INT32_MAX // (qmax(bits_a) * qmax(bits_b)):
        return scaled(a.to(torch.int8), b.to(torch.int8), _float_vector(row_scale, m), _float_vector(col_scale, n),
                      _float_vector(bias, n))
    if name == "float":  # float32 from the exact float / int64 product: no round trip through int32 / int64
        out = _float_exact(a, b, bits_a, bits_b).to(torch.float32)
    else:
        out = int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path=name).to(torch.float32)
    scale = row_scale if col_scale is None else col_scale if row_scale is None else row_scale * col_scale
    if scale is not None:
        out.mul_(scale)
    return out if bias is None else out.add_(bias)


def _float_vector(x: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """A scale or bias (one value, or ``size``) as the contiguous float32 vector of ``size`` the kernel reads."""
    return None if x is None else x.detach().to(torch.float32).reshape(-1).expand(size).contiguous()


def fused_quantize_selected(bits_a: int, bits_b: int, device: torch.device) -> bool:
    """Whether the engine quantizes the operands of an ``a @ b`` of these bits with :func:`fused_codes`: on the CPU,
    where ``auto`` takes the ``avx2`` or ``float`` path (a CPU without fast int8 GEMMs; the ``int8`` / ``split``
    paths of VNNI CPUs and the ``reference`` path keep the torch ops) and the library builds."""
    if device.type != "cpu" or _auto_path(bits_a, bits_b, device) not in ("avx2", "float"):
        return False
    return avx2_library_op("quantize_codes") is not None


def fused_codes(x: torch.Tensor, scale: torch.Tensor, bits: int, levels: torch.Tensor | None = None) -> torch.Tensor:
    """`qanalyze.engine.functions.integer_codes` in one compiled pass over ``x`` (a contiguous float32 copy is
    made of anything else): ``scale`` is one value, or (rows, 1) for a 2-D ``x``; ``levels`` (int16, x's size, the
    draws `qanalyze.quant.primitives.uniform_noise` maps to (k + 1/2) / 2**16) gives stochastic rounding. Only
    where :func:`fused_quantize_selected` holds."""
    x = x.detach().to(torch.float32).contiguous()
    flat = scale.detach().to(torch.float32).reshape(-1).contiguous()
    if levels is not None:
        levels = levels.reshape(-1).contiguous()
    return avx2_library_op("quantize_codes")(x, flat, qmax(bits), levels)


def fused_layer_norm(q: torch.Tensor, scale: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer layer norm's forward after quantization (`qanalyze.engine.functions.IntLayerNormFunction`) in
    one compiled pass over the codes ``q`` (rows, width) with one ``scale`` per row: ``(xhat, y, rstd)`` with the
    values of its torch ops (exact int64 sums, then the same double operations in the same order). Only where
    :func:`fused_quantize_selected` holds."""
    vector = lambda v: v.detach().to(torch.float32).reshape(-1).contiguous()  # noqa: E731
    return avx2_library_op("layer_norm_codes")(q.contiguous(), vector(scale), vector(gamma),
                                               None if bias is None else vector(bias), float(eps))


def int8_gemm_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch._int_mm`` on ``device`` runs faster than a float32 GEMM of the same shape.

    CUDA: yes (cuBLASLt int8 tensor-core GEMMs). CPU: measured once per process on a 256 x 1024 x 256
    product, best of three of each (about 5 ms on a VNNI CPU, 0.3 s on one without), since neither
    PyTorch's public API nor the ISA name alone says which kernel oneDNN will pick."""
    return _int8_gemm_is_fast(torch.device(device).type)


@functools.cache
def _int8_gemm_is_fast(device_type: str) -> bool:
    if device_type != "cpu":
        return device_type == "cuda"
    if not onednn_int8_is_exact():
        return False  # what safe_int_mm runs then is a float64 GEMM: never faster than the float path
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (256, 1024), generator=generator, dtype=torch.int32).to(torch.int8)
    b = torch.randint(-127, 128, (1024, 256), generator=generator, dtype=torch.int32).to(torch.int8)

    return _best_seconds(lambda: safe_int_mm(a, b)) < _best_seconds(lambda: _float_path(a, b, bits_a=8, bits_b=8))


def forced_kernel() -> str:
    """The value of `KERNEL_ENV` (lower case, ``auto`` when unset or empty); ConfigError for a value not in
    `FORCED_KERNELS`, or ``avx2`` on a machine where the AVX2 kernel cannot be built."""
    value = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if value not in FORCED_KERNELS:
        raise ConfigError(f"{KERNEL_ENV}={value!r} is not a kernel; known: {', '.join(FORCED_KERNELS)}")
    if value == "avx2" and avx2_int8_mm_op() is None:
        raise ConfigError(f"{KERNEL_ENV}=avx2, but the AVX2 int8 kernel cannot be built or run on this machine")
    return value


def _auto_path(bits_a: int, bits_b: int, device: torch.device) -> str:
    narrow = max(bits_a, bits_b) <= 8
    forced = forced_kernel()
    if forced == "int_mm" or (forced == "auto" and int8_gemm_is_fast(device)):
        return "int8" if narrow else "split"
    if forced == "auto" and device.type == "cpu":
        return _cpu_fallback(narrow)
    return "float" if forced == "auto" else forced


@functools.cache
def _cpu_fallback(narrow: bool) -> str:
    """``avx2`` or ``float``, whichever multiplies a 256 x 1024 x 256 product of 8-bit codes (``narrow``) or of
    16-bit codes faster here (best of three); ``float`` without the AVX2 kernel. Once per process."""
    if avx2_int8_mm_op() is None:
        return "float"
    bits = 8 if narrow else 16
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-qmax(bits), qmax(bits) + 1, (256, 1024), generator=generator)
    b = torch.randint(-qmax(bits), qmax(bits) + 1, (1024, 256), generator=generator)
    a, b = (a.to(torch.int8), b.to(torch.int8)) if narrow else (a.to(torch.int16), b.to(torch.int16))
    avx2 = _best_seconds(lambda: _avx2_path(a, b, bits_a=bits, bits_b=bits))
    return "avx2" if avx2 < _best_seconds(lambda: _float_path(a, b, bits_a=bits, bits_b=bits)) else "float"


def _best_seconds(product: Callable[[], torch.Tensor]) -> float:
    """Best of three timed calls of ``product``, after one untimed call (packing, dispatch, allocation)."""
    product()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact product of two integer matrices in int64: ``a.to(int64) @ b.to(int64)``.

    Exact as long as every partial sum fits int64 (|sum| < 2**63; 16-bit codes need K > 8.5e9 to get
    there). CUDA has no int64 matmul, so a CUDA operand is multiplied on the CPU and moved back.
    """
    if a.dtype not in _INTEGER_DTYPES or b.dtype not in _INTEGER_DTYPES:
        raise ConfigError(f"reference_mm needs integer operands, not {a.dtype} and {b.dtype}")
    device = a.device
    return (a.cpu().to(torch.int64) @ b.cpu().to(torch.int64)).to(device)


def safe_int_mm(a8: torch.Tensor, b8: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch._int_mm(a8, b8)``: int8 (M, K) @ int8 (K, N) -> int32 (M, N), on any device and shape.

    The shape rules of ``torch._int_mm``, written here because nothing else in qanalyze calls it:

    - CPU (oneDNN): exact with VNNI or AMX, and on a CPU without them (a slow exact kernel); where
      ``ONEDNN_MAX_CPU_ISA`` caps a VNNI CPU below VNNI, oneDNN's kernel saturates, so a float64 GEMM runs
      instead (`qanalyze.cpu.onednn_int8_is_exact`). Any shape (M = 1, K and N not multiples of 8,
      K = 0), row- or column-major, bit-exact against int64 (measured, PyTorch 2.13). Such operands are
      passed as they are: a transposed view is no slower than a contiguous one, and ``.contiguous()``
      would add a copy.
      But an operand whose strides are neither (leading dimension >= columns, 1) nor (1, leading
      dimension >= rows) gives a silently wrong result, uninitialized memory (measured: ``x.t()`` of
      an (N, 1) matrix, strides (1, 1)); ``.contiguous()`` keeps such strides (a size-1 dimension's
      stride does not count), so those operands are copied into a fresh row-major tensor.
    - CUDA (cuBLASLt int8 GEMM): ``_int_mm_out_cuda`` requires M > 16 and K, N positive multiples of
      8, and some transposed layouts give silently wrong results (torchao's ``safe_int_mm`` makes
      mat2 contiguous for that reason). Operands are made contiguous and zero-padded up to the
      nearest admissible shape; zero rows and columns add nothing to any dot product, so the
      corresponding slice of the padded product is exact.

    The accumulator is int32 and wraps silently: the caller keeps ``K * max|a8| * max|b8| < 2**31``.
    ``out``, when given, is an int32 (M, N) tensor that receives the product and is returned.
    """
    if a8.dtype != torch.int8 or b8.dtype != torch.int8:
        raise ConfigError(f"safe_int_mm needs int8 operands, not {a8.dtype} and {b8.dtype}")
    if a8.dim() != 2 or b8.dim() != 2 or a8.shape[1] != b8.shape[0]:
        raise ConfigError(f"safe_int_mm needs (M, K) and (K, N) operands, not {tuple(a8.shape)} and {tuple(b8.shape)}")
    if a8.device.type == "cpu":
        if not onednn_int8_is_exact():
            # oneDNN capped below VNNI saturates 16-bit pair sums; float64 holds every int32 result exactly
            product = (a8.to(torch.float64) @ b8.to(torch.float64)).to(torch.int32)
            return product if out is None else out.copy_(product)
        a8, b8 = _onednn_operand(a8), _onednn_operand(b8)
        return torch._int_mm(a8, b8) if out is None else torch._int_mm(a8, b8, out=out)
    m, n = a8.shape[0], b8.shape[1]
    a_pad, b_pad = _cublas_operands(a8, b8)
    product = torch._int_mm(a_pad, b_pad)[:m, :n]
    return product if out is None else out.copy_(product)


def _onednn_operand(x: torch.Tensor) -> torch.Tensor:
    """x itself when its strides describe a row- or column-major matrix the CPU kernel reads right, else a
    row-major copy. Strides (1, 1) count as row-major only: that is how the kernel reads them (measured
    over every stride pair up to 7 and every shape up to 5 x 3 x 3)."""
    rows, cols = x.shape
    row_stride, col_stride = x.stride()
    row_major = col_stride == 1 and row_stride >= max(1, cols)
    column_major = col_stride != 1 and row_stride == 1 and col_stride >= max(1, rows)
    return x if row_major or column_major else torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _cublas_operands(a8: torch.Tensor, b8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous, zero-padded copies of the operands in a shape cuBLASLt's int8 GEMM accepts."""
    (m, k), n = a8.shape, b8.shape[1]
    m_pad, k_pad, n_pad = max(m, 17), _round_up(max(k, 1), 8), _round_up(max(n, 1), 8)
    a_pad = F.pad(a8, (0, k_pad - k, 0, m_pad - m)) if (m_pad, k_pad) != (m, k) else a8
    b_pad = F.pad(b8, (0, n_pad - n, 0, k_pad - k)) if (k_pad, n_pad) != (k, n) else b8
    return a_pad.contiguous(), b_pad.contiguous()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_operands(a: torch.Tensor, b: torch.Tensor, bits_a: int, bits_b: int) -> None:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"{name} must be a tensor, not {type(x).__name__}")
        if x.dtype not in _INTEGER_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in _INTEGER_DTYPES)
            raise ConfigError(f"{name} must hold integer codes ({names}), not {x.dtype}")
        if x.dim() != 2:
            raise ConfigError(f"{name} must be a matrix (2-D), not {x.dim()}-D with shape {tuple(x.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ConfigError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not chain: a has {a.shape[1]} columns, "
                          f"b has {b.shape[0]} rows")
    if a.device != b.device:
        raise ConfigError(f"a is on {a.device} and b on {b.device}")
    qmax(bits_a)  # raises ConfigError outside 2..16
    qmax(bits_b)


# ---------------------------------------------------------------------------------------------------------------------
# paths


@_register("reference")
def _reference_path(a: torch.Tensor, b: torch.Tensor, *, bits_a: int, bits_b: int) -> torch.Tensor:
    return reference_mm(a, b)


@_register("int8")
def _int8_path(a: torch.Tensor, b: torch.Tensor, *, bits_a: int, bits_b: int) -> torch.Tensor:
    if max(bits_a, bits_b) > 8:
        raise ConfigError(f"the int8 path multiplies codes of at most 8 bits, not {bits_a} x {bits_b}; "
                          f"use path='split' (or 'auto')")
    return _narrow_mm(a, b, bits_a, bits_b, safe_int_mm)


def _narrow_mm(a: torch.Tensor, b: torch.Tensor, bits_a: int, bits_b: int, mm: _Int8Mm) -> torch.Tensor:
    """a @ b for codes of <= 8 bits through one int8 GEMM ``mm`` per chunk of K that keeps int32 exact."""
    # values of <= 8-bit codes fit int8 whatever the dtype, so the conversion is exact
    a8 = a if a.dtype == torch.int8 else a.to(torch.int8)
    b8 = b if b.dtype == torch.int8 else b.to(torch.int8)
    step = _INT32_MAX // (qmax(bits_a) * qmax(bits_b))
    if a8.shape[1] <= step:
        return mm(a8, b8)
    return _sum_k_chunks(lambda x, y: mm(x, y), a8, b8, step)


@_register("avx2")
def _avx2_path(a: torch.Tensor, b: torch.Tensor, *, bits_a: int, bits_b: int) -> torch.Tensor:
    if a.device.type != "cpu" or avx2_int8_mm_op() is None:
        raise ConfigError(f"the avx2 path needs CPU operands and the AVX2 int8 kernel, which this machine "
                          f"cannot build or run (operands on {a.device})")
    if max(bits_a, bits_b) <= 8:
        return _narrow_mm(a, b, bits_a, bits_b, _avx2_mm)
    step = _split_k_step(bits_a, bits_b)
    if a.shape[1] <= step:
        return _split_mm(a, b, bits_a, bits_b, _avx2_mm)
    return _sum_k_chunks(lambda x, y: _split_mm(x, y, bits_a, bits_b, _avx2_mm), a, b, step)


def _avx2_mm(a8: torch.Tensor, b8: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The AVX2 kernel with `safe_int_mm`'s signature (``out`` receives a copy: the kernel allocates)."""
    product = avx2_int8_mm_op()(a8, b8)
    return product if out is None else out.copy_(product)


@_register("float")
def _float_path(a: torch.Tensor, b: torch.Tensor, *, bits_a: int, bits_b: int) -> torch.Tensor:
    out = _float_exact(a, b, bits_a, bits_b)
    return out.to(torch.int32 if a.shape[1] * qmax(bits_a) * qmax(bits_b) <= _INT32_MAX else torch.int64)


def _float_exact(a: torch.Tensor, b: torch.Tensor, bits_a: int, bits_b: int) -> torch.Tensor:
    """The exact integer a @ b held in float32 or float64 (one GEMM), or int64 (chunks of K summed): the
    ``float`` path before its integer dtype, which `int_mm_scaled` converts to float32 directly (rounding the
    same exact integer to nearest as the int32 / int64 route would)."""
    per_product = qmax(bits_a) * qmax(bits_b)
    k = a.shape[1]
    step = _FLOAT32_EXACT // per_product
    dtype = torch.float32 if step >= min(k, _FLOAT32_MIN_STEP) and _float32_is_exact(a.device) else torch.float64
    if dtype == torch.float64:
        step = _FLOAT64_EXACT // per_product
    # .to() keeps a transposed view's layout: BLAS reads it as it is
    if k <= step:
        return a.to(dtype) @ b.to(dtype)
    # each chunk's float product is an exact integer, so its int64 copy is too
    return _sum_k_chunks(lambda x, y: (x.to(dtype) @ y.to(dtype)).to(torch.int64), a, b, step)


def _float32_is_exact(device: torch.device) -> bool:
    """Whether float32 GEMMs on ``device`` run in full float32 (no bfloat16 or TF32 inputs, which round the
    codes' products)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    backend = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return False
    return getattr(backend, "fp32_precision", "none") in ("none", "ieee")


@_register("split")
def _split_path(a: torch.Tensor, b: torch.Tensor, *, bits_a: int, bits_b: int) -> torch.Tensor:
    step = _split_k_step(bits_a, bits_b)
    if a.shape[1] <= step:
        return _split_mm(a, b, bits_a, bits_b)
    return _sum_k_chunks(lambda x, y: _split_mm(x, y, bits_a, bits_b), a, b, step)


def _sum_k_chunks(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                  step: int) -> torch.Tensor:
    """Sum in int64 of ``product`` over chunks of at most ``step`` columns of a (rows of b)."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for start in range(0, a.shape[1], step):
        out += product(a[:, start:start + step], b[start:start + step])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the split path


@dataclass(frozen=True)
class _Operand:
    """One side of the product as int8 digits: ``x = sum(256**e * digit_e) (+ 128 if offset)``."""

    digits: dict[int, torch.Tensor]  # exponent -> int8 tensor with x's shape
    offset: bool


@dataclass(frozen=True)
class _Level:
    """The terms of one power of 256 in the product: one int_mm (terms stacked along K) plus corrections."""

    a: torch.Tensor  # int8 (M, K * terms)
    b: torch.Tensor  # int8 (K * terms, N)
    row: torch.Tensor | None  # int32 (M, 1), added to every column
    col: torch.Tensor | None  # int32 (1, N), added to every row
    bound: int  # largest |a @ b + row + col|


def _hi_bound(bits: int) -> int:
    # hi = floor(x / 256) with the offset, floor((x + 128) / 256) without (then x <= 32639), for |x| <= qmax
    top = qmax(bits)
    return max(-((-top) >> _DIGIT_BITS), (min(top, _SIGNED_SPLIT_MAX) + _OFFSET) >> _DIGIT_BITS)


def _per_k_bounds(bits_a: int, bits_b: int) -> dict[int, int]:
    """Exponent -> largest |level| / K in :func:`_levels` (products plus corrections), from the bits alone."""
    def digit_bounds(bits: int) -> dict[int, int]:
        return {0: qmax(bits)} if bits <= 8 else {1: _hi_bound(bits), 0: _OFFSET}

    da, db = digit_bounds(bits_a), digit_bounds(bits_b)
    offset_a, offset_b = bits_a > 8, bits_b > 8
    per_k: dict[int, int] = {}
    for ea, bound_a in da.items():
        for eb, bound_b in db.items():
            per_k[ea + eb] = per_k.get(ea + eb, 0) + bound_a * bound_b
    for e, bound in da.items():
        per_k[e] += _OFFSET * bound if offset_b else 0
    for e, bound in db.items():
        per_k[e] += _OFFSET * bound if offset_a else 0
    if offset_a and offset_b:
        per_k[0] += _OFFSET * _OFFSET
    return per_k


def _split_k_step(bits_a: int, bits_b: int) -> int:
    """The largest K for which every level of :func:`_split_mm` fits int32 (32767 at 16 x 16 bits)."""
    return _INT32_MAX // max(_per_k_bounds(bits_a, bits_b).values())


def _empty_like_layout(shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """An empty int8 (rows, cols) tensor, column-major when ``like`` is (a transposed view), so that
    elementwise ops from ``like`` into it read and write memory in order."""
    if like.stride(0) == 1 and like.stride(1) != 1:
        return torch.empty(shape[::-1], dtype=torch.int8, device=like.device).t()
    return torch.empty(shape, dtype=torch.int8, device=like.device)


def _digits(x: torch.Tensor, bits: int, dim: int, hi_first: bool) -> tuple[torch.Tensor, _Operand]:
    """x cut into two int8 digits (if wider than 8 bits), stacked along ``dim`` (hi then lo, or lo then hi)
    in one buffer. Returns the stacked buffer and the operand whose digits are views into it.

    Signed split ``x = 256 * hi + lo`` (lo = x mod 256 in [-128, 127]) when every value is at most
    32639, which needs no correction; else ``x = 256 * hi + lo + 128`` (lo = (x mod 256) - 128,
    hi = floor(x / 256)), which holds every int16 value. Only 16-bit codes can need the offset; a
    16-bit dynamic fixed-point code never does (|q| <= 2**14).
    """
    if bits <= 8:
        x8 = x if x.dtype == torch.int8 else x.to(torch.int8)
        return x8, _Operand({0: x8}, offset=False)
    if x.dtype == torch.int8:
        x = x.to(torch.int16)  # x + 128 below must not wrap
    offset = x.numel() > 0 and int(x.max()) > _SIGNED_SPLIT_MAX
    k = x.shape[dim]
    shape = (x.shape[0] * 2, x.shape[1]) if dim == 0 else (x.shape[0], x.shape[1] * 2)
    stacked = _empty_like_layout(shape, x)
    first, second = stacked.narrow(dim, 0, k), stacked.narrow(dim, k, k)
    hi, lo = (first, second) if hi_first else (second, first)
    # int -> int8 conversion keeps x mod 256 (two's complement); out=... would instead cast through a
    # temporary that loses a transposed layout (10x slower, measured)
    lo.copy_(x)
    if offset:
        hi.copy_(torch.bitwise_right_shift(x, _DIGIT_BITS))
        lo.bitwise_xor_(-_OFFSET)  # flipping the sign bit subtracts 128 mod 256
    else:
        hi.copy_(torch.add(x, _OFFSET).bitwise_right_shift_(_DIGIT_BITS))  # (x - lo) / 256, rounded
    return stacked, _Operand({1: hi, 0: lo}, offset=offset)


def _levels(a: torch.Tensor, b: torch.Tensor, bits_a: int, bits_b: int, mm: _Int8Mm) -> list[_Level]:
    """The product as ``sum(256**e * (A_e @ B_e + row_e + col_e))``, highest exponent first.

    With a = a' + 128 (a' the digit sum, when a is split) and likewise b:
    a @ b = a' @ b' + 128 * rowsum(a') [if b is split] + 128 * colsum(b') [if a is split] + 128 * 128 * K
    [if both]. Each digit's row or column sum lands at the digit's exponent, so every level's terms
    stay as small as its products and fit int32 together for K <= _split_k_step.
    """
    k = a.shape[1]
    per_k = _per_k_bounds(bits_a, bits_b)
    # row and column sums of the digits as int8 GEMMs: 30x faster than sum(dtype=...), which converts first
    ones_k = torch.ones(1, k, dtype=torch.int8, device=a.device)
    a_stack, da = _digits(a, bits_a, dim=1, hi_first=True)
    b_stack, db = _digits(b, bits_b, dim=0, hi_first=False)
    top = max(da.digits) + max(db.digits)
    levels = []
    for e in range(top, -1, -1):
        pairs = [(ea, e - ea) for ea in sorted(da.digits, reverse=True) if e - ea in db.digits]
        if len(pairs) == 1:
            (ea, eb), = pairs
            a_e, b_e = da.digits[ea], db.digits[eb]
        else:  # the two cross terms hi @ lo + lo @ hi, stacked along K: [hi_a | lo_a] @ [lo_b ; hi_b]
            a_e, b_e = a_stack, b_stack
        row = col = None
        if db.offset and e in da.digits:
            row = mm(da.digits[e], ones_k.t()).mul_(_OFFSET)
        if da.offset and e in db.digits:
            col = mm(ones_k, db.digits[e]).mul_(_OFFSET)
        if e == 0 and da.offset and db.offset:
            row += _OFFSET * _OFFSET * k
        levels.append(_Level(a_e, b_e, row, col, k * per_k[e]))
    return levels


def _split_mm(a: torch.Tensor, b: torch.Tensor, bits_a: int, bits_b: int,
              mm: _Int8Mm = safe_int_mm) -> torch.Tensor:
    """Exact a @ b through int8 digits multiplied by ``mm``, int32 when its bound fits, else int64;
    K <= ``_split_k_step``.

    The levels are combined by Horner's rule, ``acc = 256 * acc + level``, one block of rows at a
    time so that a block's partial products are still in cache when they are combined. ``acc`` stays
    int32 while its bound allows and only then moves to int64, whose ops cost two to five times more
    here: at K = 384 a 16 x 16 product needs int64 for its last level only, an 8 x 16 product not at all.
    """
    levels = _levels(a, b, bits_a, bits_b, mm)
    bounds = list(itertools.accumulate((level.bound for level in levels), lambda acc, x: acc * _RADIX + x))
    narrow = [bound <= _INT32_MAX for bound in bounds]  # once False, False for every lower level
    m, n = a.shape[0], b.shape[1]
    out = torch.empty(m, n, dtype=torch.int32 if narrow[-1] else torch.int64, device=a.device)
    rows = m if a.device.type != "cpu" else max(1, min(m, _BLOCK_ELEMENTS // max(n, 1)))
    partials = [torch.empty(rows, n, dtype=torch.int32, device=a.device) for _ in levels[:-1]]
    last = None if narrow[-1] else torch.empty(rows, n, dtype=torch.int32, device=a.device)
    wide = None if narrow[-1] else torch.empty(rows, n, dtype=torch.int64, device=a.device)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        block = out[start:stop]
        # an int32 result is accumulated in place in the output: no final copy
        buffers = [*partials, block if last is None else last]
        acc = block
        for i, (level, buffer) in enumerate(zip(levels, buffers)):
            p = mm(level.a[start:stop], level.b, out=buffer[: stop - start])
            if level.row is not None:
                p += level.row[start:stop]
            if level.col is not None:
                p += level.col
            if i == 0:
                acc = p
            elif narrow[i]:
                acc = p.add_(acc, alpha=_RADIX)
            else:
                if narrow[i - 1]:
                    acc = block.copy_(acc)
                # one fused op: mixed int32 + int64 would convert p into a temporary anyway
                torch.add(wide[: stop - start].copy_(p), acc, alpha=_RADIX, out=acc)
        if acc is not block:
            block.copy_(acc)
    return out
