"""`plan`: a sensitivity report and a budget -> a `BitPlan` (plan.json), and its baselines.

Weight bits and group sizes come from the exact multiple-choice knapsack over every planned
module's candidates (`qanalyze.plan.costs`, `qanalyze.plan.solvers`; the baselines from
`qanalyze.plan.baselines`); activation bits from the same solver over the activation candidates
under ``act_budget``; gradient bits are the fewest whose measured gradient error stays under
``grad_tol`` (16 where none does).

``totals.weight_bits_mean`` is what a bits budget constrains (every scale beyond each planned
tensor's first counted, and every zero point, see `qanalyze.plan.budget`): at most N under an ``Nbit``
budget; ``weight_bits_mean_all_scales``, ``weight_bytes`` and ``compression`` count every scale.

Group layouts are row layouts (``channel``, ``128``, ...) or, for the post-training formats of LLMs, column
layouts (``g32``, ``g64``, ``g128``, ``row``; `qanalyze.quant.layouts`); ``groups=("auto",)`` (the default)
offers the column layouts on task ``lm`` and the row layouts otherwise. A column candidate's entry has
``group: "channel"``, ``groups`` = its number of scales, ``scheme: "asymmetric"`` and ``column_group``.

PTQ sweeps compare with every uniform (bits, layout) configuration (`uniform_layouts`, `uniform_layout_plan`)
and with llama.cpp's Q4_K_M-style rule mix (``baseline="rule-mix"``, `qanalyze.plan.baselines.rule_mix_choice`).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from qanalyze.errors import ConfigError
from qanalyze.plan.architecture import check_plan
from qanalyze.plan.baselines import (
    random_choice,
    reversed_choice,
    rule_mix_choice,
    rule_mix_modules,
    uniform_choice,
)
from qanalyze.plan.budget import SCALE_BITS, Budget
from qanalyze.plan.costs import (
    AUTO_GROUPS,
    DEFAULT_BITS,
    ModuleOptions,
    activation_options,
    gradient_bits,
    gradient_options,
    merge_ties,
    module_options,
    resolve_groups,
    tie_groups,
)
from qanalyze.plan.entries import FloatEntry, PlanEntry, QuantizedEntry
from qanalyze.plan.knapsack import cost_scales, make_solution, make_table
from qanalyze.plan.solvers import InfeasibleError, Item, Solution, solve
from qanalyze.plan.ties import default_ties
from qanalyze.quant.ggml import is_ggml_layout
from qanalyze.quant.layouts import is_column_layout, layout_symmetric, parse_layout
from qanalyze.quant.primitives import ACTIVATION_GROUPS, GRADIENT_GROUPS
from qanalyze.quant.targets import Target, get_target
from qanalyze.records import BitPlan, SensitivityReport

__all__ = ["BASELINES", "PlanConfig", "UniformLayout", "check_plan", "file_sha256", "make_plan", "uniform_layout_plan",
           "uniform_layouts"]
"""`check_plan` lives in `qanalyze.plan.architecture`; it is re-exported here for older imports."""

BASELINES = ("uniform", "random", "reversed")
"""The baselines ``plan --baselines`` writes beside the plan (every model takes them)."""

RULE_MIX = "rule-mix"
"""llama.cpp's Q4_K_M-style rule mix: ``make_plan(..., baseline="rule-mix")``. Not among `BASELINES`, which
``--baselines`` writes for every model, since it needs a decoder (`qanalyze.plan.baselines.rule_mix_modules`)."""


@dataclass(frozen=True)
class PlanConfig:
    """Settings of a plan: every field changes the result and is recorded in plan.json."""

    objective: str = "auto"
    """A key of `qanalyze.plan.costs.OBJECTIVES`, or ``auto``: `resolve_objective` by the task."""
    bits: tuple[int, ...] = DEFAULT_BITS
    groups: tuple[str, ...] = (AUTO_GROUPS,)
    """Group layouts on offer (row layouts and column layouts), or ``("auto",)``: the task's defaults
    (`qanalyze.plan.costs.resolve_groups`: g32, g64, g128 and per row for ``lm``, the row layouts otherwise)."""
    keep_float: tuple[str, ...] = ("layernorm", "rmsnorm", "head")
    ties: tuple[str, ...] = ()
    default_ties: bool = True
    """Tie the modules inference engines fuse (q/k/v, gate/up, experts; `qanalyze.plan.ties`), besides
    ``ties``; a default rule that matches no quantized module is skipped."""
    act_budget: float = 8.0
    grad_tol: float = 0.05
    grad_budget: float | None = None
    solver: str = "ilp"
    seed: int = 0
    bops: float | None = None
    seq_len: int = 128
    act_group: str = "tensor"
    """Scales of every planned linear layer's input: ``tensor`` (one) or ``token`` (one per token; the int,
    qat and ptq-dynamic modes run it). The bits are chosen from per-tensor errors either way, which per-token
    scales only lower."""
    grad_group: str = "tensor"
    """Scales of every planned linear layer's output gradient: ``tensor`` (one) or ``row`` (one per token for the
    input gradient, one per output channel for the weight gradient; the int mode runs it)."""
    target: str = "any"
    """The inference engine the plan is for (`qanalyze.quant.targets.TARGETS`): only the (bits, column layout)
    candidates it loads are offered; ``any`` offers every candidate."""

    def __post_init__(self) -> None:
        get_target(self.target)  # names the known targets

    def recorded(self) -> dict[str, Any]:
        """The settings as written to plan.json."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, to tie a plan to the sensitivity file it was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _items(options: Sequence[ModuleOptions]) -> list[list[Item]]:
    return [[Item((c.cost_bits,), c.damage) for c in o.candidates] for o in options]


