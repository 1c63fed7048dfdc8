"""Run CLI commands one after another in this process, optionally sending it a real signal at a chosen
point of each, and record what each did.

    python cli_driver.py PLAN.json RESULTS.json [WATCH_DIR]

PLAN is a list of ``{"point": ..., "args": [...]}``; each command runs in turn and its exit code, its
stderr and (with WATCH_DIR) the files under WATCH_DIR that it created, removed or changed go to
RESULTS. One process for many commands keeps the suite fast: importing torch costs seconds. A point is
``none``, ``after-checkpoint:N`` (SIGINT just after the N-th checkpoint
is written), ``after-optimizer:N`` (SIGINT inside step N, after the weights moved and before the step is
counted), ``final-eval`` (SIGINT in the first evaluation), ``final-save`` (SIGINT while the first log
file is written), ``kill:N`` (SIGKILL inside step N, after the optimizer step) or ``analysis-unit:N``
(SIGINT just after an analysis recorded its N-th unit of work).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys

import torch

import qanalyze.engine.train as train_module
import qanalyze.sensitivity.analyze as analyze_module
from qanalyze.cli import main

_ARMED = {"target": None, "count": 0, "signal": signal.SIGINT}


def _wrap(owner: object, name: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if _ARMED["target"] == name:
            _ARMED["count"] -= 1
            if _ARMED["count"] == 0:
                os.kill(os.getpid(), _ARMED["signal"])
        return result

    setattr(owner, name, wrapped)


_POINTS = {
    "after-checkpoint": ("save_checkpoint", signal.SIGINT),
    "after-optimizer": ("step", signal.SIGINT),
    "final-eval": ("evaluate", signal.SIGINT),
    "final-save": ("atomic_write_text", signal.SIGINT),
    "kill": ("step", signal.SIGKILL),
    "analysis-unit": ("mark", signal.SIGINT),
}


def _arm(point: str) -> None:
    kind, _, count = point.partition(":")
    target, signum = _POINTS.get(kind, (None, signal.SIGINT))
    _ARMED.update(target=target, count=int(count or 1), signal=signum)


def _files(root: str | None) -> dict[str, tuple[int, int]]:
    if root is None:
        return {}
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            status = os.stat(path)
            found[path] = (status.st_size, status.st_mtime_ns)
    return found


if __name__ == "__main__":
    # A shell without job control starts background jobs with SIGINT ignored, which Python keeps: give the
    # commands the handler a terminal user has.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for owner, name in ((train_module, "save_checkpoint"), (torch.optim.AdamW, "step"),
                        (train_module, "evaluate"), (train_module, "atomic_write_text"),
                        (analyze_module._State, "mark")):
        _wrap(owner, name)
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    watch = sys.argv[3] if len(sys.argv) > 3 else None
    results = []
    for item in plan:
        _arm(item.get("point", "none"))
        before = _files(watch)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(item["args"])
        after = _files(watch)
        touched = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
        results.append({"code": code, "stderr": err.getvalue(), "touched": touched})
        with open(sys.argv[2], "w") as handle:
            json.dump(results, handle)
