"""Issue 5 target: training step time of the integer engine against the FP32 loop, in one run.

minilm-l6 with a fresh SST-2 head, the same 32-sentence batches (max length 64, real SST-2 text)
for every row, a full step each (forward, backward, clipping, AdamW). Rows: FP32; integer mode
with a uniform 8-bit plan (W8 A8 G8; one scale per tensor, and `uniform:8:channel`'s per-row weight
and per-token input scales) and a uniform 16-bit plan; QAT at 8 bits. Targets: int8 at
most 0.7x the FP32 step, int16 at most 1.5x. Rows are interleaved (round robin over the modes) so
drifting machine load hits every mode alike; the median over steps is reported. Every row uses the
optimizer `qanalyze train` uses (`qanalyze.engine.train.adamw`, fused AdamW on CPU); one more FP32 row
with PyTorch's default per-tensor AdamW loop shows what the fused kernel saves.

``--kernels float,avx2`` repeats each integer row once per integer GEMM path, with ``QANALYZE_KERNEL`` set to
that path during the row's steps only (`qanalyze.engine.kernels.KERNEL_ENV`), so paths compare in one run; a
name ending in ``/unfused`` (``avx2/unfused``) runs that path without the compiled fused quantization and
rescaling (the torch ops, as before issue 26's third way), so before and after compare in one run too. The
first lines give the CPU's flags and the environment that emulates another CPU (see kernels_matmul.py).

    .venv/bin/python benchmarks/train_step.py --steps 20 [--kernels auto,float,avx2] [--threads N]

Measured (issue 26), AMD EPYC with AVX-512 VNNI, machine shared (not idle), medians of interleaved steps. AVX2
emulated (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``), ``--steps 10
--warmup 1 --kernels float,avx2``, 2 threads: int W8A8G8 1.42x fp32 with float, 1.14x with avx2; channel 1.61x /
1.22x; int W16A16G16 2.06x / 3.38x (auto keeps float above 8 bits). 1 thread (``--steps 8``): int W8A8G8 1.37x /
1.08x, channel 1.45x / 1.16x, W16A16G16 2.15x / 3.05x. torch.profiler, 1 thread, 2 int W8A8G8 avx2 steps: the
kernel 54 % of the time (898 ms against 1180 ms of FP32 mm / addmm), quantization and copies most of the rest.
Targets 0.7x (issue 26: 0.8x) and 1.5x missed on AVX2. Without the caps (VNNI, 1 thread, ``--steps 8``): int
W8A8G8 0.64x, W16A16G16 1.44x.
Issue 26's third way (fused quantization, rescale in the kernel's epilogue, fused layer norm forward), same caps,
machine idle, ``--steps 8 --warmup 1 --kernels float,avx2/unfused,avx2``, 2 threads: int W8A8G8 1.13x fp32 before
(avx2/unfused) and 1.02x after, channel 1.22x / 1.05x, W8A8G8 on the float path 1.33x, int W16A16G16 (float) 2.00x;
1 thread (``--steps 6``): 0.97x / 0.88x, channel 1.11x / 0.92x, float 1.21x, W16A16G16 1.94x. Targets still
missed: the kernel is 0.74x fp32's GEMMs and 52 % of the step; the serial stochastic-rounding draws and Python
around 38 linears remain (reports/pending/avx2_overhead.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import qanalyze
from qanalyze.data import collate, encode
from qanalyze.engine import kernels
from qanalyze.engine.apply import apply_plan
from qanalyze.engine.kernels import KERNEL_ENV
from qanalyze.engine.train import adamw
from qanalyze.methods import get_method
from qanalyze.plan.uniform import uniform_plan

TARGETS = {"int W8A8G8": 0.7, "int W8A8G8 channel": 0.7, "int W16A16G16": 1.5}
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_matmul import ENV, _cpu_flags  # noqa: E402  (benchmarks/ is not a package)


def _setup(label: str, mode: str | None, bits: int | None, layout: str = "tensor", *, fused: bool = True):
    torch.manual_seed(0)
    loaded = qanalyze.load_model("minilm-l6", num_labels=2)
    model = loaded.model
    if mode is not None:
        apply_plan(model, uniform_plan(model, bits, kinds=get_method(mode).module_kinds, layout=layout), mode)
    model.train()
    optimizer = adamw(model, 1e-4, 0.01) if fused else torch.optim.AdamW(model.parameters(), lr=1e-4)
    return label, model, optimizer


_OUTER_KERNEL = os.environ.get(KERNEL_ENV)  # what the caller set, restored for rows without a kernel of their own
_LIBRARY_OP = kernels.avx2_library_op
UNFUSED = "/unfused"
"""A kernel name's suffix: the row runs without the library's fused ops (`qanalyze.engine.avx2_gemm.LIBRARY_OPS`),
so quantization and rescaling take the torch ops as before issue 26's third way (the same values)."""


def _step(model, optimizer, batch, kernel: str | None = None) -> float:
    unfused = kernel is not None and kernel.endswith(UNFUSED)
    kernels.avx2_library_op = (lambda name: None) if unfused else _LIBRARY_OP
    value = kernel.removesuffix(UNFUSED) if kernel is not None else _OUTER_KERNEL
    if value is None:
        os.environ.pop(KERNEL_ENV, None)
    else:
        os.environ[KERNEL_ENV] = value
    start = time.perf_counter()
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/glue"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kernels", default=None,
                        help="QANALYZE_KERNEL values, one integer row each (default: the environment's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's own)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = qanalyze.load_task("sst2", args.data, max_train_examples=32 * (args.steps + args.warmup), seed=0)
    tokenizer = qanalyze.load_model("minilm-l6", num_labels=2).tokenizer
    encoded = encode(data.train, tokenizer, max_length=64)
    batches = [collate(encoded, list(range(i * 32, (i + 1) * 32)), tokenizer)
               for i in range(args.steps + args.warmup)]
    kernels = [None] if args.kernels is None else args.kernels.split(",")

    def variants(label: str, *setup) -> list[tuple]:
        return [(*_setup(label if k is None else f"{label} [{k}]", *setup), k) for k in kernels]

    rows = [(*_setup("fp32", None, None), None), *variants("int W8A8G8", "int", 8),
            *variants("int W8A8G8 channel", "int", 8, "channel"), *variants("int W16A16G16", "int", 16),
            (*_setup("qat W8A8", "qat", 8), None), (*_setup("fp32, AdamW loop", None, None, fused=False), None)]
    times: dict[str, list[float]] = {label: [] for label, _, _, _ in rows}
    for index, batch in enumerate(batches):
        for label, model, optimizer, kernel in rows:
            seconds = _step(model, optimizer, batch, kernel)
            if index >= args.warmup:
                times[label].append(seconds)
    print(f"cpu: {_cpu_flags()}")
    print("env: " + " ".join(f"{name}={os.environ.get(name, '') if name != KERNEL_ENV else _OUTER_KERNEL or ''}"
                             for name in ENV))
    print(f"torch threads {torch.get_num_threads()}, batch 32 x <=64 tokens, {args.steps} steps per row "
          f"(+{args.warmup} warm-up), interleaved")
    base = statistics.median(times["fp32"])
    for label, values in times.items():
        median = statistics.median(values)
        ratio = median / base
        target = TARGETS.get(label.split(" [")[0])
        verdict = "" if target is None else f"  target <= {target}x: {'met' if ratio <= target else 'MISSED'}"
        print(f"{label:>26}: median step {median:.3f} s, {ratio:.2f}x fp32{verdict}")


if __name__ == "__main__":
    main()