def _macs(option: ModuleOptions, seq_len: int) -> int:
    """Multiply-accumulates of one sequence: out x in per token for linear layers, none for lookups."""
    return option.params * seq_len if "linear" in option.kind else 0


def _activation_of(option: ModuleOptions, activation: Mapping[str, int]) -> int:
    # a module without planned activation bits (float input) is costed as 16-bit
    return max(activation.get(name) or 16 for name in option.members)


def _bops(option: ModuleOptions, bits: int, activation: Mapping[str, int], seq_len: int) -> float:
    """Bit operations of one sequence: MACs x weight bits x activation bits."""
    return float(_macs(option, seq_len) * bits * _activation_of(option, activation))


def _items_with_bops(options: Sequence[ModuleOptions], activation: Mapping[str, int],
                     seq_len: int) -> list[list[Item]]:
    return [[Item((c.cost_bits, _bops(o, c.bits, activation, seq_len)), c.damage) for c in o.candidates]
            for o in options]


def _tensors(planned: Sequence[ModuleOptions]) -> int:
    """Weight tensors of the planned modules: a tie group counts each member."""
    return sum(len(o.members) for o in planned)


def _capacity(budget: Budget, planned: Sequence[ModuleOptions], floats: Sequence[ModuleOptions]) -> float:
    params = sum(o.params for o in planned)
    if budget.kind == "bits":
        # the mean over the planned weights, one free scale per planned tensor (`qanalyze.plan.budget`)
        return budget.capacity_bits(params, tensors=_tensors(planned))
    # bytes and compression ratios are about the whole model's weights, float ones included
    total = budget.capacity_bits(params + sum(o.params for o in floats), tensors=0)
    return total - sum(o.float_cost_bits for o in floats)


def _mean_bits(cost_bits: float, planned: Sequence[ModuleOptions]) -> float:
    """Mean weight bits as a bits budget counts them: every scale beyond each tensor's first."""
    return (cost_bits - SCALE_BITS * _tensors(planned)) / sum(o.params for o in planned)


def _unreachable(budget: Budget, exc: InfeasibleError, planned: Sequence[ModuleOptions],
                 floats: Sequence[ModuleOptions], config: PlanConfig) -> ConfigError:
    if config.bops is not None and exc.minimum[1] > config.bops:
        return ConfigError(f"BOPs budget {config.bops:.4g} cannot be reached with these bit-widths and activation "
                           f"bits; the smallest reachable is {exc.minimum[1]:.4g} (sequence length {config.seq_len})")
    minimum = exc.minimum[0]
    params = sum(o.params for o in planned)
    all_params = params + sum(o.params for o in floats)
    float_bits = sum(o.float_cost_bits for o in floats)
    smallest = {
        "bits": f"{math.ceil(100 * _mean_bits(minimum, planned)) / 100:g}bit",
        "bytes": f"{math.ceil((minimum + float_bits) / 8 / 1e4) / 100:g}MB",
        "ratio": f"{math.floor(100 * 32 * all_params / (minimum + float_bits)) / 100:g}x",
    }[budget.kind]
    return ConfigError(f"budget {budget.text} cannot be reached with these bit-widths and groups"
                       f"{'' if config.target == 'any' else f' (target {config.target})'}; the smallest reachable is "
                       f"{smallest}{_stuck_modules(budget, planned)}")


