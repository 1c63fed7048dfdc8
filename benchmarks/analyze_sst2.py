"""A `qanalyze analyze` of minilm-l6 fine-tuned on SST-2 with the default settings (4 batches of 16; traces,
weight, activation and gradient errors of every quantizable module; `--metrics` adds eig) must finish within
60 s on an idle 2-core AVX2 machine (issue 20; it was 15 minutes with eigenvalues by default, issue 3).

It runs the real command line and times it end to end (model and data loading included):

    .venv/bin/python benchmarks/analyze_sst2.py --model runs/demo/sst2-fp32 [--metrics eig,trace,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs/bench/sst2-fp32"),
                        help="an SST-2 run directory (benchmarks/hessian_sst2.py makes one)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/SST-2"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/sensitivity.json"))
    parser.add_argument("--metrics", default=None, help="analyze's --metrics (default: the library's default)")
    parser.add_argument("--trace-probes", type=int, default=None, help="analyze's --trace-probes")
    parser.add_argument("--no-unpad", action="store_true",
                        help="run the Hessian products on the padded batches (analyze's --no-unpad)")
    args = parser.parse_args()
    command = [sys.executable, str(ROOT / "cli.py"), "analyze", args.model, "--task", "sst2", "--data", args.data,
               "--max-train-examples", "2000", "--out", args.out, "--overwrite", "--quiet",
               "--no-unpad" if args.no_unpad else "--unpad", *(["--metrics", args.metrics] if args.metrics else []),
               *(["--trace-probes", str(args.trace_probes)] if args.trace_probes else [])]
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
    timings = report["timings"]
    print(f"Hessian products: {timings.get('hessian_products')} "
          f"(per batch {[v for k, v in timings.items() if k.startswith('hessian_products_batch_')]}); seconds: "
          + ", ".join(f"{k.removesuffix('_seconds')} {timings[k]:.1f}"
                      for k in ("weights_seconds", "errors_seconds", "hessian_seconds") if k in timings))
    if "eig" in settings["metrics"]:
        converged = sum(m["hessian"].get("eig_converged", False) for m in modules.values())
        print(f"module eigenvalues converged: {converged} of {len(modules)}")
    print(f"wall {seconds:.0f} s; wall / budget {BUDGET_SECONDS} s: {seconds / BUDGET_SECONDS:.3f} "
          f"({'met' if seconds <= BUDGET_SECONDS else 'MISSED'})")


if __name__ == "__main__":
    main()
