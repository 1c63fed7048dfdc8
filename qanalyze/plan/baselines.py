"""Baselines at (about) equal cost, each reporting the TRUE damage of its choice: what the Hessian bought.

- `uniform_choice`: the same label (e.g. (bits, group)) for every module;
- `random_choice`: random damages, seeded, held at the optimal plan's cost;
- `reversed_choice`: most bits to the least sensitive;
- `rule_mix_choice`: llama.cpp's Q4_K_M-style rule, base bits everywhere and two more for the attention value
  and MLP down projections of the layers `use_more_bits` picks (`rule_mix_modules`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Hashable, Sequence

import numpy as np

from qanalyze.errors import ConfigError
from qanalyze.plan.knapsack import (
    InfeasibleError,
    Item,
    Options,
    Solution,
    check_vector,
    cost_scales,
    exact_totals,
    fits_within,
    make_solution,
    make_table,
)
from qanalyze.plan.solvers import solve

EQUAL_COST_RTOL = 0.01
"""`random_choice` keeps its total cost within this fraction below the optimal plan's cost."""

SENSITIVITY_FLOOR = 1e-12
"""`reversed_choice` lifts sensitivities to at least this fraction of the largest positive one."""


def uniform_choice(options: Options, capacities: Sequence[float], labels: Sequence[Sequence[Hashable]]) -> Solution:
    """The same label (e.g. (bits, group)) for every module: among the labels every module offers,
    the one whose total cost fits and is highest ("as many bits as the budget allows, the same
    for all"; cost share for several constraints), ties to the lower damage, then to the earlier
    label in module 0's order. `labels[i][j]` names option j of module i; a label may appear
    once per module. `InfeasibleError` when no common label fits."""
    start = time.perf_counter()
    table = make_table(options)
    caps = check_vector(capacities, table.constraints, "capacities")
    if len(labels) != table.modules:
        raise ConfigError(f"labels has {len(labels)} rows for {table.modules} modules")
    where: list[dict[Hashable, int]] = []
    for i, row in enumerate(labels):
        if len(row) != table.counts[i]:
            raise ConfigError(f"module {i} has {table.counts[i]} options but {len(row)} labels")
        index = {label: j for j, label in enumerate(row)}
        if len(index) != len(row):
            raise ConfigError(f"module {i} repeats a label: {list(row)}")
        where.append(index)
    common = [label for label in labels[0] if all(label in index for index in where)]
    if not common:
        raise ConfigError("no label is offered by every module, so no uniform choice exists")
    scales = cost_scales(caps)
    candidates = []
    for position, label in enumerate(common):
        choice = [index[label] for index in where]
        damage, costs, share = exact_totals(table, choice, scales)
        candidates.append((choice, damage, costs, share, position))
    fitting = [c for c in candidates if fits_within(c[2], caps, None)]
    if not fitting:
        cheapest = tuple(min(c[2][k] for c in candidates) for k in range(table.constraints))
        raise InfeasibleError(cheapest, caps, "no uniform choice fits the budget")
    choice = min(fitting, key=lambda c: (-c[3], c[1], c[4]))[0]
    return make_solution(table, choice, scales, "uniform", False, start)


def random_choice(
    options: Options,
    capacities: Sequence[float],
    *,
    seed: int,
    solver: str = "ilp",
    reference: Solution | None = None,
) -> Solution:
    """Random allocation at equal cost: every damage replaced by an independent U(0, 1) draw
    (`numpy.random.default_rng(seed)`, module by module, option by option), the knapsack solved
    with those, and the TRUE damage of that choice reported.

    Random damages carry no preference for expensive options, so on their own they leave a
    generous budget partly unused (measured on 60 modules x 48 options: 90 % of an 8-bit budget,
    61 % of a 12-bit one). The solve therefore also requires every total cost to be at least
    (1 - `EQUAL_COST_RTOL`) of the optimal plan's, which that plan itself satisfies, so the
    problem stays feasible. `reference` is the optimal plan when the caller already has it;
    otherwise it is solved here with the same solver."""
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    table = make_table(options)
    caps = check_vector(capacities, table.constraints, "capacities")
    if reference is None:
        reference = solve(options, caps, solver=solver)
    rng = np.random.default_rng(seed)
    draws = [rng.random(len(module)) for module in options]
    noise = [[Item(item.costs, float(u)) for item, u in zip(module, row)] for module, row in zip(options, draws)]
    floors = tuple((1.0 - EQUAL_COST_RTOL) * c for c in reference.costs)
    picked = solve(noise, caps, solver=solver, floors=floors)
    return make_solution(table, picked.choice, cost_scales(caps), f"random:{picked.solver}", False, start)


