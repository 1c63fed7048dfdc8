"""Per module, the candidates a plan can choose from: their storage cost and predicted damage.

A weight candidate is a (bits, group) pair. Its cost is the storage of the quantized weight,
``bits * n + SCALE_BITS * groups`` bits for a row layout (n weight elements, one fp16 scale per group;
symmetric, so there is no zero point; a bits budget lets each tensor's first scale go free, see
`qanalyze.plan.budget`). A column layout (``g32``, ``g64``, ``g128``, ``row``; `qanalyze.quant.layouts`) is
asymmetric: its cost is exactly `qanalyze.quant.columns.storage_bits`, ``bits * n + 16 * groups + bits *
groups`` (a float16 scale and a ``bits``-bit zero point per group), with ``groups = out * in / G``; a GGML type
(``Q4_K``...) costs its exact bytes per block (`qanalyze.quant.layouts.column_storage_bits`).
A candidate's damage is the loss change the chosen objective predicts from ``sensitivity.json`` (see
`OBJECTIVES`). Modules the user keeps in floating point get no
candidates and cost ``32 * n``.

Activation candidates (`activation_options`) have the same form with activation bits, and
gradient bits (`gradient_bits`) are the fewest bits whose measured error stays under a tolerance.
Everything here is a pure function of the report: the solvers take it from there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qanalyze.errors import ConfigError
from qanalyze.plan.budget import FLOAT_BITS, SCALE_BITS
from qanalyze.quant.columns import COLUMN_BITS
from qanalyze.quant.layouts import (
    COLUMN_LAYOUTS,
    column_groups_per_row,
    column_storage_bits,
    is_column_layout,
    parse_layout,
    takes_columns,
)
from qanalyze.quant.primitives import BITS_RANGE, rows_per_group
from qanalyze.records import MODULE_KINDS, SensitivityReport

DEFAULT_BITS = (2, 3, 4, 5, 6, 8, 12, 16)
"""Bit widths offered to every module unless ``--bits`` says otherwise."""

DEFAULT_GROUPS = ("tensor", "channel", "head", "128", "64", "32")
"""Group layouts offered to every module of a classifier unless ``--group-sizes`` says otherwise."""

LM_GROUPS = COLUMN_LAYOUTS
"""Group layouts offered by default on task ``lm``: the column groups of LLM formats (g32, g64, g128, per
row), what the PTQ methods run; an LM analysis measures them by default."""

AUTO_GROUPS = "auto"
"""The ``groups`` item that stands for the task's default layouts (`resolve_groups`)."""


def resolve_groups(groups: Sequence[str], kind: str | None,
                   target_layouts: Sequence[str] | None = None) -> tuple[str, ...]:
    """``groups``, with ``("auto",)`` made the defaults: the layouts of the engine target (``target_layouts``,
    `qanalyze.quant.targets.Target.layouts`) when one is named, else those of task kind ``kind``: `LM_GROUPS`
    for ``lm``, `DEFAULT_GROUPS` otherwise."""
    if tuple(groups) == (AUTO_GROUPS,):
        if target_layouts:
            return tuple(target_layouts)
        return LM_GROUPS if kind == "lm" else DEFAULT_GROUPS
    if AUTO_GROUPS in groups:
        raise ConfigError("group layouts: 'auto' stands alone (the task's defaults), it does not mix with others")
    return tuple(groups)

DEFAULT_KEEP_FLOAT = ("layernorm", "rmsnorm", "head")
"""Kept in floating point by default, as the papers do: layer norms and the task head."""

STAGES = ("embeddings", "layers", "head")
"""Stages a module can belong to (``entry["stage"]`` in sensitivity.json)."""

REGEX_PREFIX = "re:"
"""Prefix of a ``keep_float`` item that is a regular expression searched in module names."""


# ---------------------------------------------------------------------------------------------------------------------
# objectives: (entry, bits, group) -> predicted damage


def _weight_error(entry: Mapping[str, Any], bits: int, group: str) -> float:
    value = entry["weight_error"][str(bits)][group]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"weight_error[{bits}][{group}] is {value!r}, not a number")
    return float(value)


def _hessian_number(entry: Mapping[str, Any], key: str, metric: str) -> float:
    value = (entry.get("hessian") or {}).get(key)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"has hessian.{key} = {value}: the analysis overflowed; analyze again")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"has no hessian.{key}: run `qanalyze analyze` with the {metric} metric")
    return float(value)


