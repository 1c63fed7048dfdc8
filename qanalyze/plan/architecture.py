"""`check_plan`: whether a plan was made for a model's architecture (module names and weight shapes).

A plan applies to any checkpoint of the architecture it was made for and is refused, by module
name, for any other (DESIGN.md, "Data contracts"). Everything that applies a plan (the engine, the
sweep, the command line) calls this; it lives beside the plan's records, not in the planner, so
that applying a plan does not import the solvers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from qanalyze.errors import ConfigError

if TYPE_CHECKING:
    from qanalyze.records import BitPlan


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
    for name, entry in plan.entries.items():
        if not entry.quantized:
            continue
        rows = recorded[name][0]
        if entry.groups and rows % entry.groups:
            raise ConfigError(f"plan module {name}: {entry.groups} groups do not divide its {rows} rows")
