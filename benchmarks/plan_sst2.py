"""Issue 4 targets: planning the full MiniLM-L6 from its sensitivity file takes under 5 seconds,
and what the Hessian buys: predicted total damage of the Hessian plan against uniform, random and
reversed plans of equal bytes, for several budgets.

    .venv/bin/python benchmarks/plan_sst2.py --sensitivity runs/bench/sensitivity.json

(benchmarks/analyze_sst2.py writes that file.) Candidates: every planned module (embeddings and
linear layers; layer norms and the head stay float) x bits 2, 3, 4, 5, 6, 8, 12, 16 x groups
tensor, channel, head, 128, 64, 32. A bits budget counts every scale (16 bits per group) beyond
the first of each tensor, so 2bit is reachable (2 bits, one scale per tensor, everywhere) and the
uniform plan at 4bit gives 4 bits everywhere; "with every scale" and MB count every scale.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qanalyze.plan.budget import parse_budget
from qanalyze.plan.make import BASELINES, PlanConfig, make_plan
from qanalyze.records import SensitivityReport

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensitivity", default=str(ROOT / "runs/bench/sensitivity.json"))
    parser.add_argument("--budgets", default="2,3,4,6,8")
    parser.add_argument("--solver", default="ilp")
    args = parser.parse_args()
    report = SensitivityReport.load(args.sensitivity)
    config = PlanConfig(solver=args.solver)
    start = time.perf_counter()
    plan = make_plan(report, parse_budget("4bit"), config)
    seconds = time.perf_counter() - start
    planned = plan.totals["planned_modules"]
    print(f"planning {planned} modules (of {len(plan.modules)}) at 4bit with {plan.solver['name']}: "
          f"{seconds:.2f} s; / budget {BUDGET_SECONDS:.0f} s: {seconds / BUDGET_SECONDS:.3f} "
          f"({'met' if seconds <= BUDGET_SECONDS else 'MISSED'})")
    print("| budget | plan | mean weight bits | with every scale | MB | predicted damage | x Hessian's |")
    print("|---|---|---|---|---|---|---|")
    for text in args.budgets.split(","):
        budget = parse_budget(f"{text}bit")
        best = make_plan(report, budget, config)
        rows = [("hessian", best)] + [(name, make_plan(report, budget, config, baseline=name)) for name in BASELINES]
        for name, made in rows:
            totals = made.totals
            ratio = totals["predicted_damage"] / best.totals["predicted_damage"]
            print(f"| {text}bit | {name} | {totals['weight_bits_mean']:.3f} | "
                  f"{totals['weight_bits_mean_all_scales']:.3f} | {totals['weight_bytes'] / 1e6:.2f} | "
                  f"{totals['predicted_damage']:.4g} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
