"""Issue 3: how far two sensitivity.json files of the same model, data and seed agree.

For each module and batch: traces within 3 combined standard errors, top eigenvalues within a
relative tolerance (default the files' eig_tol), and the same for the per-layer eigenvalues; plus
wall time and products per batch. Used to check that a faster path (bfloat16 products, length
buckets) gives the numbers of the reference path:

    .venv/bin/python benchmarks/compare_sensitivity.py runs/bench/sensitivity-padded.json \\
        runs/bench/sensitivity-unpad.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--eig-tol", type=float, default=None, help="default: the reference's settings.eig_tol")
    args = parser.parse_args()
    ref, other = (json.loads(path.read_text()) for path in (args.reference, args.other))
    changed = {k: (v, other["settings"].get(k)) for k, v in ref["settings"].items() if other["settings"].get(k) != v}
    print(f"settings that differ: {changed or 'none'}")
    tol = args.eig_tol or ref["settings"]["eig_tol"]
    for label, report in (("reference", ref), ("other", other)):
        products = [v for k, v in sorted(report["timings"].items()) if k.startswith("hessian_products")]
        print(f"{label}: {report['timings'].get('seconds', math.nan):.0f} s of analysis, products per batch {products}")

    traces = trace_ok = 0
    eig_pairs = []  # (where, batch, reference value, other value)
    for name, entry in ref["modules"].items():
        mine, theirs = entry["hessian"], other["modules"][name]["hessian"]
        for a, b in zip(mine.get("trace_per_batch", []), theirs.get("trace_per_batch", [])):
            traces += 1
            ok = abs(a["value"] - b["value"]) <= 3 * math.hypot(a["stderr"], b["stderr"])
            trace_ok += ok
            if not ok:
                print(f"  trace outside 3 SE: {name}: {a['value']:.4g} ± {a['stderr']:.2g} against "
                      f"{b['value']:.4g} ± {b['stderr']:.2g}")
        eig_pairs += [(name, batch, a["value"], b["value"]) for batch, (a, b)
                      in enumerate(zip(mine.get("eig_per_batch", []), theirs.get("eig_per_batch", [])))]
    for block, entry in ref.get("blocks", {}).items():
        eig_pairs += [(f"layer {block}", batch, a["value"], b["value"]) for batch, (a, b)
                      in enumerate(zip(entry["per_batch"], other["blocks"][block]["per_batch"]))]
    eig_ok = 0
    for where, batch, a, b in eig_pairs:
        ok = abs(a - b) <= tol * max(abs(a), abs(b)) + 1e-12
        eig_ok += ok
        if not ok:
            print(f"  eigenvalue: {where}, batch {batch + 1}: {a:.5g} against {b:.5g}")
    print(f"traces within 3 combined standard errors: {trace_ok} of {traces}")
    print(f"top eigenvalues (modules and layers) within {tol:g}: {eig_ok} of {len(eig_pairs)}")


if __name__ == "__main__":
    main()