def _trace_damage(entry: Mapping[str, Any], bits: int, group: str) -> float:
    """HAWQ-V2: (tr(H) / n) * ||Q(W) - W||^2."""
    # The average trace is a Hutchinson estimate; for a flat module it scatters around 0 and can come
    # out negative. A negative curvature sum would reward quantizing, and 0 would make the module
    # free: both read noise as information. The floor is the estimate's own standard error: the
    # curvature is not known to be smaller than that.
    average = _hessian_number(entry, "avg_trace", "trace")
    stderr = (entry.get("hessian") or {}).get("trace_stderr")
    params = math.prod(_shape("", entry)) if entry.get("shape") else 0
    floor = stderr / params if isinstance(stderr, (int, float)) and stderr > 0 and params else 0.0
    return max(average, floor) * _weight_error(entry, bits, group)


def _eig_damage(entry: Mapping[str, Any], bits: int, group: str) -> float:
    """Q-BERT: Omega * ||Q(W) - W||^2 with Omega = |mean(lambda)| + std(lambda) >= 0."""
    return _hessian_number(entry, "omega", "eig") * _weight_error(entry, bits, group)


def _measured_damage(entry: Mapping[str, Any], bits: int, group: str) -> float:
    """The measured loss change of quantizing this module alone (per channel) at ``bits``, carried to
    ``group`` by the ratio of weight errors."""
    measured = (entry.get("delta_loss") or {}).get("measured")
    if not measured:
        raise ConfigError("has no measured loss change: run `qanalyze analyze` with --measure-delta-loss")
    value = measured.get(str(bits))
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"has no measured loss change at {bits} bits (measured: {', '.join(measured)}); "
                          "choose bits among the measured ones")
    # The analysis measures with one scale per output row, so that is the reference the ratio scales from.
    if "channel" not in (entry.get("weight_error") or {}).get(str(bits), {}):
        raise ConfigError("has no weight error of layout channel, which the measured loss change scales from: "
                          "analyze with the channel layout among the groups")
    reference = _weight_error(entry, bits, "channel")
    ratio = _weight_error(entry, bits, group) / reference if reference > 0 else 1.0
    # A negative change (the quantized model did better on the probe batches) is sampling noise for
    # planning, like a negative trace: it must not make the solver prefer fewer bits.
    return max(float(value), 0.0) * ratio


def _score(entry: Mapping[str, Any], key: str, metric: str, bits: int, group: str) -> float:
    """``entry[key][bits][group]``; a bit width the analysis did not score takes the nearest scored one's value
    times the ratio of weight errors (the scores, like ‖ΔW‖², grow with the rounding noise)."""
    scores = entry.get(key)
    if not isinstance(scores, Mapping) or not scores:
        raise ConfigError(f"has no {key}: run `qanalyze analyze` with the {metric} metric")
    scored = sorted(int(b) for b in scores if isinstance(scores[b], Mapping) and group in scores[b])
    if not scored:
        raise ConfigError(f"has no {key} for group {group} (scored: {', '.join(next(iter(scores.values())))})")
    nearest = min(scored, key=lambda b: (abs(b - bits), b))
    value = scores[str(nearest)][group]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key}[{nearest}][{group}] is {value!r}, not a non-negative number")
    if nearest == bits:
        return float(value)
    reference = _weight_error(entry, nearest, group)
    return float(value) * (_weight_error(entry, bits, group) / reference if reference > 0 else 0.0)


def _fisher_damage(entry: Mapping[str, Any], bits: int, group: str) -> float:
    """Empirical-Fisher weighted error Σ F_ii ΔW_i² (``fisher_error``)."""
    return _score(entry, "fisher_error", "fisher", bits, group)


def _output_gradient_damage(entry: Mapping[str, Any], bits: int, group: str) -> float:
    """ModelOpt AutoQuantize's E[Σ (∂L/∂Y)² (Y − Y_q)²] (``output_gradient_error``)."""
    return _score(entry, "output_gradient_error", "output-gradient", bits, group)


OBJECTIVES: dict[str, Callable[[Mapping[str, Any], int, str], float]] = {
    "trace": _trace_damage,
    "eig": _eig_damage,
    "measured": _measured_damage,
    "fisher": _fisher_damage,
    "output-gradient": _output_gradient_damage,
}
"""Objective name -> ``damage(entry, bits, group)``: the loss change a candidate is predicted to cause."""


