"""What a sweep runs: budgets, which plans per budget, the engine mode, and the settings of the
stages it drives (analysis, planning, training). Validated on construction, never silently changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from qanalyze.engine.train import TrainConfig
from qanalyze.errors import ConfigError
from qanalyze.methods import METHODS, MethodConfig, get_method
from qanalyze.plan.budget import parse_budget
from qanalyze.plan.make import BASELINES, RULE_MIX, PlanConfig
from qanalyze.sensitivity.analyze import AnalyzeConfig

BEST_UNIFORM = "best-uniform"
"""The plan kind that runs several uniform (bits, column layout) configurations per budget and reports the best
(`qanalyze.sweep.run.uniform_candidates` says which)."""

PLAN_KINDS = ("hessian", *BASELINES, RULE_MIX, BEST_UNIFORM)
"""The plans a sweep can make per budget: the Hessian-optimal one, the baselines of equal cost, llama.cpp's
rule mix (decoders) and the best uniform configuration (column layouts, for the post-training modes)."""


def plan_modes() -> tuple[str, ...]:
    """Methods a sweep runs once per budget and plan (`qanalyze.methods.Method.sweep_role` ``plan``)."""
    return tuple(name for name, method in METHODS.items() if method.sweep_role == "plan")


def reference_modes() -> dict[str, int]:
    """Methods with bits of their own (``int4``: 4-bit training, Xi et al.), run once per sweep as a reference
    point on a uniform plan at those bits rather than once per budget: name -> bits."""
    return {name: method.fixed_bits for name, method in METHODS.items()
            if method.sweep_role == "reference" and method.fixed_bits is not None}


def sweep_modes() -> tuple[str, ...]:
    """Every method a sweep can run."""
    return (*plan_modes(), *reference_modes())


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
    integer runs at ``integer_bits``. ``methods`` holds the settings of a mode's runs by mode name (its
    default config where absent; `method_config`)."""

    budgets: tuple[str, ...]
    plans: tuple[str, ...] = ("hessian", *BASELINES)
    modes: tuple[str, ...] = ("qat",)
    integer_bits: tuple[int, ...] = (8, 16)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1))
    analysis: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    methods: Mapping[str, MethodConfig] = field(default_factory=dict)

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
        unknown = [m for m in self.modes if m not in sweep_modes()]
        if unknown or not self.modes:
            raise ConfigError(f"sweep mode(s) {', '.join(map(repr, unknown)) or '(none given)'} not among "
                              f"{', '.join(sweep_modes())}")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"modes repeat: {', '.join(self.modes)}")
        for name, config in self.methods.items():
            method = get_method(name)
            if not isinstance(config, method.config_class):
                raise ConfigError(f"mode {name} takes a {method.config_class.__name__}, not {type(config).__name__}")
        for mode in self.modes:
            get_method(mode).check_sweep(self.method_config(mode))
        for bits in self.integer_bits:
            if not 2 <= bits <= 16:
                raise ConfigError(f"integer reference bits must lie in 2..16, got {bits}")
        for option, group, layouts, what in (
                ("--act-group", self.plan.act_group, "activation_groups", "input"),
                ("--grad-group", self.plan.grad_group, "gradient_groups", "output gradient")):
            checked = [m for m in plan_modes() if get_method(m).sweep_group_check]
            refusing = [m for m in self.modes if m in checked and group not in getattr(get_method(m), layouts)]
            if refusing:
                runs = [m for m in checked if group in getattr(get_method(m), layouts)]
                raise ConfigError(f"{option} {group}: mode {refusing[0]} quantizes each {what} with one scale per "
                                  f"tensor (or none); use {option} tensor or the modes {', '.join(runs)}")

    def method_config(self, mode: str) -> MethodConfig:
        """The settings of ``mode``'s runs: as given in ``methods``, else the method's defaults."""
        config = self.methods.get(mode)
        return config if config is not None else get_method(mode).make_config()

    def recorded(self) -> dict[str, Any]:
        """The settings as written to sweep.json."""
        methods: dict[str, Any] = {}
        for mode in self.modes:
            methods.update(get_method(mode).sweep_recorded(self.method_config(mode)))
        return {"budgets": list(self.budgets), "plans": list(self.plans), "modes": list(self.modes),
                "integer_bits": list(self.integer_bits), "plan": self.plan.recorded(), **methods,
                "train": self.train.numbers(),
                "analysis": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.analysis).items()}}
