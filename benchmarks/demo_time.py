"""`make demo` end to end, stage by stage, with the seconds of each: the main job at small scale on the packaged
model (minilm-l6) and real GLUE data.

Stages, each the real command line, called in this one process (``--subprocess``: each in its own, paying
Python, torch and transformers start-up every time); loading is included in each stage's seconds:
fine-tune FP32 -> analyze (traces, weight / activation / gradient errors) -> plan 4 bits with baselines ->
integer training that follows the plan -> evaluate it -> report. At the end it prints every stage's seconds,
the total, the Hessian products of the analysis and the accuracies, and writes them to OUT/demo-timing.json.

    .venv/bin/python benchmarks/demo_time.py --data ../shared/data/glue --out runs/demo

To time it as the 2-core AVX2-only target would run, on a CPU with AVX-512:
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python benchmarks/demo_time.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from qanalyze.entry import main as main_cli  # sets the wait policy before the command line loads torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 180


def stages(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The demo's commands, in order, as (stage name, argv after ``cli.py``)."""
    out, data = args.out, args.data
    fp32, plan, sensitivity, run = f"{out}/sst2-fp32", f"{out}/plan-4bit.json", f"{out}/sensitivity.json", \
        f"{out}/sst2-int-4bit"
    length = ["--max-length", str(args.max_length)]
    return [
        ("finetune", ["finetune", "minilm-l6", "--task", "sst2", "--data", data, "--max-train-examples",
                      str(args.finetune_examples), "--max-eval-examples", str(args.eval_examples), "--epochs", "1",
                      "--batch-size", str(args.finetune_batch_size), *length, "--out", fp32, "--overwrite"]),
        ("analyze", ["analyze", fp32, "--task", "sst2", "--data", data, "--max-train-examples",
                     str(args.finetune_examples), "--batches", str(args.batches), "--batch-size", "16", *length,
                     "--metrics", "trace,weights,activations,gradients", "--trace-probes", str(args.trace_probes),
                     "--overwrite", "--out", sensitivity]),
        ("plan", ["plan", fp32, "--budget", "4bit", "--sensitivity", sensitivity, "--out", plan, "--baselines",
                  "--overwrite"]),
        ("train-int", ["train", fp32, "--plan", plan, "--mode", "int", "--task", "sst2", "--data", data,
                       "--max-train-examples", str(args.train_examples), "--max-eval-examples",
                       str(args.eval_examples), "--epochs", "1", *length, "--lr", "2e-5", "--out", run,
                       "--overwrite"]),
        ("evaluate", ["evaluate", run]),
        ("report", ["report", sensitivity, plan, fp32, run, "--out", f"{out}/report.html", "--overwrite",
                    "--quiet"]),
    ]


def _accuracy(run: Path) -> float | None:
    path = run / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("metrics", {}).get("accuracy")


def main() -> None:
    """Run the stages, then print and save their seconds, the product count and the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue"), help="GLUE root")
    parser.add_argument("--out", default="runs/demo", help="demo directory (relative to the current one, or absolute)")
    parser.add_argument("--finetune-examples", type=int, default=2000)
    parser.add_argument("--finetune-batch-size", type=int, default=16)
    parser.add_argument("--train-examples", type=int, default=1000, help="integer training examples")
    parser.add_argument("--eval-examples", type=int, default=872, help="SST-2 dev examples (872: all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2, help="calibration batches of 16 for the analysis")
    parser.add_argument("--trace-probes", type=int, default=12)
    parser.add_argument("--subprocess", action="store_true",
                        help="run each stage as its own `cli.py` process (pays Python, torch and transformers "
                             "start-up at every stage) instead of calling the CLI in this process")
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    for name, argv in stages(args):
        print(f"== {name}: {shlex.join(['cli.py', *argv])}", flush=True)
        start = time.perf_counter()
        if args.subprocess:
            subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv], check=True)
        else:
            code = main_cli(argv)
            if code != 0:
                sys.exit(code)
        seconds[name] = round(time.perf_counter() - start, 1)
    out = Path(args.out).resolve()
    total = round(sum(seconds.values()), 1)
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    summary = {
        "stage_seconds": seconds, "total_seconds": total, "budget_seconds": BUDGET_SECONDS,
        "hessian_products": sensitivity["timings"].get("hessian_products"),
        "analysis_seconds_inside": round(sensitivity["timings"].get("seconds", 0.0), 1),
        "accuracy": {"fp32": _accuracy(out / "sst2-fp32"), "int-4bit": _accuracy(out / "sst2-int-4bit")},
        "settings": vars(args),
    }
    (out / "demo-timing.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nstage seconds: " + ", ".join(f"{name} {s:.1f}" for name, s in seconds.items()))
    print(f"total {total:.1f} s (budget {BUDGET_SECONDS} s on an idle 2-core AVX2 machine); analysis "
          f"{summary['hessian_products']} Hessian products")
    accuracy = summary["accuracy"]
    print("SST-2 dev accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items() if v is not None))
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
