"""What a sweep runs: budgets, which plans per budget, the engine mode, and the settings of the
stages it drives (analysis, planning, training). Validated on construction, never silently changed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qanalyze.engine.apply import MODES
from qanalyze.engine.int4 import Int4Spec
from qanalyze.engine.lora import LoRAConfig
from qanalyze.engine.train import TrainConfig
from qanalyze.errors import ConfigError
from qanalyze.plan.budget import parse_budget
from qanalyze.plan.make import BASELINES, PlanConfig
from qanalyze.sensitivity.analyze import AnalyzeConfig

PLAN_KINDS = ("hessian", *BASELINES)
"""The plans a sweep can make per budget: the Hessian-optimal one and the baselines of equal cost."""

PLAN_MODES = ("qat", "int", "ptq-dynamic", "qdylora")
"""Engine modes that follow each budget's plans (`qanalyze.engine.apply.MODES`); ``qdylora`` freezes a base
at the plan's bits and trains dynamic-rank adapters on it."""

REFERENCE_MODES = {name: mode.fixed_bits for name, mode in MODES.items() if mode.fixed_bits is not None}
"""Engine modes with bits of their own (`qanalyze.engine.apply.Mode.fixed_bits`; ``int4``: 4-bit training, Xi et
al.), run once per sweep as a reference point on a uniform plan at those bits rather than once per budget."""

SWEEP_MODES = (*PLAN_MODES, *REFERENCE_MODES)
"""Every engine mode a sweep can run."""


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
    """One sweep: ``budgets`` x ``plans`` trained in each of ``modes`` (reference modes once), plus uniform
    integer runs at ``integer_bits``. ``lora`` and ``eval_ranks`` configure the ``qdylora`` runs (their base is
    always the plan's), ``int4`` the options of the ``int4`` run (`qanalyze.engine.int4.Int4Spec`)."""

    budgets: tuple[str, ...]
    plans: tuple[str, ...] = PLAN_KINDS
    modes: tuple[str, ...] = ("qat",)
    integer_bits: tuple[int, ...] = (8, 16)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1))
    analysis: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    int4: Int4Spec = field(default_factory=Int4Spec)

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
        unknown = [m for m in self.modes if m not in SWEEP_MODES]
        if unknown or not self.modes:
            raise ConfigError(f"sweep mode(s) {', '.join(map(repr, unknown)) or '(none given)'} not among "
                              f"{', '.join(SWEEP_MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"modes repeat: {', '.join(self.modes)}")
        if "qdylora" in self.modes and self.lora.base != "plan":
            raise ConfigError("a sweep's qdylora runs take their base from each plan (LoRAConfig base 'plan'); "
                              "an NF4 base is one run: qanalyze train --mode qdylora --base nf4")
        bad_ranks = [r for r in self.eval_ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
        if bad_ranks:
            raise ConfigError(f"evaluation ranks must be positive integers, not {bad_ranks}")
        for bits in self.integer_bits:
            if not 2 <= bits <= 16:
                raise ConfigError(f"integer reference bits must lie in 2..16, got {bits}")
        for option, group, layouts, what in (
                ("--act-group", self.plan.act_group, "activation_groups", "input"),
                ("--grad-group", self.plan.grad_group, "gradient_groups", "output gradient")):
            refusing = [m for m in self.modes if m in PLAN_MODES and MODES[m].swaps
                        and group not in getattr(MODES[m], layouts)]
            if refusing:
                runs = [m for m in PLAN_MODES if MODES[m].swaps and group in getattr(MODES[m], layouts)]
                raise ConfigError(f"{option} {group}: mode {refusing[0]} quantizes each {what} with one scale per "
                                  f"tensor (or none); use {option} tensor or the modes {', '.join(runs)}")

    def recorded(self) -> dict[str, Any]:
        """The settings as written to sweep.json."""
        return {"budgets": list(self.budgets), "plans": list(self.plans), "modes": list(self.modes),
                "integer_bits": list(self.integer_bits), "plan": self.plan.recorded(),
                **({"lora": asdict(self.lora), "eval_ranks": list(self.eval_ranks)} if "qdylora" in self.modes
                   else {}),
                **({"int4": asdict(self.int4)} if "int4" in self.modes else {}),
                "train": self.train.numbers(),
                "analysis": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.analysis).items()}}
