"""The run directory: what makes a folder a qanalyze run, and when one may be (re)used.

A run directory holds the trained model (``from_pretrained``-loadable), ``metrics.json`` once the
run has finished, ``log.csv`` (one row per optimizer step) and ``checkpoint/`` while the run can
still be resumed. A folder is a qanalyze run when it holds either record.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from qanalyze.errors import OutputDirError
from qanalyze.records import CHECKPOINT_SCHEMA, RUN_SCHEMA

METRICS_FILE = "metrics.json"
LOG_FILE = "log.csv"
EVALS_FILE = "evals.csv"
PREDICTIONS_FILE = "predictions.json"
"""The final evaluation's per-example predictions and labels (classification runs): what a sweep's paired
bootstrap compares two runs on."""
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "state.json"


def _has_schema(path: Path, schema: str) -> bool:
    try:
        return f'"schema": "{schema}"' in path.read_text(encoding="utf-8")[:200]
    except (OSError, UnicodeDecodeError):
        return False


def checkpoint_dir(run: Path) -> Path | None:
    """The newest complete checkpoint folder of ``run``, if any.

    ``checkpoint.old`` is the previous one, kept only during the swap in `save_checkpoint`; a
    process killed inside that window leaves it as the last good state.
    """
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        candidate = run / name
        if _has_schema(candidate / CHECKPOINT_STATE, CHECKPOINT_SCHEMA):
            return candidate
    return None


def is_finished_run(path: Path) -> bool:
    """True when ``path`` holds a finished run (a ``metrics.json`` of the run schema)."""
    return _has_schema(path / METRICS_FILE, RUN_SCHEMA)


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a finished run or a resumable checkpoint."""
    return is_finished_run(path) or checkpoint_dir(path) is not None


def check_writable(path: str | Path) -> Path:
    """Refuse, before any work, an output ``path`` that cannot be made: its nearest existing ancestor is a
    file, or is not writable (permissions, a read-only file system). Returns the path."""
    target = Path(path)
    # Files are written beside themselves and renamed in; a folder is written into: either way, the
    # folder that must take new entries is the first one that exists.
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputDirError(f"cannot write {target}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write {target}: {folder} is not writable (permissions or a read-only disk)")
    return target


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse, before the work, an output ``path`` on a disk with less than ``needed`` bytes free (``what``
    says what takes them)."""
    ancestor = Path(path).resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    if free < needed:
        raise OutputDirError(f"{path} needs about {needed / 1e6:,.0f} MB for {what}, and its disk has "
                             f"{free / 1e6:,.0f} MB free")


def check_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Check, without touching anything, that ``path`` can take a new (or resumed) run.

    Refuses, with an `OutputDirError`, a folder that holds other files (unless ``overwrite``), a
    finished run (unless ``overwrite``), and ``resume`` where there is nothing to resume. Called
    before any slow work so that bad input fails fast and leaves nothing behind.
    """
    run = Path(path)
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other; choose one")
    if run.exists() and not run.is_dir():
        raise OutputDirError(f"output path {run} exists and is not a directory")
    check_writable(run)
    if resume:
        if checkpoint_dir(run) is None:
            raise OutputDirError(f"nothing to resume in {run}: no checkpoint found")
        return run
    if run.is_dir() and any(run.iterdir()) and not overwrite:
        what = "a qanalyze run" if is_run_dir(run) else "not a qanalyze run"
        raise OutputDirError(
            f"output directory {run} exists and is {what}; pass --overwrite to replace it"
            + (" or --resume to continue it" if checkpoint_dir(run) and not is_finished_run(run) else "")
        )
    return run


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Make ``path`` ready for a new run (or a resumed one) and return it; see `check_run_dir`."""
    run = check_run_dir(path, overwrite=overwrite, resume=resume)
    if resume:
        return run
    if run.is_dir() and any(run.iterdir()):
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


def check_output_file(path: str | Path, *, inputs: tuple[str | Path, ...] = (), overwrite: bool = False) -> Path:
    """Check, before any work, that a command may write the file ``path``: it must not be one of the
    command's ``inputs`` (the same file after resolving links) nor lie inside an input folder's
    records, and an existing file is replaced only with ``overwrite``. Returns the path."""
    target = Path(path)
    resolved = target.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if resolved == source or (source.is_dir() and resolved.parent == source and resolved.name == METRICS_FILE):
            raise OutputDirError(f"output {target} would replace the input {item}; choose another --out")
    if target.is_dir():
        raise OutputDirError(f"output path {target} is a directory")
    check_writable(target)
    if target.exists() and not overwrite:
        raise OutputDirError(f"{target} exists; pass --overwrite to replace it")
    return target


def save_predictions(run: Path, predictions: Any, labels: Any) -> None:
    """Write a run's final per-example predictions and labels to ``predictions.json`` (atomically)."""
    from qanalyze.records import atomic_write_text

    payload = {"predictions": [float(v) if isinstance(v, float) else v for v in predictions.tolist()],
               "labels": labels.tolist()}
    atomic_write_text(Path(run) / PREDICTIONS_FILE, json.dumps(payload, separators=(",", ":")) + "\n")


def load_predictions(run: Path) -> tuple[Any, Any] | None:
    """A run's final predictions and labels as NumPy arrays, or None when it has none (or they are unreadable)."""
    import numpy as np

    path = Path(run) / PREDICTIONS_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return np.asarray(payload["predictions"]), np.asarray(payload["labels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
