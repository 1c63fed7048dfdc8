"""Issue 22's analysis target: the default analysis of SmolLM2-135M on 32 calibration windows of 512
tokens within 15 minutes on 2 cores. Runs the command as a user would and prints its wall time, the ratio to
the 900 s budget, and the child's peak RSS.

    .venv/bin/python benchmarks/lm_analysis_time.py [--windows 32] [--out runs/smollm2/s32.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S = 900.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--out", default="runs/smollm2/s32.json")
    args = parser.parse_args()
    command = [sys.executable, "-m", "qanalyze", "analyze", "smollm2-135m", "--task", "lm", "--data", args.data,
               "--batches", str(args.windows), "--batch-size", "1", "--out", args.out, "--overwrite", "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return done.returncode
    rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    report = json.loads(Path(args.out).read_text())
    print(f"default analysis of smollm2-135m, {args.windows} windows of 512 tokens: {seconds:.1f} s wall "
          f"({seconds / BUDGET_S:.2f}x the {BUDGET_S:.0f} s budget), peak RSS {rss_gib:.2f} GiB, metrics "
          f"{', '.join(report['settings']['metrics'])}, {len(report['modules'])} modules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
