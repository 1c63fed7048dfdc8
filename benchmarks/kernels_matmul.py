"""Integer GEMM paths against an FP32 matmul of the same shapes and layouts, in the same run.

The six products of one training step of MiniLM-L6's feed-forward layers at 2048 tokens (batch 32 x
64 tokens): for each of the 384 -> 1536 and 1536 -> 384 linears, the forward ``X @ W.t()``, the input
gradient ``G @ W`` and the weight gradient ``G.t() @ X``, with the operand layouts the engine passes
(``W.t()`` and ``G.t()`` are transposed views). For each: the median time of FP32 ``torch.matmul``,
the ``int8`` path (8 x 8 bits), the ``split`` path at 8 x 16 and 16 x 16 bits, and the ``float`` path (the
same integers through float BLAS) at all three, and their ratio to FP32. Each integer result is checked
against ``reference_mm`` once before timing (``--no-check`` skips). The first line says which path ``auto``
takes on this machine (`qanalyze.engine.kernels.int8_gemm_is_fast`).

    .venv/bin/python benchmarks/kernels_matmul.py [--repeats 30] [--threads N] [--variants int8,float8x8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qanalyze.engine.kernels import int8_gemm_is_fast, int_mm, reference_mm

TOKENS = 2048
VARIANTS = {"int8": ("int8 8x8", 8, 8, "int8"), "split8x16": ("split 8x16", 8, 16, "split"),
            "split16x16": ("split 16x16", 16, 16, "split"), "float8x8": ("float 8x8", 8, 8, "float"),
            "float8x16": ("float 8x16", 8, 16, "float"), "float16x16": ("float 16x16", 16, 16, "float")}
"""Option name -> (label, bits_a, bits_b, kernel path)."""
LAYERS = ((384, 1536), (1536, 384))  # (in, out) of the feed-forward up and down projections


def _codes(shape: tuple[int, int], bits: int, generator: torch.Generator) -> torch.Tensor:
    top = 2 ** (bits - 1) - 1
    dtype = torch.int8 if bits <= 8 else torch.int16
    return torch.randint(-top, top + 1, shape, generator=generator, dtype=torch.int32).to(dtype)


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's own)")
    parser.add_argument("--no-check", action="store_true", help="skip the exactness check against reference_mm")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"among {', '.join(VARIANTS)}")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    def make(shape: tuple[int, int], bits: int | None) -> torch.Tensor:
        if bits is None:
            return torch.randn(shape, generator=generator)
        return _codes(shape, bits, generator)

    variants = [VARIANTS[name] for name in args.variants.split(",")]
    fast = int8_gemm_is_fast("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median (min) of {args.repeats} calls, ms; "
          f"int8 GEMMs {'fast' if fast else 'slow'} here: auto takes {'int8 / split' if fast else 'float'}")
    header = f"{'product':44} {'fp32':>15}" + "".join(f" {name:>15} {'/fp32':>6}" for name, *_ in variants)
    print(header)
    ratios: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for fan_in, fan_out in LAYERS:
        for label, operands in _products(fan_in, fan_out).items():
            fa, fb = operands(make, None, None)
            fp32, fp32_min = _median_ms(lambda fa=fa, fb=fb: torch.matmul(fa, fb), args.repeats, args.warmup)
            row = f"{label:44} {fp32:7.2f} ({fp32_min:5.2f})"
            for name, bits_a, bits_b, path in variants:
                a, b = operands(make, bits_a, bits_b)

                def run(a: torch.Tensor = a, b: torch.Tensor = b, bits_a: int = bits_a, bits_b: int = bits_b,
                        path: str = path) -> torch.Tensor:
                    return int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path=path)

                if not args.no_check and not torch.equal(run().to(torch.int64), reference_mm(a, b)):
                    raise SystemExit(f"{name} is not exact on {label}")
                ms, ms_min = _median_ms(run, args.repeats, args.warmup)
                ratios[name].append(ms / fp32)
                row += f" {ms:7.2f} ({ms_min:5.2f}) {ms / fp32:6.2f}"
            print(row)
    print("geometric mean of the ratios to fp32: " + ", ".join(
        f"{name} {statistics.geometric_mean(values):.2f}" for name, values in ratios.items()))


if __name__ == "__main__":
    main()
