"""Issue 7 target (qdylora): one QDyLoRA run of the pre-trained minilm-l6 on 8,000 SST-2 examples with a
4-bit base gives, at its best rank, dev accuracy within 1.5 points of FP32 full fine-tuning, and a rank
curve of at least five ranks from that one run.

The FP32 row is `qanalyze finetune` with the same data, epochs, length and seed (reused from --fp32 when
that run exists with these settings); the qdylora row is `qanalyze train --mode qdylora`.

    .venv/bin/python benchmarks/qdylora_sst2.py --base nf4 --lr 1e-3 [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1.5  # points below FP32 at the best rank


def _run(args: list[str]) -> None:
    print(" ".join(["qanalyze", *args]), flush=True)
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--quiet"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--examples", type=int, default=8000)
    parser.add_argument("--base", default="nf4", help="nf4, or a plan file / uniform:4 for a plan base")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--targets", default="query,value", help="--lora-targets (DyLoRA's default: query, value)")
    parser.add_argument("--update", default="frozen", choices=("frozen", "all"), help="--dylora-update")
    parser.add_argument("--epochs", type=int, default=1, help="for both rows")
    parser.add_argument("--fp32", default=None, help="FP32 run folder (default runs/bench/sst2-fp32, "
                        "or sst2-fp32-e<EPOCHS> for other epochs)")
    parser.add_argument("--out", default=str(ROOT / "runs/bench/qdylora"))
    args = parser.parse_args()
    common = ["--task", "sst2", "--data", args.data, "--max-train-examples", str(args.examples),
              "--epochs", str(args.epochs), "--max-length", "64", "--seed", "0"]
    suffix = "" if args.epochs == 1 else f"-e{args.epochs}"
    fp32 = Path(args.fp32 or ROOT / f"runs/bench/sst2-fp32{suffix}")
    if not (fp32 / "metrics.json").is_file():
        _run(["finetune", "minilm-l6", *common, "--out", str(fp32)])
    fp32_record = json.loads((fp32 / "metrics.json").read_text())
    settings = fp32_record["settings"]
    if (settings.get("epochs"), settings.get("max_length"), fp32_record["data"]["train_examples"]) != \
            (args.epochs, 64, args.examples):
        sys.exit(f"{fp32} was trained with other settings; pass --fp32 to a fresh folder")
    base = ["--base", "nf4"] if args.base == "nf4" else ["--base", "plan", "--plan", args.base]
    out = Path(args.out)
    _run(["train", "minilm-l6", "--mode", "qdylora", *base, "--lora-rank", str(args.rank), "--lr", args.lr,
          "--lora-targets", args.targets, "--dylora-update", args.update,
          "--eval-ranks", ",".join(str(r) for r in (1, 2, 4, 8, 16, 32) if r <= args.rank), *common,
          "--out", str(out), "--overwrite"])
    record = json.loads((out / "metrics.json").read_text())
    reference = 100 * fp32_record["metrics"]["accuracy"]
    print(f"fp32 full fine-tuning: {reference:.2f}  ({fp32_record['timings']['train_seconds']:.0f} s training)")
    curve = {int(r): 100 * m["accuracy"] for r, m in record["rank_metrics"].items()}
    for rank, value in sorted(curve.items()):
        params = record.get("rank_parameters", {}).get(str(rank))
        print(f"qdylora {args.base} base, rank {rank:>2}: {value:.2f}  ({value - reference:+.2f} pt), "
              f"{params if params is not None else '?'} trainable parameters")
    best = max(curve, key=curve.get)
    loss = reference - curve[best]
    print(f"best rank {best}: {loss:.2f} pt below FP32 = {loss / BOUND:.2f} x the {BOUND} pt bound: "
          f"{'met' if loss <= BOUND else 'MISSED'}; {len(curve)} ranks from one run "
          f"({'met' if len(curve) >= 5 else 'MISSED'}); training {record['timings']['train_seconds']:.0f} s, "
          f"median step {record['timings']['step_seconds_median']:.3f} s")


if __name__ == "__main__":
    main()