def _stuck_modules(budget: Budget, planned: Sequence[ModuleOptions]) -> str:
    """For a bits budget: how many planned modules have no candidate within it, with the first as an example
    (SmolLM2's 576-column projections under ``--target gguf`` take no type below 4.5 bits)."""
    if budget.kind != "bits":
        return ""
    stuck = [o for o in planned if o.candidates and min(c.cost_bits for c in o.candidates) / o.params > budget.value]
    if not stuck:
        return ""
    first = stuck[0]
    least = min(first.candidates, key=lambda c: c.cost_bits)
    named = least.group if is_ggml_layout(least.group) else f"{least.bits}-bit {least.group}"
    return (f": {len(stuck)} of {len(planned)} planned modules take nothing smaller, e.g. {first.name} "
            f"(shape {list(first.shape)}), whose least is {named} at {least.cost_bits / first.params:.3g} bits")


AUTO_OBJECTIVES = {"lm": "fisher"}
"""The objective ``auto`` means, by task kind: on SmolLM2-135M the sampled-label Fisher score ranked the
measured KL change of 49 modules at Spearman's rho 0.96, the trace at 0.61 (reports/BENCHMARKS.md). On
GLUE encoders the trace stays, as it was measured there."""


def resolve_objective(objective: str, kind: str | None) -> str:
    """``objective``, with ``auto`` made the one measured best for the task kind ``kind`` (`AUTO_OBJECTIVES`)."""
    return AUTO_OBJECTIVES.get(kind or "", "trace") if objective == "auto" else objective


def task_kind(data: Mapping[str, Any]) -> str:
    """The task kind of a record's data identity: ``lm`` when it cut text into windows (a task from a file may
    have any name), else ``classification``."""
    return "lm" if "seq_len" in data else "classification"


def make_plan(report: SensitivityReport, budget: Budget, config: PlanConfig, *,
              sensitivity_path: str | Path | None = None, baseline: str | None = None) -> BitPlan:
    """The plan minimising predicted damage under ``budget`` (or, with ``baseline``, that baseline)."""
    if config.act_group not in ACTIVATION_GROUPS:
        raise ConfigError(f"act_group {config.act_group!r} is not one of {', '.join(ACTIVATION_GROUPS)}")
    if config.grad_group not in GRADIENT_GROUPS:
        raise ConfigError(f"grad_group {config.grad_group!r} is not one of {', '.join(GRADIENT_GROUPS)}")
    raw, config, options, planned, floats = _prepare(report, config)
    if baseline is not None and baseline not in _BASELINE_SOLVERS:
        raise ConfigError(f"unknown baseline {baseline!r}; known: {', '.join(_BASELINE_SOLVERS)}")
    activation = _activation_bits(raw, config)
    capacities: tuple[float, ...] = (_capacity(budget, planned, floats),)
    if config.bops is None:
        items = _items(planned)
    else:
        # activation bits are chosen first, so BOPs are linear in the weight bits
        items = _items_with_bops(planned, activation, config.seq_len)
        capacities += (config.bops,)
    try:
        solution = _BASELINE_SOLVERS.get(baseline, _optimal)(planned, items, capacities, config)
    except InfeasibleError as exc:
        raise _unreachable(budget, exc, planned, floats, config) from None
    return _assemble(raw, budget.to_dict(), config, options, planned, floats, solution, sensitivity_path, baseline,
                     activation, capacities[0])


def _prepare(report: SensitivityReport, config: PlanConfig) -> tuple[dict[str, Any], PlanConfig, list[ModuleOptions],
                                                                     list[ModuleOptions], list[ModuleOptions]]:
    """The report as a dict, the config with ``auto`` resolved for the report's task, every module's options,
    and the planned (tied ones merged) and float ones."""
    raw = report.to_dict()
    kind = task_kind(raw["data"])
    layouts = get_target(config.target).layouts
    config = replace(config, objective=resolve_objective(config.objective, kind),
                     groups=tuple(parse_layout(g) for g in resolve_groups(config.groups, kind, layouts)))
    options = restrict_to_target(module_options(raw, bits=config.bits, groups=config.groups,
                                                objective=config.objective, keep_float=config.keep_float),
                                 get_target(config.target))
    # engines that keep q/k/v apart (llama.cpp) need no ties: its mixes give v_proj more bits than q_proj
    tied = config.default_ties and get_target(config.target).fuses
    defaults = default_ties(raw["model"].get("architecture")) if tied else ()
    quantized = [o for o in options if not o.float]
    # a default rule for modules this plan keeps in float (or that this model lacks) ties nothing
    patterns = tuple(dict.fromkeys((*[p for p in defaults if any(re.search(p, o.name) for o in quantized)],
                                    *config.ties)))
    ties = tie_groups(options, patterns) if patterns else []
    merged = merge_ties(options, ties)
    planned = [o for o in merged if not o.float]
    floats = [o for o in merged if o.float]
    if not planned:
        raise ConfigError("every module is kept in float (--keep-float): nothing to plan")
    return raw, config, options, planned, floats


