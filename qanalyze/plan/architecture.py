"""Whether a record fits a model: `check_plan` (a plan was made for the model's architecture: module
names and weight shapes) and `check_sensitivity` (a sensitivity file measured this model, completely).

A plan applies to any checkpoint of the architecture it was made for and is refused, by module
name, for any other (DESIGN.md, "Data contracts"). Everything that applies a plan (the engine, the
sweep, the command line) calls this; it lives beside the plan's records, not in the planner, so
that applying a plan does not import the solvers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.errors import ConfigError
from qanalyze.quant.layouts import column_groups_per_row, parse_layout

if TYPE_CHECKING:
    from qanalyze.models import ModuleInfo
    from qanalyze.records import BitPlan, SensitivityReport


def check_plan(plan: BitPlan, architecture: Mapping[str, Sequence[int]]) -> None:
    """Refuse a plan for another architecture, naming the first offending module.

    ``architecture`` maps module names to weight shapes (from `qanalyze.models.inventory`). Also refuses
    a planned module whose number of weight scales does not divide its rows.
    """
    recorded = plan.model["modules"]
    for name, shape in recorded.items():
        if name not in architecture:
            raise ConfigError(f"plan module {name} does not exist in this model: the plan is for another architecture")
        if list(architecture[name]) != list(shape):
            raise ConfigError(f"the plan is for another architecture: plan module {name} has shape {list(shape)}, "
                              f"the model's is {list(architecture[name])}")
    missing = [name for name in architecture if name not in recorded]
    if missing:
        raise ConfigError(f"the model has module {missing[0]} that the plan does not cover: "
                          "the plan is for another architecture")
    # An entry deleted by hand would silently train in float while the record still counts it as planned.
    unknown = [name for name in plan.modules if name not in recorded]
    if unknown:
        raise ConfigError(f"plan entry {unknown[0]} names no module of the model the plan records")
    uncovered = [name for name in recorded if name not in plan.modules]
    if uncovered:
        raise ConfigError(f"the plan has no entry for module {uncovered[0]}: give it bits or {{\"float\": true}}")
    for name, entry in plan.entries.items():
        if not entry.quantized:
            continue
        rows = recorded[name][0]
        if entry.column_group is not None:
            _check_column_groups(name, entry.column_group, entry.groups, recorded[name])
        elif entry.groups and rows % entry.groups:
            raise ConfigError(f"plan module {name}: {entry.groups} groups do not divide its {rows} rows")


def _check_column_groups(name: str, column_group: str, groups: int | None, shape: Sequence[int]) -> None:
    """A column layout's ``groups`` counts scales of every row: rows x groups per row (a shorter last group,
    which the PTQ methods allow, counted as one; a GGML type's blocks)."""
    if len(shape) != 2:
        raise ConfigError(f"plan module {name}: column layout {column_group} needs an (out, in) weight, not "
                          f"shape {list(shape)}")
    expected = shape[0] * column_groups_per_row(parse_layout(column_group), shape[1])
    if groups and groups != expected:
        raise ConfigError(f"plan module {name}: column layout {column_group} on shape {list(shape)} has {expected} "
                          f"groups, not {groups}")


def check_sensitivity(report: SensitivityReport, infos: Sequence[ModuleInfo], identity: Mapping[str, Any],
                      path: str | Path, *, objective: str = "trace", any_weights: bool = False) -> None:
    """Refuse, naming the file, a sensitivity record that cannot plan this model: an unfinished analysis,
    no modules, another architecture, other weights (unless ``any_weights``), modules left out, or Hessian
    numbers that are not finite or (for the trace objective) carry no signal at all."""
    from qanalyze.models import architecture_fingerprint

    if not report.complete:
        raise ConfigError(f"{path} is an unfinished analysis (complete: false); finish it with `qanalyze analyze "
                          "... --resume`")
    if not report.modules:
        raise ConfigError(f"{path} holds no modules: there is nothing to plan from")
    if report.model.get("fingerprint") != architecture_fingerprint(list(infos)):
        raise ConfigError(f"{path} was measured on another architecture ({report.model.get('architecture')}, "
                          f"{len(report.modules)} modules) than this model's")
    measured, ours = report.model.get("weights_hash"), identity.get("weights_hash")
    if measured and ours and measured != ours and not any_weights:
        raise ConfigError(f"{path} was measured on other weights of this architecture ({report.model.get('source')}); "
                          "analyze this model, or pass --any-weights to plan with it anyway")
    missing = [info.name for info in infos if info.name not in report.modules]
    if missing:
        raise ConfigError(f"{path} covers {len(report.modules)} of the model's {len(infos)} modules (not "
                          f"{missing[0]}): it was analyzed with --modules; analyze every module to plan the model")
    for name, entry in report.modules.items():
        for key, value in (entry.get("hessian") or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{path}: module {name} has hessian.{key} = {value}: the analysis overflowed "
                                  "(non-finite weights or loss?); analyze again")
    traces = [entry.get("hessian", {}).get("avg_trace") for entry in report.modules.values()]
    traces = [t for t in traces if isinstance(t, int | float)]
    if objective == "trace" and traces and max(traces) <= 0:
        raise ConfigError(f"{path}: every module's Hessian trace is zero or negative, so the trace objective has "
                          "nothing to rank; is the model fine-tuned? Use --objective measured, or analyze again")
