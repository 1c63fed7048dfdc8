"""How many CPU threads torch uses, and how its thread pools wait: chosen once at start-up.

Why: torch's CPU build runs its intra-op pool, MKL and oneDNN on GNU OpenMP (libgomp). By default
that pool takes every core and its idle workers spin at each barrier before they sleep. When
another CPU-bound process holds a core, one of our workers shares that core with it, and every
parallel region waits for that worker's slice of the core while the others spin, taking CPU that
the late worker could use. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) is what fixes it; the
thread count matters far less.

Measured alone on the 2-core machine, AVX2 path forced (benchmarks/under_load.py; medians; loaded =
beside one ``while True: pass``; reports/BENCHMARKS.md, issue #20):

    workload              config    idle s  loaded s  loaded/idle  idle / default idle
    one-layer trace       default      7.5      12.2      1.63        1.00
    one-layer trace       auto         8.1       8.8      1.08        1.08
    20 int8 train steps   default     16.5      39.7      2.41        1.00
    20 int8 train steps   passive     19.8      22.7      1.14        1.20
    20 int8 train steps   auto        18.5      21.4      1.16        1.12

With other jobs' load of 3 to 9 runnable threads the spinning default reached 5.2x on the trace. So: the
passive wait always, though it costs 8 to 12 % on an idle machine (a short spin, GOMP_SPINCOUNT=10000,
cost nothing idle but 2.9x loaded), and for auto one thread per core that is not busy elsewhere, which on
a quiet machine is every core (the sampling costs 50 ms).

Two calls, in this order:

1. `prepare_threads(requested)` before ``import torch`` (libgomp reads its environment once, when
   torch loads it): sets the wait policy in the environment where the user has not set it, and
   chooses the thread count (``requested``, or for ``None``/"auto" the usable cores less those other
   processes keep busy right now, at least 1). Returns a `ThreadPlan`.
2. `apply_threads(plan)` after ``import torch``: ``torch.set_num_threads(plan.threads)``.

The pieces are pure functions over their inputs (`choose_threads`, `wait_env`,
`count_runnable`) so that tests need no real machine state.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from qanalyze.errors import ConfigError

WAIT_ENV: Mapping[str, str] = {
    # libgomp: workers that find no work sleep at once instead of spinning (its default spins ~300k
    # iterations at every barrier); torch's CPU build links libgomp, which MKL and oneDNN then share.
    "OMP_WAIT_POLICY": "PASSIVE",
    # The Intel OpenMP runtime's equivalent, for a torch build linked to libiomp5 instead.
    "KMP_BLOCKTIME": "0",
}
"""Environment set before torch loads, each only where the user has not set it."""

SAMPLES, SAMPLE_INTERVAL_S = 5, 0.01
"""How the run queue is read for "auto": five reads 10 ms apart (50 ms at start-up), median kept."""


@dataclass(frozen=True)
class ThreadPlan:
    """The threads chosen at start-up and why.

    ``threads``: intra-op threads for torch; ``requested``: the user's count, ``None`` for auto;
    ``usable_cpus``: cores this process may run on; ``busy_elsewhere``: cores other processes kept
    busy when sampled (``None`` when not measured); ``env_set``: the variables this process set;
    ``late``: torch was already imported, so the wait policy could not take effect.
    """

    threads: int
    requested: int | None
    usable_cpus: int
    busy_elsewhere: int | None
    env_set: tuple[str, ...]
    late: bool

    def describe(self) -> str:
        """One line for a log: the count and how it was chosen."""
        how = ("requested" if self.requested is not None
               else f"auto: {self.usable_cpus} usable cores, {self.busy_elsewhere or 0} busy elsewhere")
        waits = ", ".join(f"{name}={os.environ.get(name, '')}" for name in self.env_set) or "wait policy as set"
        return f"{self.threads} torch threads ({how}; {waits}{', set after torch loaded' if self.late else ''})"


def parse_threads(text: str | int | None) -> int | None:
    """``"auto"``/``None`` -> ``None``; ``"N"`` or ``N`` (N >= 1) -> N; anything else is a `ConfigError`."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--threads must be a positive integer or auto, not {text!r}") from None
    if value < 1:
        raise ConfigError(f"--threads must be at least 1, not {value}")
    return value


