"""Issue 3 target: a complete `qanalyze analyze` of minilm-l6 fine-tuned on SST-2 (top eigenvalue
over 4 batches, traces, weight, activation and gradient errors, every quantizable module: all 6
encoder layers, embeddings, pooler and head) finishes in under 15 minutes on 2 cores.

It runs the real command line and times it end to end (model and data loading included):

    .venv/bin/python benchmarks/analyze_sst2.py --model runs/bench/sst2-fp32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs/bench/sst2-fp32"),
                        help="an SST-2 run directory (benchmarks/hessian_sst2.py makes one)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/SST-2"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/sensitivity.json"))
    parser.add_argument("--no-unpad", action="store_true",
                        help="run the Hessian products on the padded batches (analyze's --no-unpad)")
    args = parser.parse_args()
    command = [sys.executable, str(ROOT / "cli.py"), "analyze", args.model, "--task", "sst2", "--data", args.data,
               "--max-train-examples", "2000", "--out", args.out, "--overwrite", "--quiet",
               "--no-unpad" if args.no_unpad else "--unpad"]
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    report = json.loads(Path(args.out).read_text())
    settings = report["settings"]
    modules = report["modules"]
    blocks = sorted({m["block"] for m in modules.values() if m["block"] is not None})
    print(f"{len(modules)} modules (layers {blocks}), metrics {settings['metrics']}, {settings['batches']} batches "
          f"x {settings['batch_size']} sentences, max length {settings['max_length']}")
    print(f"products per batch: {[v for k, v in report['timings'].items() if k.startswith('hessian_products')]}")
    converged = sum(m["hessian"].get("eig_converged", False) for m in modules.values())
    print(f"module eigenvalues converged: {converged} of {len(modules)}")
    print(f"wall {seconds:.0f} s; wall / budget {BUDGET_SECONDS} s: {seconds / BUDGET_SECONDS:.3f} "
          f"({'met' if seconds <= BUDGET_SECONDS else 'MISSED'})")


if __name__ == "__main__":
    main()
