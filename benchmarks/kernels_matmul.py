"""Integer GEMM paths against an FP32 matmul of the same shapes and layouts, in the same run.

The six products of one training step of MiniLM-L6's feed-forward layers at 2048 tokens (batch 32 x 64 tokens):
for each of the 384 -> 1536 and 1536 -> 384 linears, the forward ``X @ W.t()``, the input gradient ``G @ W`` and
the weight gradient ``G.t() @ X``, with the operand layouts the engine passes (``W.t()`` and ``G.t()`` are
transposed views). For each: the median time, over rounds that call each once (interleaved), of FP32
``torch.matmul``, the ``int8`` path (8 x 8 bits), the ``split`` path at 8 x 16 and 16 x 16 bits, the ``float``
path (the same integers through float BLAS) and the ``avx2`` path (the compiled AVX2 kernel,
`qanalyze.engine.avx2_gemm`) at all three, and their ratio to FP32. Each integer result is checked against
``reference_mm`` once before timing (``--no-check`` skips). Two alternatives that are NOT exact for signed 8-bit
codes on both sides are timed for comparison (``--variants qlinear7,int_mm_raw``):
``torch.ops.quantized.linear`` on the ``x86`` engine (u8 x s8, prepacked weight), exact only for activations of
7 bits unsigned, fed |X| here; and bare ``torch._int_mm``, which a oneDNN capped below VNNI runs with saturating
16-bit pair sums. The first lines give the CPU's flags, the environment that emulates another CPU
(``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``) and which path ``auto`` takes
here.

    .venv/bin/python benchmarks/kernels_matmul.py [--repeats 30] [--threads N] [--variants int8,float8x8,avx2_8x8]

Measured (issue 26), AMD EPYC with AVX-512 VNNI, machine shared (not idle), geometric means of the six ratios
to fp32, interleaved rounds of 10, ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2``: 2 threads: avx2 8x8 0.73, float 8x8 1.19, int8 8x8 2.08 (safe_int_mm's float64
stand-in: the capped ``torch._int_mm`` is fast, 0.47, but not exact, so this emulation does NOT reproduce an AVX2
CPU's slow ``_int_mm``), avx2 16x16 3.56, float 16x16 2.13, split 16x16 9.73, quantized.linear x86 0.25 (FBGEMM
ignores the oneDNN cap and runs VNNI here: not an AVX2 figure); 1 thread: avx2 8x8 0.66, float 8x8 0.98.
Issue 26's second way, ``--variants avx2_8x8,avx2u_8x8,float8x8`` under the same caps, machine idle: 2 threads
(``--repeats 20``) avx2 8x8 0.70, avx2u 8x8 0.84 (``vpmaddubsw`` on 4-bit digits, exact; 1.08-1.29x the
``vpmaddwd`` kernel's time on each product), float 8x8 1.22; 1 thread (``--repeats 10``) 0.76, 0.81 (0.99-1.24x),
1.13. Never faster than the ``vpmaddwd`` kernel, so the ``avx2`` path does not use it.
Without the caps (VNNI, 2 threads): int8 8x8 0.28, auto takes int8 / split as before.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from qanalyze.engine import kernels
from qanalyze.engine.avx2_gemm import avx2_int8_mm_variant
from qanalyze.engine.kernels import int_mm, reference_mm

TOKENS = 2048
VARIANTS = {"int8": ("int8 8x8", 8, 8, "int8"), "split8x16": ("split 8x16", 8, 16, "split"),
            "split16x16": ("split 16x16", 16, 16, "split"), "float8x8": ("float 8x8", 8, 8, "float"),
            "float8x16": ("float 8x16", 8, 16, "float"), "float16x16": ("float 16x16", 16, 16, "float"),
            "avx2_8x8": ("avx2 8x8", 8, 8, "avx2"), "avx2_8x16": ("avx2 8x16", 8, 16, "avx2"),
            "avx2_16x16": ("avx2 16x16", 16, 16, "avx2"), "avx2u_8x8": ("avx2u 8x8", 8, 8, "avx2u"),
            "qlinear7": ("qlinear x86 7b", 7, 8, "qlinear"), "int_mm_raw": ("_int_mm raw", 8, 8, "int_mm_raw"),
            "avx2s_8x8": ("avx2 8x8 scaled", 8, 8, "avx2s"), "avx2r_8x8": ("avx2 8x8 +torch", 8, 8, "avx2r")}
"""Option name -> (label, bits_a, bits_b, kernel path); ``qlinear`` and ``int_mm_raw`` are not int_mm paths
(see the module docstring) and are not checked for exactness; ``avx2u`` is the AVX2 library's ``maddubs4``
kernel through the ``avx2`` path's K chunking (`_avx2u`), checked like the paths; ``avx2s`` is the product as the
engine takes it, rescaled to float32 (`kernels.int_mm_scaled`, the rescale in the kernel's epilogue), and
``avx2r`` the same values as before issue 26's third way (``int_mm(...).to(float32).mul_(scale)``), both
checked against the rescaled ``reference_mm``."""
DEFAULT_VARIANTS = "int8,split8x16,split16x16,float8x8,float8x16,float16x16,avx2_8x8,avx2_8x16,avx2_16x16"
ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "QANALYZE_KERNEL")
"""Environment variables that change which kernels run, printed with every table."""
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
LAYERS = ((384, 1536), (1536, 384))  # (in, out) of the feed-forward up and down projections


def _codes(shape: tuple[int, int], bits: int, generator: torch.Generator) -> torch.Tensor:
    top = 2 ** (bits - 1) - 1
    dtype = torch.int8 if bits <= 8 else torch.int16
    return torch.randint(-top, top + 1, shape, generator=generator, dtype=torch.int32).to(dtype)


def _interleaved_ms(fns: list[Callable[[], object]], repeats: int, warmup: int) -> list[tuple[float, float]]:
    """(median, min) ms of each function, timed round robin (one call of each per round) so that drifting load
    from other processes hits every function alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [(statistics.median(spent) * 1e3, min(spent) * 1e3) for spent in times]


def _products(fan_in: int, fan_out: int) -> dict[str, Callable[[Callable], tuple]]:
    """Name -> function(make(shape, bits) -> tensor) giving the (a, b) operands of that product."""
    return {
        f"fwd   X@W.t()  {TOKENS}x{fan_in} @ {fan_in}x{fan_out}":
            lambda make, ba, bb: (make((TOKENS, fan_in), ba), make((fan_out, fan_in), bb).t()),
        f"dX    G@W      {TOKENS}x{fan_out} @ {fan_out}x{fan_in}":
            lambda make, ba, bb: (make((TOKENS, fan_out), ba), make((fan_out, fan_in), bb)),
        f"dW    G.t()@X  {fan_out}x{TOKENS} @ {TOKENS}x{fan_in}":
            lambda make, ba, bb: (make((TOKENS, fan_out), ba).t(), make((TOKENS, fan_in), bb)),
    }


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return f"{model}; " + " ".join(flag for flag in FLAGS if flag in flags)


def _qlinear(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    """torch.ops.quantized.linear on the x86 engine: |a| as quint8 (7-bit values), b.t() prepacked as qint8."""
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized tensor API's deprecation warning
        x = torch.quantize_per_tensor(a.abs().float().contiguous(), 1.0, 0, torch.quint8)
        packed = torch.ops.quantized.linear_prepack(
            torch.quantize_per_tensor(b.t().float().contiguous(), 1.0, 0, torch.qint8), None)
    return lambda: torch.ops.quantized.linear(x, packed, 1.0, 0)


def _avx2u(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The ``maddubs4`` kernel variant (`qanalyze.engine.avx2_gemm.KERNEL_VARIANTS`) on 8-bit codes, through the
    same int32-safe K chunking as the ``avx2`` path, so that it is timed as that path would run it."""
    op = avx2_int8_mm_variant("maddubs4")
    if op is None:
        raise SystemExit("avx2u: the AVX2 kernel cannot be built on this machine")
    return lambda: kernels._narrow_mm(a, b, 8, 8, op)


_SCALE = torch.tensor(2.0**-12)  # a power of two: the check's float32 values are exact


def _rescaled(a: torch.Tensor, b: torch.Tensor, path: str) -> Callable[[], torch.Tensor]:
    """``avx2s`` (`kernels.int_mm_scaled`) or ``avx2r`` (int_mm, then torch's conversion and multiply)."""
    if path == "avx2s":
        return lambda: kernels.int_mm_scaled(a, b, bits_a=8, bits_b=8, col_scale=_SCALE, path="avx2")
    return lambda: int_mm(a, b, bits_a=8, bits_b=8, path="avx2").to(torch.float32).mul_(_SCALE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each before the rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's own)")
    parser.add_argument("--no-check", action="store_true", help="skip the exactness check against reference_mm")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"among {', '.join(VARIANTS)}")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    def make(shape: tuple[int, int], bits: int | None) -> torch.Tensor:
        if bits is None:
            return torch.randn(shape, generator=generator)
        return _codes(shape, bits, generator)

    variants = [VARIANTS[name] for name in args.variants.split(",")]
    cpu = torch.device("cpu")
    auto = f"{kernels._auto_path(8, 8, cpu)} at 8x8, {kernels._auto_path(16, 16, cpu)} at 16x16"
    print(f"cpu: {_cpu_flags()}")
    print("env: " + " ".join(f"{name}={os.environ.get(name, '')}" for name in ENV))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median (min) of {args.repeats} calls, ms; "
          f"torch._int_mm {'fast' if kernels.int8_gemm_is_fast(cpu) else 'slow'} here; auto takes {auto}")
    header = f"{'product':44} {'fp32':>15}" + "".join(f" {name:>15} {'/fp32':>6}" for name, *_ in variants)
    print(header)
    ratios: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for fan_in, fan_out in LAYERS:
        for label, operands in _products(fan_in, fan_out).items():
            fa, fb = operands(make, None, None)
            runs: list[Callable[[], object]] = [lambda fa=fa, fb=fb: torch.matmul(fa, fb)]
            for name, bits_a, bits_b, path in variants:
                a, b = operands(make, bits_a, bits_b)

                def run(a: torch.Tensor = a, b: torch.Tensor = b, bits_a: int = bits_a, bits_b: int = bits_b,
                        path: str = path) -> torch.Tensor:
                    return int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path=path)

                if path == "avx2u":
                    run = _avx2u(a, b)  # and checked below like the int_mm paths
                if path in ("avx2s", "avx2r"):
                    run = _rescaled(a, b, path)
                    want = reference_mm(a, b).to(torch.float32).mul_(_SCALE)
                    if not args.no_check and not torch.equal(run(), want):
                        raise SystemExit(f"{name} is not exact on {label}")
                elif path == "qlinear":
                    run = _qlinear(a, b)
                elif path == "int_mm_raw":
                    run = lambda a=a, b=b: torch._int_mm(a, b)  # noqa: E731
                elif not args.no_check and not torch.equal(run().to(torch.int64), reference_mm(a, b)):
                    raise SystemExit(f"{name} is not exact on {label}")
                runs.append(run)
            (fp32, fp32_min), *timed = _interleaved_ms(runs, args.repeats, args.warmup)
            row = f"{label:44} {fp32:7.2f} ({fp32_min:5.2f})"
            for (name, *_), (ms, ms_min) in zip(variants, timed):
                ratios[name].append(ms / fp32)
                row += f" {ms:7.2f} ({ms_min:5.2f}) {ms / fp32:6.2f}"
            print(row)
    print("geometric mean of the ratios to fp32: " + ", ".join(
        f"{name} {statistics.geometric_mean(values):.2f}" for name, values in ratios.items()))


if __name__ == "__main__":
    main()