# ---------------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Candidate:
    """One choice for a module: ``bits`` with ``groups`` scales laid out as ``group``.

    ``cost_bits`` is its storage in bits (weights: ``bits * n + SCALE_BITS * groups``, plus ``bits * groups``
    zero points for a column layout; activations: ``bits`` per input element of one token) and ``damage`` its
    predicted loss change.
    """

    bits: int
    group: str
    groups: int
    cost_bits: float
    damage: float

    @property
    def label(self) -> tuple[int, str]:
        """``(bits, group)``: what a plan records, and what tied modules must share."""
        return (self.bits, self.group)


def _order(candidate: Candidate) -> tuple[float, int, str]:
    return (candidate.cost_bits, candidate.bits, candidate.group)


@dataclass(frozen=True)
class ModuleOptions:
    """A module (or a tie of modules named ``"a+b+c"``) and its candidates, cheapest first.

    ``params`` is the number of elements the costs count (weights: ``prod(shape)``, bias excluded;
    activations: input elements per token). A module kept in floating point has ``float`` True, no
    candidates, and costs `float_cost_bits`.
    """

    name: str
    kind: str
    block: int | None
    params: int
    shape: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    float: bool = False

    def __post_init__(self) -> None:
        if self.float and self.candidates:
            raise ConfigError(f"module {self.name} is kept in floating point but has candidates")
        if not self.float and not self.candidates:
            raise ConfigError(f"module {self.name} has no candidate (bits, group) to choose from")
        if list(self.candidates) != sorted(self.candidates, key=_order):
            raise ConfigError(f"module {self.name}: candidates must be sorted by (cost_bits, bits, group)")

    @property
    def float_cost_bits(self) -> float:
        """Storage when kept in FP32: ``32 * params``."""
        return float(FLOAT_BITS * self.params)

    @property
    def min_cost_bits(self) -> float:
        """The least storage this module can take: its cheapest candidate, or FP32 when kept float."""
        return self.float_cost_bits if self.float else self.candidates[0].cost_bits

    @property
    def members(self) -> tuple[str, ...]:
        """Names of the modules this stands for: itself, or every module of a tie (module paths never hold "+")."""
        return tuple(self.name.split("+"))


# ---------------------------------------------------------------------------------------------------------------------
# reading the report


def _modules(report: Mapping[str, Any] | SensitivityReport) -> Mapping[str, Mapping[str, Any]]:
    modules = report.modules if isinstance(report, SensitivityReport) else (
        report.get("modules") if isinstance(report, Mapping) else None)
    if not isinstance(modules, Mapping) or not modules:
        raise ConfigError("the sensitivity report has no modules")
    return modules


def _shape(name: str, entry: Mapping[str, Any]) -> tuple[int, ...]:
    shape = entry.get("shape")
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ConfigError(f"module {name}: shape {shape!r} is not a list of positive integers")
    return tuple(shape)


def _check_bits(bits: Sequence[int]) -> tuple[int, ...]:
    if isinstance(bits, (str, bytes)) or not bits:
        raise ConfigError(f"bits must be a non-empty list of integers, not {bits!r}")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or b not in BITS_RANGE:
            raise ConfigError(f"bits must be integers from {BITS_RANGE.start} to {BITS_RANGE.stop - 1}, not {b!r}")
    return tuple(sorted(set(bits)))


def _check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    if isinstance(groups, (str, bytes)) or not groups:
        raise ConfigError(f"groups must be a non-empty list of group names, not {groups!r}")
    return tuple(dict.fromkeys(parse_layout(g) for g in groups))


FLOAT_SELECTORS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    **{kind: (lambda name, entry, kind=kind: entry.get("kind") == kind) for kind in MODULE_KINDS},
    **{stage: (lambda name, entry, stage=stage: entry.get("stage") == stage) for stage in STAGES},
}
"""Named ``keep_float`` items (module kinds and stages) -> predicate(name, entry); ``re:<regex>`` is the other form."""


def _float_selector(spec: str) -> Callable[[str, Mapping[str, Any]], bool]:
    """One ``keep_float`` item -> predicate(name, entry)."""
    if not isinstance(spec, str):
        raise ConfigError(f"keep_float items must be strings, not {spec!r}")
    if spec.startswith(REGEX_PREFIX):
        try:
            pattern = re.compile(spec[len(REGEX_PREFIX):])
        except re.error as exc:
            raise ConfigError(f"keep_float {spec!r} is not a valid regular expression: {exc}") from None
        return lambda name, entry: pattern.search(name) is not None
    if spec not in FLOAT_SELECTORS:
        raise ConfigError(f"keep_float {spec!r} is not a module kind ({', '.join(MODULE_KINDS)}), "
                          f"a stage ({', '.join(STAGES)}) or '{REGEX_PREFIX}<regex>' of module names")
    return FLOAT_SELECTORS[spec]


