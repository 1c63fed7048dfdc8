"""How much slower analysis and training get beside one CPU-bound process, per thread configuration.

Each workload runs as a `cli.py` subprocess, idle and then with one single-threaded busy loop
(``python -c "while True: pass"``) beside it, alternating (idle first on even repeats, loaded first
on odd ones) so that drift in the machine's other load falls on both. Prints, per workload and
configuration, the median wall time idle and loaded, their ratio, and idle time against the
default's idle time (what a configuration costs when nothing else runs).

Configurations: ``default`` (torch as installed: one thread per core, libgomp's spinning wait),
``passive`` (one thread per core, OMP_WAIT_POLICY=PASSIVE), ``1`` (one thread), ``auto``
(`qanalyze.threads.prepare_threads("auto")`: passive wait, usable cores less the busy ones).

    .venv/bin/python benchmarks/under_load.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = """
import sys
mode, argv = sys.argv[1], sys.argv[2:]
if mode != "default":
    from qanalyze.threads import apply_threads, prepare_threads
    plan = prepare_threads(mode)
    import torch
    apply_threads(plan)
    print("threads:", plan.describe(), file=sys.stderr)
else:
    import torch
    print("threads:", torch.get_num_threads(), "torch threads (default)", file=sys.stderr)
from qanalyze.entry import main
# the CLI chooses threads itself (--threads, default auto): name this configuration's count
threads = str(torch.get_num_threads()) if mode == "default" else mode
sys.exit(main(["--threads", threads, *argv]))
"""
CONFIGS = {"default": "default", "passive": None, "1": "1", "auto": "auto"}
"""Name -> the driver's mode (``None``: one thread per usable core with the passive wait)."""
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def workloads(model: str, data: str, scratch: Path) -> dict[str, list[str]]:
    """The CLI arguments of each workload: a one-layer Hessian trace, and 20 steps of 8-bit integer training."""
    return {
        "analyze": ["analyze", model, "--task", "sst2", "--data", data, "--max-train-examples", "256",
                    "--batches", "1", "--batch-size", "16", "--max-length", "64", "--metrics", "trace",
                    "--modules", r"layer\.0\.", "--trace-probes", "8", "--out", str(scratch / "sens.json"),
                    "--overwrite", "-q"],
        "train": ["train", model, "--mode", "int", "--plan", "uniform:8", "--task", "sst2", "--data", data,
                  "--max-train-examples", "640", "--max-eval-examples", "32", "--max-length", "64",
                  "--batch-size", "16", "--max-steps", "20", "--out", str(scratch / "int8"), "--overwrite", "-q"],
    }


def ensure_model(model: Path, data: str) -> None:
    """Fine-tune a small SST-2 model into ``model`` if it is not there (about a minute)."""
    if (model / "metrics.json").exists():
        return
    subprocess.run([sys.executable, "cli.py", "finetune", "minilm-l6", "--task", "sst2", "--data", data,
                    "--max-train-examples", "256", "--max-eval-examples", "64", "--epochs", "1", "--max-length",
                    "64", "--out", str(model), "--overwrite", "-q"], cwd=ROOT, check=True)


def runnable() -> str:
    """The machine's run queue now (from /proc/stat), to show what else was running."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("procs_running"):
            return line.split()[1]
    return "?"


def timed(mode: str | None, argv: list[str]) -> tuple[float, str]:
    """Seconds one workload takes under ``mode``, and the driver's line about its threads."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    if mode is None:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        mode = str(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRIVER, mode, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    line = next((x for x in done.stderr.splitlines() if x.startswith("threads:")), "threads: ?")
    return seconds, line.removeprefix("threads: ")


def once(mode: str | None, argv: list[str], loaded: bool) -> tuple[float, str]:
    """One timed run, beside a busy loop when ``loaded``."""
    if not loaded:
        return timed(mode, argv)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let the loop reach the run queue before "auto" samples it
        return timed(mode, argv)
    finally:
        hog.kill()
        hog.wait()


def main() -> None:
    """Run every workload under every configuration, idle and loaded, and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="A fine-tuned SST-2 run (default: runs/demo/sst2-fp32 if "
                                                      "it exists, else one made in --scratch).")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--scratch", default="/tmp/under_load")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"Any of {', '.join(CONFIGS)}.")
    parser.add_argument("--workloads", default="analyze,train")
    args = parser.parse_args()

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    demo = ROOT / "runs/demo/sst2-fp32"
    model = Path(args.model) if args.model else demo if (demo / "metrics.json").exists() else scratch / "fp32"
    ensure_model(model, args.data)
    flags = subprocess.run("grep -o -E 'avx512_vnni|avx512_bf16|amx_tile|avx2' /proc/cpuinfo | sort -u",
                           shell=True, capture_output=True, text=True).stdout.split()
    print(f"CPU flags: {' '.join(flags)}; usable cores {len(os.sched_getaffinity(0))}; model {model}", flush=True)

    jobs = workloads(str(model), args.data, scratch)
    names = [c for c in args.configs.split(",") if c]
    times: dict[tuple[str, str, bool], list[float]] = {}
    notes: dict[tuple[str, str, bool], str] = {}
    for repeat in range(args.repeats):
        for work in args.workloads.split(","):
            for name in names:
                for loaded in ((False, True) if repeat % 2 == 0 else (True, False)):
                    queue = runnable()
                    seconds, note = once(CONFIGS[name], jobs[work], loaded)
                    times.setdefault((work, name, loaded), []).append(seconds)
                    notes[(work, name, loaded)] = note
                    print(f"  {work:<8} {name:<8} {'loaded' if loaded else 'idle':<6} {seconds:7.1f} s  "
                          f"(run queue before: {queue}; {note})", flush=True)

    print(f"\nmedian of {args.repeats}; ratio = loaded / idle; idle/default = this idle time / default idle time")
    print(f"{'workload':<9} {'config':<8} {'idle s':>7} {'loaded s':>9} {'ratio':>6} {'idle/default':>13}")
    for work in args.workloads.split(","):
        base = times.get((work, "default", False))
        for name in names:
            idle = statistics.median(times[(work, name, False)])
            busy = statistics.median(times[(work, name, True)])
            rel = f"{idle / statistics.median(base):.2f}" if base else "-"
            print(f"{work:<9} {name:<8} {idle:7.1f} {busy:9.1f} {busy / idle:6.2f} {rel:>13}")


if __name__ == "__main__":
    main()
