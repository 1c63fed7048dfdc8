"""Issue 5 targets: dev metric of integer / QAT / PTQ fine-tuning against FP32 from the same start.

Every row fine-tunes the pre-trained minilm-l6 (integer from the pre-trained start, the integer
fine-tuning paper's setting) with the same data, steps, seed and settings (batch 32, lr 1e-4,
max length 64, 6 % warm-up): FP32; int with uniform 16-bit and 8-bit plans; QAT (Q8BERT) at 8 bits;
and dynamic PTQ at 8 bits of the FP32 result (no training). Targets on SST-2 (8,000 examples,
1 epoch): int16 within 0.3 pt of FP32, int8 within 1.0 pt, QAT8 within 0.5 pt.

    .venv/bin/python benchmarks/integer_finetune.py --task sst2 --examples 8000 --epochs 1
    .venv/bin/python benchmarks/integer_finetune.py --task mrpc --epochs 3     # full training set
    .venv/bin/python benchmarks/integer_finetune.py --rows fp32,int8c  # per-row weight, per-token input scales
    .venv/bin/python benchmarks/integer_finetune.py --rows fp32,int8r  # ... and row-scaled output gradients
    .venv/bin/python benchmarks/integer_finetune.py --rows fp32,int8c+g16,qat8+a16  # ablations: 16-bit G or A
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import qanalyze
from qanalyze.engine.train import train as train_loop
from qanalyze.methods import get_method
from qanalyze.plan.uniform import uniform_plan
from qanalyze.records import RunRecord
from qanalyze.rundir import prepare_run_dir

TARGETS = {"int16": 0.3, "int8": 1.0, "int8c": 1.0, "int8r": 1.0, "qat8": 0.5, "qat8c": 0.5}
"""The issue's bound (points below FP32) of each target row."""
ROW = re.compile(r"(int|qat)(\d+)([cr]?)((?:\+[wag]\d+)*)")
"""A training row: mode, bits, ``c`` for the channel layout (`qanalyze.plan.uniform.LAYOUTS`: one scale per
weight row and per input token) or ``r`` for the rowwise one (also row scales for the output gradient), then
ablations ``+wN``, ``+aN``, ``+gN`` that set the weight, activation or
gradient bits of every planned module (``int8c+g16``: the int8c row with 16-bit gradients)."""
TENSORS = {"w": "weight_bits", "a": "activation_bits", "g": "gradient_bits"}
GLUE_TASKS = ("mrpc", "rte", "sst2", "stsb")
"""The GLUE tasks of ../shared/data/glue (a GLUE root: `qanalyze.load_task` finds each task's folder)."""


def _train(args, data, mode: str, bits: int | None, out: Path, start: str = "minilm-l6", layout: str = "tensor",
           overrides: str = ""):
    if args.reuse and (out / "metrics.json").is_file():
        record = RunRecord.load(out / "metrics.json")
        print(f"   (reusing {out})", flush=True)
        return record, record.timings.get("train_seconds", 0.0)
    torch.manual_seed(args.seed)
    loaded = qanalyze.load_model(start, num_labels=data.task.num_labels)
    config = qanalyze.TrainConfig(epochs=args.epochs, batch_size=32, lr=args.lr, max_length=64, seed=args.seed,
                                  save_every=10**6)
    plan = None if bits is None else uniform_plan(loaded.model, bits, kinds=get_method(mode).module_kinds,
                                                  layout=layout)
    for tensor, value in re.findall(r"\+([wag])(\d+)", overrides):
        for name, entry in plan.entries.items():
            if entry.quantized:
                plan.modules[name][TENSORS[tensor]] = int(value)
    started = time.perf_counter()
    record = train_loop(loaded, data, config, prepare_run_dir(out, overwrite=True), plan=plan, mode=mode,
                            plan_source=None if bits is None else plan.budget["text"] + overrides)
    return record, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/glue"))
    parser.add_argument("--task", default="sst2", choices=GLUE_TASKS)
    parser.add_argument("--examples", type=int, default=None, help="training subset (default: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="fp32,int16,int8,int8c,int8r,qat8,ptq8,ptq8c")
    parser.add_argument("--out", default="runs/bench/engine")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a row whose run directory under --out is finished (same settings assumed)")
    args = parser.parse_args()
    wanted = args.rows.split(",")
    data = qanalyze.load_task(args.task, args.data,
                              max_train_examples=args.examples, seed=args.seed)
    out = Path(args.out) / args.task
    metric = data.task.metrics[0]
    print(f"{args.task}: {len(data.train)} train / {len(data.dev)} dev examples, {args.epochs} epoch(s), "
          f"seed {args.seed}, torch threads {torch.get_num_threads()}", flush=True)
    results: dict[str, dict] = {}
    for label in wanted:
        match = ROW.fullmatch(label)
        if label != "fp32" and not match:
            if not label.startswith("ptq"):
                parser.error(f"row {label!r}: write fp32, ptq8, ptq8c or MODE BITS [c] [+wN +aN +gN], e.g. int8c+g16")
            continue
        if match:
            mode, bits = match.group(1), int(match.group(2))
            layout = {"": "tensor", "c": "channel", "r": "rowwise"}[match.group(3)]
            record, seconds = _train(args, data, mode, bits, out / label, layout=layout, overrides=match.group(4))
        else:
            record, seconds = _train(args, data, "fp32", None, out / label)
        tolerance = TARGETS.get(label)
        results[label] = {"metrics": record.metrics, "seconds": seconds, "tolerance": tolerance,
                          "step": record.timings["step_seconds_median"]}
        print(f"{label:>6}: {json.dumps(record.metrics)}  train {seconds:.0f} s, median step "
              f"{record.timings['step_seconds_median']:.3f} s", flush=True)
    for label, layout in (("ptq8", "tensor"), ("ptq8c", "channel")):
        if label not in wanted or "fp32" not in results:
            continue
        record, seconds = _train(args, data, "ptq-dynamic", 8, out / label, start=str(out / "fp32"), layout=layout)
        results[label] = {"metrics": record.metrics, "seconds": seconds, "tolerance": None, "step": 0.0}
        print(f"{label:>6}: {json.dumps(record.metrics)}  (dynamic PTQ of the fp32 run)", flush=True)
    if "fp32" not in results:
        return
    key = next(iter(results["fp32"]["metrics"]))
    if metric and metric in results["fp32"]["metrics"]:
        key = metric
    base = results["fp32"]["metrics"][key]
    print(f"\n{key} against fp32 ({100 * base:.2f}):")
    for label, row in results.items():
        delta = 100 * (row["metrics"][key] - base)
        tolerance = row["tolerance"]
        verdict = "" if tolerance is None else f"  target within {tolerance} pt: " \
            f"{'met' if delta >= -tolerance else 'MISSED'}"
        print(f"{label:>6}: {100 * row['metrics'][key]:.2f} ({delta:+.2f} pt){verdict}")


if __name__ == "__main__":
    main()