def _keeps_float(keep_float: Sequence[str]) -> Callable[[str, Mapping[str, Any]], bool]:
    if isinstance(keep_float, str):
        # a bare string would be read letter by letter; the caller meant a one-item list
        keep_float = (keep_float,)
    selectors = [_float_selector(spec) for spec in keep_float]
    return lambda name, entry: any(select(name, entry) for select in selectors)


def _objective(name: str) -> Callable[[Mapping[str, Any], int, str], float]:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def _column_cost(name: str, entry: Mapping[str, Any], shape: tuple[int, ...], bits: int,
                 group: str) -> tuple[int, float]:
    """Scales and exact storage (`column_storage_bits`) of column candidate (``bits``, ``group``)."""
    if len(shape) != 2:
        raise ConfigError(f"module {name}: column layout {group} needs an (out, in) weight, not shape {list(shape)}")
    per_row = (entry.get("column_groups") or {}).get(group)
    if per_row is None:
        # the analysis records it (`column_groups`); the rule is the same
        per_row = column_groups_per_row(group, shape[1])
    if isinstance(per_row, bool) or not isinstance(per_row, int) or per_row != column_groups_per_row(group, shape[1]):
        raise ConfigError(f"module {name}: column layout {group} has {per_row!r} groups per row for {shape[1]} "
                          "input columns")
    return shape[0] * per_row, float(column_storage_bits(bits, group, shape[0], shape[1]))


def _groups_of(name: str, entry: Mapping[str, Any], shape: tuple[int, ...], group: str) -> int:
    rows = (entry.get("group_rows") or {}).get(group)
    if rows is None:
        # older files lack group_rows; the layout rule is the same one the analysis used
        rows = rows_per_group(shape[0], group, head_dim=entry.get("head_dim"))
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0 or shape[0] % rows:
        raise ConfigError(f"module {name}: group {group} has {rows!r} rows per group for {shape[0]} rows")
    return shape[0] // rows


# ---------------------------------------------------------------------------------------------------------------------
# weights


def module_options(
    report: Mapping[str, Any] | SensitivityReport,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    groups: Sequence[str] = DEFAULT_GROUPS,
    objective: str = "trace",
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
) -> list[ModuleOptions]:
    """Weight candidates of every module of ``report``, in the report's module order.

    ``keep_float`` items are module kinds ("linear", "embedding", "layernorm", "rmsnorm"), stages
    ("embeddings", "layers", "head"; "head" is the task head and anything after the layer stack)
    or ``"re:<regex>"`` searched in module names; matching modules stay in floating point. A group
    missing from a module's ``weight_error`` does not apply to it (it does not divide its rows or, for a
    column layout, its input columns; the module has no heads) and is skipped; a bit width missing from it
    is a `ConfigError` (unless every group is a column layout and the bits lie outside 2..8, where column layouts
    do not exist). When every group is a column layout, modules that take none (embeddings, norms:
    `qanalyze.quant.layouts.takes_columns`) stay in floating point, as GPTQ/AWQ checkpoints keep them.
    """
    bits = _check_bits(bits)
    groups = _check_groups(groups)
    damage = _objective(objective)
    keeps_float = _keeps_float(keep_float)
    columns_only = all(is_column_layout(g) for g in groups)
    options = []
    for name, entry in _modules(report).items():
        shape = _shape(name, entry)
        params = math.prod(shape)
        common = {"name": name, "kind": entry.get("kind"), "block": entry.get("block"), "params": params,
                  "shape": shape}
        if keeps_float(name, entry) or (columns_only and not takes_columns(entry.get("kind"),
                                                                            bool(entry.get("transposed")))):
            options.append(ModuleOptions(**common, candidates=(), float=True))
            continue
        errors = entry.get("weight_error") or {}
        # column layouts exist at 2 to 8 bits only: a column plan's other bits are no candidates, measured or not
        missing = [b for b in bits if str(b) not in errors and not (columns_only and b not in COLUMN_BITS)]
        if missing:
            raise ConfigError(f"module {name} has no weight error at {', '.join(map(str, missing))} bits "
                              f"(measured: {', '.join(errors) or 'none'}); analyze with those bits or pass --bits")
        candidates = []
        for b in bits:
            for group in groups:
                if group not in errors.get(str(b), {}):
                    continue
                if is_column_layout(group):
                    count, cost = _column_cost(name, entry, shape, b, group)
                else:
                    count = _groups_of(name, entry, shape, group)
                    cost = float(b * params + SCALE_BITS * count)
                try:
                    predicted = damage(entry, b, group)
                except ConfigError as exc:
                    raise ConfigError(f"module {name} {exc}") from None
                candidates.append(Candidate(bits=b, group=group, groups=count, cost_bits=cost, damage=predicted))
        if not candidates:
            raise ConfigError(f"module {name}: none of the groups {', '.join(groups)} applies to it")
        options.append(ModuleOptions(**common, candidates=tuple(sorted(candidates, key=_order))))
    return options


