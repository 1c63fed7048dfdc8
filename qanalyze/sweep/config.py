"""What a sweep runs: budgets, which plans per budget, the engine mode, and the settings of the
stages it drives (analysis, planning, training). Validated on construction, never silently changed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qanalyze.engine.train import TrainConfig
from qanalyze.errors import ConfigError
from qanalyze.plan.budget import parse_budget
from qanalyze.plan.make import BASELINES, PlanConfig
from qanalyze.sensitivity.analyze import AnalyzeConfig

PLAN_KINDS = ("hessian", *BASELINES)
"""The plans a sweep can make per budget: the Hessian-optimal one and the baselines of equal cost."""

SWEEP_MODES = ("qat", "int", "ptq-dynamic")
"""Engine modes a sweep can train its plans with (`qanalyze.engine.apply.MODES`)."""


def budget_text(value: str | float) -> str:
    """``4`` or ``"4"`` -> ``"4bit"``; any other budget text (``12MB``, ``8x``) is kept as typed."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:g}bit"


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: ``budgets`` x ``plans`` trained in ``mode``, plus uniform integer runs at ``integer_bits``."""

    budgets: tuple[str, ...]
    plans: tuple[str, ...] = PLAN_KINDS
    mode: str = "qat"
    integer_bits: tuple[int, ...] = (8, 16)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1))
    analysis: AnalyzeConfig = field(default_factory=AnalyzeConfig)

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ConfigError("a sweep needs at least one budget (--budgets 2,3,4,6,8)")
        for budget in self.budgets:
            parse_budget(budget)  # a BudgetError names the budget and the accepted forms
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets repeat: {', '.join(self.budgets)}")
        unknown = [p for p in self.plans if p not in PLAN_KINDS]
        if unknown or not self.plans:
            raise ConfigError(f"unknown plan kind(s) {', '.join(unknown) or '(none given)'}; known: "
                              f"{', '.join(PLAN_KINDS)}")
        if self.mode not in SWEEP_MODES:
            raise ConfigError(f"sweep mode {self.mode!r} is not one of {', '.join(SWEEP_MODES)}")
        for bits in self.integer_bits:
            if not 2 <= bits <= 16:
                raise ConfigError(f"integer reference bits must lie in 2..16, got {bits}")

    def recorded(self) -> dict[str, Any]:
        """The settings as written to sweep.json."""
        return {"budgets": list(self.budgets), "plans": list(self.plans), "mode": self.mode,
                "integer_bits": list(self.integer_bits), "plan": self.plan.recorded(),
                "train": self.train.numbers(),
                "analysis": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.analysis).items()}}