def reversed_choice(
    options: Options,
    capacities: Sequence[float],
    sensitivity: Sequence[float],
    *,
    solver: str = "ilp",
) -> Solution:
    """Most bits to the least sensitive: the module of rank r in `sensitivity` (descending, ties
    by index) keeps its damage profile damage_ij / s_i but takes the sensitivity of rank M-1-r;
    the knapsack is solved with those damages and the TRUE damage reported. Sensitivities below
    `SENSITIVITY_FLOOR` of the largest positive one (zero, negative noise) are lifted to it, so
    the profile division is defined; they rank as given."""
    start = time.perf_counter()
    table = make_table(options)
    caps = check_vector(capacities, table.constraints, "capacities")
    values = [float(s) for s in sensitivity]
    if len(values) != table.modules:
        raise ConfigError(f"{len(values)} sensitivities for {table.modules} modules")
    if not all(math.isfinite(s) for s in values):
        raise ConfigError(f"sensitivities must be finite, got {values}")
    positive = [s for s in values if s > 0]
    lifted = [max(s, SENSITIVITY_FLOOR * max(positive)) if positive else 1.0 for s in values]
    order = sorted(range(table.modules), key=lambda i: (-values[i], i))
    partner = {module: order[table.modules - 1 - rank] for rank, module in enumerate(order)}
    swapped = [
        [Item(item.costs, item.damage / lifted[i] * lifted[partner[i]]) for item in module]
        for i, module in enumerate(options)
    ]
    picked = solve(swapped, caps, solver=solver)
    return make_solution(table, picked.choice, cost_scales(caps), f"reversed:{picked.solver}", False, start)


RULE_MIX_EXTRA_BITS = 2
"""Bits the rule mix adds to the modules it favours (llama.cpp Q4_K_M: q4_K base, q6_K for them)."""

RULE_MIX_MODULES = ("v_proj", "down_proj")
"""The module names (last part) the rule mix favours: llama.cpp's ``attn_v`` and ``ffn_down``."""

DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
"""A decoder layer's index in a module name (``model.layers.<i>.self_attn.v_proj``)."""


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits(i_layer, n_layers)``: the first and last eighth of the layers and every third
    layer between them (``i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2``, integer division)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def rule_mix_modules(names: Sequence[str]) -> set[str]:
    """The modules of ``names`` the rule mix gives more bits: the `RULE_MIX_MODULES` of the decoder layers
    `use_more_bits` picks, the number of layers being the highest index in ``names`` plus one. ConfigError
    when no name is a decoder layer's (``model.layers.<i>.``) or none is a value or down projection."""
    layers = {name: int(found.group(1)) for name in names if (found := DECODER_LAYER.search(name))}
    if not layers:
        example = f" (modules such as {names[0]})" if names else ""
        raise ConfigError(f"the rule-mix baseline needs a decoder whose modules are named model.layers.<i>.…"
                          f"{example}: it picks layers by their index, as llama.cpp does")
    favoured = [name for name in layers if name.rsplit(".", 1)[-1] in RULE_MIX_MODULES]
    if not favoured:
        raise ConfigError(f"the rule-mix baseline favours the {' and '.join(RULE_MIX_MODULES)} modules of a decoder "
                          "layer, and this plan quantizes none")
    count = max(layers.values()) + 1
    return {name for name in favoured if use_more_bits(layers[name], count)}


def rule_mix_choice(options: Options, capacities: Sequence[float], labels: Sequence[Sequence[tuple[int, str]]],
                    favoured: Sequence[bool]) -> Solution:
    """The rule mix at a budget: every module at base bits b, the ``favoured`` ones at b +
    `RULE_MIX_EXTRA_BITS`, all in one group layout; the largest b with a layout that fits, and at that b the
    layout whose cost is highest (the finest). ``labels[i][j]`` is option j of module i as ``(bits, group)``.
    A (b, layout) some module does not offer is not a configuration; `InfeasibleError` when none fits,
    ConfigError when there is none at all."""
    start = time.perf_counter()
    table = make_table(options)
    caps = check_vector(capacities, table.constraints, "capacities")
    if len(labels) != table.modules or len(favoured) != table.modules:
        raise ConfigError(f"labels and favoured need one row per module ({table.modules})")
    where = [{label: j for j, label in enumerate(row)} for row in labels]
    scales = cost_scales(caps)
    found = []
    for base in sorted({label[0] for row in labels for label in row}, reverse=True):
        for group in dict.fromkeys(label[1] for row in labels for label in row):
            wanted = [(base + RULE_MIX_EXTRA_BITS if more else base, group) for more in favoured]
            if all(label in index for label, index in zip(wanted, where)):
                choice = [index[label] for label, index in zip(wanted, where)]
                _, costs, share = exact_totals(table, choice, scales)
                found.append((base, share, choice, costs))
    if not found:
        raise ConfigError(f"no group layout is offered to every module at some bits b and, for the favoured ones, "
                          f"b + {RULE_MIX_EXTRA_BITS}: widen --bits or --group-sizes")
    fitting = [f for f in found if fits_within(f[3], caps, None)]
    if not fitting:
        cheapest = tuple(min(f[3][k] for f in found) for k in range(table.constraints))
        raise InfeasibleError(cheapest, caps, "no rule-mix configuration fits the budget")
    choice = max(fitting, key=lambda f: (f[0], f[1]))[2]
    return make_solution(table, choice, scales, "rule-mix", False, start)