def restrict_to_target(options: list[ModuleOptions], target: Target) -> list[ModuleOptions]:
    """Every module's candidates that ``target`` runs; ConfigError naming a planned module left with none."""
    if target.formats is None:
        return options
    kept = []
    for option in options:
        if option.float:
            kept.append(option)
            continue
        candidates = tuple(c for c in option.candidates if target.allows(c.bits, c.group))
        if not candidates:
            offered = ", ".join(dict.fromkeys(f"{c.bits}:{c.group}" for c in option.candidates))
            raise ConfigError(f"target {target.name} runs none of the candidates of {option.name} ({offered}); "
                              f"it loads {', '.join(f'{b}:{g}' for b, g in target.formats)} (plan column layouts: "
                              "--group-sizes g32,g64,g128,row, or keep the module float)")
        kept.append(replace(option, candidates=candidates))
    return kept


def _optimal(planned: Sequence[ModuleOptions], items: list[list[Item]], capacities: tuple[float, ...],
             config: PlanConfig) -> Solution:
    return solve(items, capacities, solver=config.solver)


def _uniform(planned: Sequence[ModuleOptions], items: list[list[Item]], capacities: tuple[float, ...],
             config: PlanConfig) -> Solution:
    return uniform_choice(items, capacities, [[c.label for c in o.candidates] for o in planned])


def _random(planned: Sequence[ModuleOptions], items: list[list[Item]], capacities: tuple[float, ...],
            config: PlanConfig) -> Solution:
    return random_choice(items, capacities, seed=config.seed, solver=config.solver)


def _reversed(planned: Sequence[ModuleOptions], items: list[list[Item]], capacities: tuple[float, ...],
              config: PlanConfig) -> Solution:
    # a module's sensitivity: its damage at the cheapest choice per weight, the scale the objective gives it
    sensitivity = [max(o.candidates[0].damage, 1e-30) / o.params for o in planned]
    return reversed_choice(items, capacities, sensitivity, solver=config.solver)


def _rule_mix(planned: Sequence[ModuleOptions], items: list[list[Item]], capacities: tuple[float, ...],
              config: PlanConfig) -> Solution:
    # A tie group (q/k/v, fused by engines) takes the bits of its favoured member: with the default ties, the
    # value projection's extra bits go to q and k of its layer too; without them the rule is llama.cpp's.
    favoured = rule_mix_modules([name for o in planned for name in o.members])
    return rule_mix_choice(items, capacities, [[c.label for c in o.candidates] for o in planned],
                           [any(name in favoured for name in o.members) for o in planned])


_BASELINE_SOLVERS = {"uniform": _uniform, "random": _random, "reversed": _reversed, RULE_MIX: _rule_mix}
"""Baseline name -> ``solve(planned, items, capacities, config)``: every baseline ``make_plan`` can make."""


