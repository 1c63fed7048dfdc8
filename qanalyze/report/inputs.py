"""What a report is made from: any mix of sensitivity files, plans and sweeps, found by schema.

A sweep folder brings its ``sweep.json``, the sensitivity file it planned from and its Hessian plan
(at 4 bits when it has one, else its middle budget); a run directory brings its ``metrics.json`` and,
when no plan was given before it, its ``plan.json``.
A later input of a kind replaces an earlier one; a path that holds none of them is a `RecordError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qanalyze.errors import RecordError
from qanalyze.records import (
    PLAN_SCHEMA,
    RUN_SCHEMA,
    SENSITIVITY_SCHEMA,
    SWEEP_SCHEMA,
    BitPlan,
    RunRecord,
    SensitivityReport,
    SweepRecord,
)


@dataclass
class ReportInputs:
    """The records one report shows; each is optional, and the report shows what exists."""

    sensitivity: SensitivityReport | None = None
    plan: BitPlan | None = None
    sweep: SweepRecord | None = None
    runs: dict[str, RunRecord] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def empty(self) -> bool:
        """True when there is nothing to report."""
        return self.sensitivity is None and self.plan is None and self.sweep is None and not self.runs


_LOADERS = {SENSITIVITY_SCHEMA: ("sensitivity", SensitivityReport),
            PLAN_SCHEMA: ("plan", BitPlan),
            SWEEP_SCHEMA: ("sweep", SweepRecord)}


def _schema(path: Path) -> str | None:
    """The schema of a JSON file; None for a missing file or JSON of no qanalyze record. A file that is
    not JSON at all, which a truncated write or a hand edit leaves, is a `RecordError` naming it: it is
    not a file that "holds no records"."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if path.suffix != ".json":
            return None  # an HTML page or a binary given by mistake: the caller says it holds no record
        decoding = isinstance(exc, json.JSONDecodeError)
        where = f" ({exc.msg} at line {exc.lineno}, column {exc.colno})" if decoding else ""
        raise RecordError(f"{path} is corrupt or truncated: not valid JSON{where}") from None
    except OSError as exc:
        raise RecordError(f"{path} cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    return data.get("schema") if isinstance(data, dict) else None


def _add_file(inputs: ReportInputs, path: Path) -> bool:
    schema = _schema(path)
    if schema not in _LOADERS:
        return False
    slot, kind = _LOADERS[schema]
    setattr(inputs, slot, kind.load(path))
    inputs.sources[slot] = str(path)
    return True


def _sweep_plan(folder: Path, sweep: SweepRecord) -> Path | None:
    budgets = [r["budget"] for r in sweep.rows if r["plan"] == "hessian" and r.get("budget")]
    if not budgets:
        return None
    chosen = "4bit" if "4bit" in budgets else budgets[len(budgets) // 2]
    row = next(r for r in sweep.rows if r["plan"] == "hessian" and r["budget"] == chosen)
    return folder / row["plan_file"]


def _add_folder(inputs: ReportInputs, folder: Path) -> bool:
    if _schema(folder / "sweep.json") == SWEEP_SCHEMA:
        sweep = SweepRecord.load(folder / "sweep.json")
        inputs.sweep, inputs.sources["sweep"] = sweep, str(folder / "sweep.json")
        recorded = Path(sweep.sensitivity.get("path") or "")
        for candidate in (folder / "sensitivity.json", recorded, folder / recorded.name):
            if recorded.name and candidate.is_file() and _add_file(inputs, candidate):
                break
        plan = _sweep_plan(folder, sweep)
        if plan is not None and plan.is_file():
            _add_file(inputs, plan)
        return True
    found = False
    if _schema(folder / "metrics.json") == RUN_SCHEMA:  # a run directory (fine-tuned or quantized)
        inputs.runs[str(folder)] = RunRecord.load(folder / "metrics.json")
        found = True
        if inputs.plan is not None:
            return True  # a plan given earlier stays the one shown; the run's own plan is in its row
    for name in ("sensitivity.json", "plan.json"):
        if (folder / name).is_file():
            found = _add_file(inputs, folder / name) or found
    return found


def collect(paths: list[str | Path]) -> ReportInputs:
    """Load every record that ``paths`` (files or folders) hold; a path with none is a `RecordError`."""
    inputs = ReportInputs()
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise RecordError(f"report input not found: {path}")
        added = _add_folder(inputs, path) if path.is_dir() else _add_file(inputs, path)
        if not added:
            raise RecordError(f"{path} holds no sensitivity.json, plan.json, sweep.json or run record qanalyze "
                              "can report on")
    return inputs
