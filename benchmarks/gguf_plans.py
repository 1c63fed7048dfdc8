"""Issue 22: `--target gguf` plans on SmolLM2-135M against the uniform llama.cpp types of the same size.

Did the Hessian (the Fisher objective) buy perplexity at llama.cpp's own types? For each uniform GGML type
(``uniform:Q2_K``, ``uniform:Q4_0``, ...; where a row is not a multiple of 256 columns, the type llama.cpp falls
back to, as ``llama-quantize`` does) it quantizes SmolLM2 with RTN, then plans ``--target gguf`` at that plan's
bits per weight (its bytes, up to the budget's rounding) from the sensitivity file, quantizes that plan the same
way and evaluates both on the same test windows. It prints each perplexity and the gap ratio
(mixed − FP32) / (uniform − FP32): below 1 the mixed plan is closer to FP32 at equal size. It also tries
``--refused`` budgets, below the smallest plan llama.cpp's types allow, and prints the planner's answer.

Every step is the CLI, as a user runs it:

    .venv/bin/python benchmarks/gguf_plans.py --sensitivity runs/gguf/s.json --types Q2_K,Q4_0,Q4_1 \\
        --eval-windows 16 --out runs/gguf/bench

The k-quants here are round-to-nearest without llama.cpp's iterative scale search (`qanalyze.quant.ggml`), so
their perplexities are upper bounds of what ``llama-quantize`` would give; both sides of every comparison use
the same quantizers.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGML_NAMES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
CLI = [sys.executable, "-m", "qanalyze"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    """One CLI command; its output kept for the refusal lines."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT)


def checked(args: list[str]) -> None:
    done = run(args)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): qanalyze {' '.join(args)}\n{done.stderr.strip()}")


def figures(folder: Path) -> dict:
    """Perplexity, KL and the quantized weight bytes of a quantize run."""
    record = json.loads((folder / "metrics.json").read_text())
    plan = json.loads((folder / "plan.json").read_text())
    metrics = record["metrics"]
    totals = plan["totals"]
    return {"perplexity": metrics["perplexity"], "kl": metrics.get("kl"), "weight_bytes": totals["weight_bytes"],
            "bits_per_weight": totals["weight_bits_mean_all_scales"]}


def quantize(plan: str, out: Path, args) -> dict:
    if not (out / "metrics.json").is_file():
        start = time.perf_counter()
        checked(["quantize", "smollm2-135m", "--plan", plan, "--method", "rtn", "--task", "lm", "--data",
                 args.data, "--max-eval-windows", str(args.eval_windows), "--out", str(out), "--overwrite", "-q"])
        print(f"  quantized {out.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return figures(out)


def fp32_perplexity(args) -> float:
    path = args.out / "fp32.json"
    if not path.is_file():
        checked(["evaluate", "smollm2-135m", "--task", "lm", "--data", args.data, "--max-eval-windows",
                 str(args.eval_windows), "--out", str(path), "-q"])
    return json.loads(path.read_text())["metrics"]["perplexity"]


def verdict(gap: float) -> str:
    """What a gap ratio says, in words."""
    if math.isnan(gap):
        return "the uniform type is at FP32 already: no gap to close"
    return "the Hessian plan is closer to FP32" if gap < 1 else "the uniform type is as close or closer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensitivity", required=True, help="analyze output of smollm2-135m on task lm")
    parser.add_argument("--types", default="Q2_K,Q3_K,Q4_0,Q4_K,Q4_1", help="uniform GGML types to match")
    parser.add_argument("--refused", default="3.5bit,4bit", help="budgets tried for the refusal")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext-2"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs/gguf/bench")
    parser.add_argument("--without", default="", help="GGML types the Hessian plans may not use (Q4_1: the type "
                        "SmolLM2's GGUF is stored in, which re-quantizes it without loss)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    for budget in filter(None, args.refused.split(",")):
        done = run(["plan", "smollm2-135m", "--sensitivity", args.sensitivity, "--budget", budget, "--target",
                    "gguf", "--out", str(args.out / f"plan-{budget}.json"), "--overwrite"])
        print(f"plan --budget {budget} --target gguf: exit {done.returncode}: "
              f"{(done.stderr.strip() or 'planned').splitlines()[-1]}", flush=True)

    fp32 = fp32_perplexity(args)
    print(f"FP32 perplexity {fp32:.4f} on {args.eval_windows} test windows", flush=True)
    rows = []
    for name in args.types.split(","):
        uniform = quantize(f"uniform:{name}", args.out / f"u-{name}", args)
        tag = "".join(f"-no{kind}" for kind in filter(None, args.without.split(",")))
        plan_path = args.out / f"plan-at-{name}{tag}.json"
        # a bytes budget: every weight byte of the model (the float embeddings and norms too), as plans count them
        budget = f"{uniform['weight_bytes'] / 1e6:.6f}MB"
        allowed = ["--group-sizes", ",".join(kind for kind in GGML_NAMES if kind not in args.without.split(","))]
        checked(["plan", "smollm2-135m", "--sensitivity", args.sensitivity, "--budget", budget, "--target",
                 "gguf", "--out", str(plan_path), "--overwrite", "-q", *(allowed if tag else [])])
        mixed = quantize(str(plan_path), args.out / f"h-{name}{tag}", args)
        # a uniform plan at FP32's perplexity (uniform:Q4_1 on SmolLM2, whose weights are Q4_1 already) has no gap
        uniform_gap = uniform["perplexity"] - fp32
        gap = (mixed["perplexity"] - fp32) / uniform_gap if uniform_gap > 0 else float("nan")
        row = {"type": name, "budget": budget, "uniform": uniform, "hessian": mixed, "gap_ratio": gap}
        rows.append(row)
        print(f"{name}: uniform {uniform['bits_per_weight']:.3f} bpw ppl {uniform['perplexity']:.4f} "
              f"(KL {uniform['kl']:.4f}); hessian {mixed['bits_per_weight']:.3f} bpw ppl {mixed['perplexity']:.4f} "
              f"(KL {mixed['kl']:.4f}); gap ratio {gap:.3f} "
              f"({verdict(gap)})",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