def choose_threads(requested: int | None, usable_cpus: int, busy_elsewhere: int | None) -> int:
    """The intra-op thread count: ``requested`` as given, else the usable cores not busy elsewhere, at least 1.

    No more threads than free cores: a thread that shares a core with a busy process holds back
    every parallel region it takes part in (see the module docstring).
    """
    if requested is not None:
        return requested
    return max(1, usable_cpus - (busy_elsewhere or 0))


def wait_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The entries of `WAIT_ENV` whose name ``environ`` does not set (the user's choice wins)."""
    return {name: value for name, value in WAIT_ENV.items() if name not in environ}


def usable_cpus(root: Path = Path("/")) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota if one is set."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = (root / "sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            # A quota of 1.5 cores still lets two threads run; round up.
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def runnable_now(root: Path = Path("/")) -> int | None:
    """Threads on the whole machine that are runnable now (``procs_running`` of /proc/stat), or ``None``."""
    try:
        for line in (root / "proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def count_runnable(read: Callable[[], int | None], samples: int = SAMPLES, interval_s: float = SAMPLE_INTERVAL_S,
                   sleep: Callable[[float], None] = time.sleep) -> int | None:
    """Runnable threads other than this one: the median of ``samples`` reads of ``read``, less 1 (the reader).

    The median ignores short-lived processes seen in one read; a CPU-bound process is runnable in
    every read. ``None`` when the count cannot be read.
    """
    values: list[int] = []
    for index in range(samples):
        value = read()
        if value is None:
            return None
        values.append(value)
        if index + 1 < samples:
            sleep(interval_s)
    values.sort()
    return max(0, values[len(values) // 2] - 1)


def busy_elsewhere(usable: int, root: Path = Path("/")) -> int | None:
    """Cores that other processes keep busy now, or ``None`` where that cannot be told cheaply.

    The run queue counts the whole machine, so it is only read when this process may use every
    core of it (no narrower affinity or quota); inside a slice of a larger host it would count
    the neighbours' threads on cores this process never runs on.
    """
    if usable != (os.cpu_count() or usable):
        return None
    return count_runnable(lambda: runnable_now(root))


def prepare_threads(requested: str | int | None = None, environ: MutableMapping[str, str] | None = None) -> ThreadPlan:
    """Call before ``import torch``: set the wait policy in ``environ`` (default ``os.environ``) where
    unset, and choose the thread count for ``requested`` (N, or ``None``/"auto"). Raises `ConfigError`
    for a bad ``requested``."""
    count = parse_threads(requested)
    added = set_wait_env(environ)
    usable = usable_cpus()
    busy = busy_elsewhere(usable) if count is None else None
    # late only when this call had to set the policy after torch loaded (`qanalyze.entry` sets it earlier)
    return ThreadPlan(threads=choose_threads(count, usable, busy), requested=count, usable_cpus=usable,
                      busy_elsewhere=busy, env_set=added, late=bool(added) and "torch" in sys.modules)


def set_wait_env(environ: MutableMapping[str, str] | None = None) -> tuple[str, ...]:
    """Set `WAIT_ENV` in ``environ`` (default ``os.environ``) where unset; the names it set."""
    environ = os.environ if environ is None else environ
    added = wait_env(environ)
    environ.update(added)
    return tuple(added)


def apply_threads(plan: ThreadPlan) -> None:
    """Call after ``import torch``: give torch's intra-op pool ``plan.threads`` threads."""
    import torch

    torch.set_num_threads(plan.threads)