# ---------------------------------------------------------------------------------------------------------------------
# ties


def tie_groups(options: list[ModuleOptions], patterns: Sequence[str]) -> list[list[int]]:
    """Groups of modules that must share (bits, group), as indices into ``options``.

    For each pattern (a regular expression searched in module names, e.g.
    ``attention.self.(query|key|value)``), quantized modules it matches are grouped by the rest of
    their name (the name with the matched part cut out: the same layer, say). A module joins the
    first pattern's group that takes it; groups of one module constrain nothing and are dropped.
    Groups come in the order of their first member. A pattern that matches no quantized module (not
    even one an earlier pattern took) is a `ConfigError`.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    taken: set[int] = set()
    found: list[list[int]] = []
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ConfigError(f"tie pattern {pattern!r} is not a valid regular expression: {exc}") from None
        by_rest: dict[tuple[str, str], list[int]] = {}
        for i, option in enumerate(options):
            match = None if option.float or i in taken else compiled.search(option.name)
            if match is not None:
                by_rest.setdefault((option.name[:match.start()], option.name[match.end():]), []).append(i)
        if not by_rest and not any(compiled.search(o.name) for i, o in enumerate(options) if i in taken):
            raise ConfigError(f"tie pattern {pattern!r} matches no quantized module")
        for members in by_rest.values():
            taken.update(members)
            if len(members) > 1:
                found.append(members)
    return sorted(found)


def _common(values: list[Any], mixed: Any) -> Any:
    return values[0] if all(v == values[0] for v in values) else mixed


def _merge(members: list[ModuleOptions]) -> ModuleOptions:
    name = "+".join(m.name for m in members)
    by_label = [{c.label: c for c in m.candidates} for m in members]
    labels = set(by_label[0]).intersection(*by_label[1:])
    if not labels:
        raise ConfigError(f"tied modules {name} have no (bits, group) choice in common")
    candidates = []
    for label in labels:
        chosen = [table[label] for table in by_label]
        candidates.append(Candidate(bits=label[0], group=label[1], groups=sum(c.groups for c in chosen),
                                    cost_bits=math.fsum(c.cost_bits for c in chosen),
                                    damage=math.fsum(c.damage for c in chosen)))
    params = sum(m.params for m in members)
    return ModuleOptions(
        name=name,
        kind=_common([m.kind for m in members], "+".join(dict.fromkeys(m.kind for m in members))),
        block=_common([m.block for m in members], None),
        params=params,
        # members of different shapes have no one shape; the flat count is what costs are made of
        shape=_common([m.shape for m in members], (params,)),
        candidates=tuple(sorted(candidates, key=_order)),
    )


def merge_ties(options: list[ModuleOptions], ties: list[list[int]]) -> list[ModuleOptions]:
    """Replace each tie group by one `ModuleOptions` named ``"a+b+c"`` (members in index order) whose
    candidates are the (bits, group) labels all members share, with costs, groups and damages summed.

    The merged entry takes its first member's place; the other modules keep their order.
    """
    owner: dict[int, int] = {}
    for t, tie in enumerate(ties):
        for i in tie:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(options):
                raise ConfigError(f"tie {tie!r} names index {i!r}, outside 0..{len(options) - 1}")
            if i in owner:
                raise ConfigError(f"module {options[i].name} is in more than one tie")
            if options[i].float:
                raise ConfigError(f"module {options[i].name} is kept in floating point and cannot be tied")
            owner[i] = t
    merged = {min(tie): _merge([options[i] for i in sorted(tie)]) for tie in ties if tie}
    return [merged.get(i, option) for i, option in enumerate(options) if i not in owner or i in merged]


# ---------------------------------------------------------------------------------------------------------------------
# activations and gradients


def activation_options(
    report: Mapping[str, Any] | SensitivityReport,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
) -> list[ModuleOptions]:
    """Activation candidates of every module, in the form of `module_options`.

    A module's input is quantized per tensor at run time (no stored scale), so a candidate costs
    ``bits`` per input element of one token (``params`` = the input width ``shape[-1]``: in_features
    for a linear, the normalized width for a norm) and its damage is the second-order loss change
    ``activation_weighted_error[bits]`` = E[sum (dL/dX)^2 (Q(X) - X)^2]. Modules with no activation
    data (embeddings take token ids) stay float; a module with activation errors but no weighted
    ones, or without some of ``bits``, is a `ConfigError`.
    """
    bits = _check_bits(bits)
    keeps_float = _keeps_float(keep_float)
    options = []
    for name, entry in _modules(report).items():
        shape = _shape(name, entry)
        common = {"name": name, "kind": entry.get("kind"), "block": entry.get("block"), "params": shape[-1],
                  "shape": shape}
        weighted = entry.get("activation_weighted_error")
        if keeps_float(name, entry) or (not weighted and not entry.get("activation_error")):
            options.append(ModuleOptions(**common, candidates=(), float=True))
            continue
        if not weighted:
            raise ConfigError(f"module {name} has activation errors but no activation_weighted_error: "
                              "run `qanalyze analyze` with the gradients metric")
        missing = [b for b in bits if not isinstance(weighted.get(str(b)), (int, float))]
        if missing:
            raise ConfigError(f"module {name} has no activation error at {', '.join(map(str, missing))} bits "
                              f"(measured: {', '.join(weighted)})")
        candidates = [Candidate(bits=b, group="tensor", groups=1, cost_bits=float(b * shape[-1]),
                                damage=float(weighted[str(b)])) for b in bits]
        options.append(ModuleOptions(**common, candidates=tuple(sorted(candidates, key=_order))))
    return options


def _within(value: object, tol: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value <= tol


def gradient_bits(
    report: Mapping[str, Any] | SensitivityReport,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    tol: float = 0.05,
) -> dict[str, int | None]:
    """Per module, the fewest of ``bits`` whose measured relative error of the weight gradient and of
    the input gradient are both at most ``tol``; None when no measured bit width meets it or the
    module has no gradient data (the caller then keeps its gradients at 16 bits or float). Bit
    widths that were not measured are not considered."""
    bits = _check_bits(bits)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ConfigError(f"the gradient tolerance must be a positive number, not {tol!r}")
    chosen: dict[str, int | None] = {}
    for name, entry in _modules(report).items():
        measured = entry.get("gradient_error") or {}
        chosen[name] = next(
            (b for b in bits
             if isinstance(err := measured.get(str(b)), Mapping)
             and _within(err.get("weight_grad"), tol) and _within(err.get("input_grad"), tol)),
            None,
        )
    return chosen


def gradient_options(
    report: Mapping[str, Any] | SensitivityReport,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
) -> list[ModuleOptions]:
    """Gradient candidates of every module with measured gradient errors, for ``--grad-budget``.

    The output gradient is quantized per tensor in the backward pass, so a candidate costs ``bits``
    per output element of one token (``params`` = ``shape[0]``, out_features) and its damage is the
    measured relative error of the weight gradient plus that of the input gradient. Only measured
    bit widths among ``bits`` are candidates; modules without gradient data stay float.
    """
    bits = _check_bits(bits)
    keeps_float = _keeps_float(keep_float)
    options = []
    for name, entry in _modules(report).items():
        shape = _shape(name, entry)
        common = {"name": name, "kind": entry.get("kind"), "block": entry.get("block"), "params": shape[0],
                  "shape": shape}
        measured = entry.get("gradient_error") or {}
        candidates = [
            Candidate(bits=b, group="tensor", groups=1, cost_bits=float(b * shape[0]),
                      damage=float(err["weight_grad"] + err["input_grad"]))
            for b in bits
            if isinstance(err := measured.get(str(b)), Mapping)
            and isinstance(err.get("weight_grad"), (int, float)) and isinstance(err.get("input_grad"), (int, float))
        ]
        if keeps_float(name, entry) or not candidates:
            options.append(ModuleOptions(**common, candidates=(), float=True))
        else:
            options.append(ModuleOptions(**common, candidates=tuple(sorted(candidates, key=_order))))
    return options