def _assemble(raw: Mapping[str, Any], budget: Mapping[str, Any], config: PlanConfig, options: Sequence[ModuleOptions],
              planned: Sequence[ModuleOptions], floats: Sequence[ModuleOptions], solution: Solution,
              sensitivity_path: str | Path | None, baseline: str | None, activation: Mapping[str, int],
              capacity: float) -> BitPlan:
    gradients = _gradient_bits(raw, config)
    # the weight errors the damage was predicted from were measured with this range rule: train with it too
    weight_range = raw.get("settings", {}).get("weight_range", "max")
    entries: dict[str, PlanEntry] = {o.name: FloatEntry(o.name) for o in options}
    chosen_bits = 0.0
    damage = 0.0
    bops = 0.0
    by_name = {o.name: o for o in options}
    for option, index in zip(planned, solution.choice):
        candidate = option.candidates[index]
        chosen_bits += candidate.cost_bits
        damage += candidate.damage
        bops += _bops(option, candidate.bits, activation, config.seq_len)
        for name in option.members:  # a tie group stands for several modules
            member = by_name[name]
            member_candidate = next(c for c in member.candidates if c.label == candidate.label)
            # a layout key is written only where it says something other than one scale per tensor
            marks_input = config.act_group != "tensor" and "linear" in member.kind and bool(activation.get(name))
            marks_gradient = config.grad_group != "tensor" and "linear" in member.kind
            # a column layout is asymmetric with min/max ranges (`qanalyze.quant.columns`; a GGML type as its type
            # says), whatever the analysis' range rule for row layouts; its scales are counted in groups, one row
            # holding several
            column = is_column_layout(candidate.group)
            entries[name] = QuantizedEntry(
                name=name, weight_bits=candidate.bits, group="channel" if column else candidate.group,
                groups=member_candidate.groups,
                activation_bits=activation.get(name), gradient_bits=gradients.get(name) or 16,
                scheme="asymmetric" if column and not layout_symmetric(candidate.group) else "symmetric",
                rounding="nearest",
                weight_range="max" if column else weight_range,
                predicted_damage=member_candidate.damage,
                activation_group=config.act_group if marks_input else "tensor",
                gradient_group=config.grad_group if marks_gradient else "tensor",
                column_group=candidate.group if column else None,
                omitted=frozenset({*(() if marks_input else ("activation_group",)),
                                   *(() if marks_gradient else ("gradient_group",)),
                                   *(() if column else ("column_group",))}),
            )
    planned_params = sum(o.params for o in planned)
    all_params = planned_params + sum(o.params for o in floats)
    float_bits = sum(o.float_cost_bits for o in floats)
    weight_bytes = (chosen_bits + float_bits) / 8
    quantized = [e for e in entries.values() if isinstance(e, QuantizedEntry)]
    totals = {
        # what a bits budget constrains (each tensor's first scale free), and the same with every scale
        "weight_bits_mean": _mean_bits(chosen_bits, planned),
        "weight_bits_mean_all_scales": chosen_bits / planned_params,
        "weight_bytes": math.ceil(weight_bytes),
        "compression": 32 * all_params / (chosen_bits + float_bits),
        "predicted_damage": damage,
        "planned_modules": len(quantized), "float_modules": len(entries) - len(quantized),
        "activation_bits_mean": _mean([e.activation_bits for e in quantized if e.activation_bits]),
        "gradient_bits_mean": _mean([e.gradient_bits for e in quantized]),
        "bops": bops, "bops_seq_len": config.seq_len,
    }
    sensitivity = {"path": str(Path(sensitivity_path).resolve()) if sensitivity_path else None,
                   "sha256": file_sha256(sensitivity_path) if sensitivity_path else None,
                   "data": {k: raw["data"].get(k) for k in ("task", "examples", "hash")}}
    return BitPlan(
        model={"fingerprint": raw["model"]["fingerprint"], "architecture": raw["model"].get("architecture"),
               "modules": {o.name: list(o.shape) for o in options}},
        budget={**budget, "capacity_bits": capacity,
                "act_budget": config.act_budget, "grad_budget": config.grad_budget, "bops": config.bops},
        objective=config.objective, totals=totals, modules={n: e.to_dict() for n, e in entries.items()},
        sensitivity=sensitivity,
        solver={"name": solution.solver, "optimal": solution.optimal}, settings=config.recorded(),
        baseline=baseline,
    )


def _activation_bits(raw: Mapping[str, Any], config: PlanConfig) -> dict[str, int]:
    options = [o for o in activation_options(raw, bits=config.bits, keep_float=config.keep_float) if not o.float]
    if not options:
        return {}
    capacity = sum(o.candidates[0].cost_bits / o.candidates[0].bits for o in options) * config.act_budget
    try:
        solution = solve(_items(options), (capacity,), solver=config.solver)
    except InfeasibleError as exc:
        raise ConfigError(f"activation budget {config.act_budget:g}bit cannot be reached with bits "
                          f"{min(config.bits)}..{max(config.bits)}") from exc
    return {o.name: o.candidates[i].bits for o, i in zip(options, solution.choice)}


