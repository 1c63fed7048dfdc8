"""An exact int8 GEMM for x86 CPUs with AVX2 but no VNNI, compiled on first use from ``csrc/avx2_int8_gemm.cpp``.

On such CPUs ``torch._int_mm`` has no fast kernel (oneDNN's AVX2 int8 GEMM sums pairs of u8 x s8 products in
saturating 16-bit lanes, ``vpmaddubsw``, which is not exact for signed 8-bit codes on both sides). The compiled
kernel multiplies int16 lanes and sums pairs in int32 (``vpmaddwd``): ``2 * 127 * 127`` never saturates, so the
product is the exact integer one for every pair of 8-bit codes. It accumulates in int32, so the caller keeps
``K * max|a| * max|b| < 2**31`` (K <= 133,143 at 8 x 8 bits).

The kernel is built with the machine's C++ compiler through ``torch.utils.cpp_extension`` (about 10 s, once;
PyTorch caches the library and rebuilds only when the source changes). Where it cannot be built (no compiler,
no AVX2, not x86) :func:`avx2_int8_mm_op` warns once and returns None, and the engine keeps its other paths.

The same library holds a second, slower kernel that the engine does not use, kept to measure (issue 26's second
way, ``benchmarks/kernels_matmul.py --variants avx2u_8x8``): ``vpmaddubsw`` (u8 x s8, pair sums in saturating
int16) made exact by offsetting A to unsigned and cutting it into 4-bit digits, 8 steps summed in int16 before
widening. Per instruction it does as many 8-bit multiply-adds as ``vpmaddwd`` (two digit products per product)
plus the widening, and measured 1.0-1.3x the ``vpmaddwd`` kernel's time, never less: see :data:`KERNEL_VARIANTS`.

And it holds the fused ops around the products (issue 26's third way, :data:`LIBRARY_OPS`): the rescale of the
int32 product in the GEMM's epilogue, and quantization (divide, round, clamp, cast) in one pass.
"""

from __future__ import annotations

import functools
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "avx2_int8_gemm.cpp"
"""The kernel's C++ source."""

_LIBRARY_NAME = "qanalyze_avx2_int8_gemm"

KERNEL_VARIANTS = {"madd": "int8_mm", "maddubs4": "int8_mm_u4"}
"""Kernel variant -> op name in the library: ``madd`` (``vpmaddwd`` on int16 lanes, the one the ``avx2`` path
uses) and ``maddubs4`` (``vpmaddubsw`` on 4-bit digits of A + 128; exact too, measured slower, benchmarks only)."""


LIBRARY_OPS = ("int8_mm_scaled", "quantize_codes", "layer_norm_codes")
"""The library's fused ops around the GEMM (issue 26's third way), both bit-identical to the torch ops they
replace: ``int8_mm_scaled(a8, b8, row_scale, col_scale, bias) -> float32``, the ``madd`` kernel with
``float32(acc) * (row_scale[i] * col_scale[j]) + bias[j]`` done in its epilogue, in the int32 result's memory
while a block of rows is in cache; ``quantize_codes(x, scale, qmax, levels) -> int8 / int16``,
`qanalyze.engine.functions.integer_codes` (nearest, or stochastic from the int16 levels that
`qanalyze.quant.primitives.uniform_noise` maps to its draws) in one pass over float32 ``x``;
``layer_norm_codes(q, scale, gamma, bias, eps) -> (xhat, y, rstd)``, the integer layer norm's forward after its
quantization (exact int64 sums, then torch's double operations in torch's order) in one pass over the codes."""


class Avx2KernelWarning(UserWarning):
    """The AVX2 int8 kernel could not be built or loaded; the engine falls back to its other paths."""


def avx2_available() -> bool:
    """Whether this CPU is x86 with AVX2, the one instruction set the kernel needs."""
    return platform.machine().lower() in ("x86_64", "amd64") and bool(torch.cpu._is_avx2_supported())


@functools.cache
def avx2_int8_mm_op() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The compiled ``op(a8, b8) -> int32`` (int8 (M, K) @ int8 (K, N), any strides, CPU), built on the first
    call; None, with one :class:`Avx2KernelWarning`, where this machine cannot build or run it."""
    if not avx2_available():
        return None
    try:
        from torch.utils.cpp_extension import load

        # -ffp-contract=off: the fused epilogue and quantization must round each float operation on its own, as the
        # torch ops they replace do (an FMA would round a * b + c once and change the last bit).
        # -fopenmp turns at::parallel_for's pragma on (without it the kernel runs on one thread: measured 1.0x
        # from 1 to 2 threads, 2.0x with it); libgomp is not linked: its symbols resolve to the OpenMP runtime
        # torch has already loaded, so there is one thread pool, not two
        load(name=_LIBRARY_NAME, sources=[str(SOURCE)],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"], is_python_module=False,
             verbose=False)
        return torch.ops.qanalyze_avx2.int8_mm
    except Exception as exc:  # a compiler or toolchain failure of any kind: the other paths still work
        # why: warnings.warn, not print; one line, like every message qanalyze gives
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        warnings.warn(f"the AVX2 int8 kernel could not be built ({reason}); using the other integer GEMM paths",
                      Avx2KernelWarning, stacklevel=2)
        return None


def avx2_library_op(name: str) -> Callable[..., torch.Tensor] | None:
    """The library's op ``name`` (`LIBRARY_OPS`), built like :func:`avx2_int8_mm_op`; None where that cannot be
    built."""
    if avx2_int8_mm_op() is None:
        return None
    return getattr(torch.ops.qanalyze_avx2, name)


def avx2_int8_mm_variant(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The compiled op of kernel variant ``name`` (a key of :data:`KERNEL_VARIANTS`), built like
    :func:`avx2_int8_mm_op`; None where that cannot be built."""
    if avx2_int8_mm_op() is None:
        return None
    return getattr(torch.ops.qanalyze_avx2, KERNEL_VARIANTS[name])