def _gradient_bits(raw: Mapping[str, Any], config: PlanConfig) -> Mapping[str, int | None]:
    """The fewest bits under ``grad_tol``; or, with ``grad_budget``, the allocation of mean gradient
    bits that minimises the summed relative gradient errors (the same knapsack)."""
    if config.grad_budget is None:
        return gradient_bits(raw, bits=config.bits, tol=config.grad_tol)
    options = [o for o in gradient_options(raw, bits=config.bits, keep_float=config.keep_float) if not o.float]
    if not options:
        raise ConfigError("--grad-budget needs measured gradient errors: run `qanalyze analyze` with the gradients "
                          "metric")
    capacity = config.grad_budget * sum(o.params for o in options)
    try:
        solution = solve(_items(options), (capacity,), solver=config.solver)
    except InfeasibleError as exc:
        raise ConfigError(f"gradient budget {config.grad_budget:g}bit cannot be reached with the measured gradient "
                          f"bits; the smallest reachable is {exc.minimum[0] / (capacity / config.grad_budget):.2f}bit"
                          ) from None
    return {o.name: o.candidates[i].bits for o, i in zip(options, solution.choice)}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None



# ---------------------------------------------------------------------------------------------------------------------
# uniform (bits, layout) configurations, for PTQ sweeps


@dataclass(frozen=True)
class UniformLayout:
    """One uniform configuration: every planned module at ``bits`` in group layout ``group``, with the exact
    storage of the planned weights (``cost_bits``, every scale and zero point) and the plan's ``weight_bytes``
    (float modules included, as `make_plan`'s ``totals.weight_bytes``)."""

    bits: int
    group: str
    cost_bits: float
    weight_bytes: int

    @property
    def text(self) -> str:
        """``uniform:3:g64``: the plan's ``budget.text``."""
        return f"uniform:{self.bits}:{self.group}"


def uniform_layouts(report: SensitivityReport, config: PlanConfig = PlanConfig()) -> list[UniformLayout]:
    """Every uniform (bits, layout) configuration the report's model can take under ``config`` (its bits, its
    groups with ``auto`` resolved: the column layouts on task ``lm``, its float modules), cheapest first.

    A configuration is offered only when every planned module offers it: a layout whose G does not divide
    some module's input width (g128 on SmolLM2's 576 columns) is no uniform configuration, rather than one
    that quietly gives that module another layout. A sweep takes those whose ``weight_bytes`` are at most a
    plan's and reports the best (`uniform_layout_plan` makes each one's plan)."""
    _, config, options, _, _ = _prepare(report, config)
    planned = [o for o in options if not o.float]
    float_bits = sum(o.float_cost_bits for o in options if o.float)
    found = []
    for bits, group in (c.label for c in planned[0].candidates):
        chosen = [next((c for c in o.candidates if c.label == (bits, group)), None) for o in planned]
        if all(chosen):
            cost = math.fsum(c.cost_bits for c in chosen)
            found.append(UniformLayout(bits, group, cost, math.ceil((cost + float_bits) / 8)))
    return sorted(found, key=lambda u: (u.cost_bits, u.bits, u.group))


def uniform_layout_plan(report: SensitivityReport, bits: int, group: str, config: PlanConfig = PlanConfig(), *,
                        sensitivity_path: str | Path | None = None) -> BitPlan:
    """The plan of one uniform configuration: every planned module at ``bits`` in layout ``group`` (activations
    and gradients as `make_plan` plans them), ``baseline: "uniform"``, ``budget.text`` ``uniform:3:g64``.
    ConfigError naming a module that does not offer (``bits``, ``group``) and the layouts that module has."""
    raw, config, options, planned, floats = _prepare(report, config)
    group = parse_layout(group)
    label = (bits, group)
    choice = []
    for option in planned:
        index = next((j for j, c in enumerate(option.candidates) if c.label == label), None)
        if index is None:
            offered = ", ".join(dict.fromkeys(f"{c.bits}:{c.group}" for c in option.candidates))
            raise ConfigError(f"uniform:{bits}:{group} does not apply to module {option.name} (it offers {offered})")
        choice.append(index)
    activation = _activation_bits(raw, config)
    items = _items(planned) if config.bops is None else _items_with_bops(planned, activation, config.seq_len)
    table = make_table(items)
    cost = math.fsum(o.candidates[j].cost_bits for o, j in zip(planned, choice))
    # no budget to meet: the configuration's own storage is its capacity
    capacities = (cost,) if config.bops is None else (cost, config.bops)
    solution = make_solution(table, choice, cost_scales(capacities), "uniform", False, time.perf_counter())
    budget = {"text": f"uniform:{bits}:{group}", "kind": "uniform", "value": bits}
    return _assemble(raw, budget, config, options, planned, floats, solution, sensitivity_path, "uniform",
                     activation, cost)
