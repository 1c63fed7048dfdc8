"""Solvers that need no backend: dynamic programming over a discretised cost, and brute force.

- `solve_dp`: one constraint; conservative (costs are rounded up to the grid, so the true cost
  never exceeds the capacity) and optimal on the grid, the tie rule applied exactly on the grid
  (cost measured in grid units), then polished in exact arithmetic;
- `brute_force`: every combination, the tie rule applied exactly: the reference for tests and
  tiny instances.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from qanalyze.errors import ConfigError
from qanalyze.plan.knapsack import (
    InfeasibleError,
    Options,
    Solution,
    Table,
    check_floors,
    check_vector,
    cost_scales,
    exact_totals,
    fits_within,
    make_solution,
    make_table,
    require_reachable,
    table_minimum,
    tie_tolerance,
)
from qanalyze.plan.polish import polish_choice

BRUTE_FORCE_LIMIT = 1_000_000
"""`brute_force` refuses instances with more combinations than this."""


def _grid(table: Table, capacity: float, resolution: int) -> tuple[np.ndarray, bool]:
    """Costs in grid units of capacity / resolution, rounded up in exact rational arithmetic so
    that sum(grid) <= resolution implies sum(cost) <= capacity; `resolution + 1` marks an option
    that can never fit. Also returns whether no cost was rounded."""
    unusable = resolution + 1
    grid = np.full(table.damage.shape, unusable, dtype=np.int64)
    exact = True
    unit = Fraction(capacity) / resolution if capacity > 0 else None
    for i, n in enumerate(table.counts):
        for j in range(n):
            cost = float(table.costs[i, j, 0])
            if cost == 0:
                grid[i, j] = 0
            elif unit is None:
                exact = False
            else:
                units = Fraction(cost) / unit
                exact = exact and units.denominator == 1
                grid[i, j] = min(math.ceil(units), unusable)
    return grid, exact


def _dp(table: Table, capacity: float, resolution: int, floor: float | None) -> tuple[tuple[int, ...], bool]:
    """The DP on a validated one-constraint table: (choice, whether no cost was rounded)."""
    grid, exact = _grid(table, capacity, resolution)
    values = np.empty((table.modules + 1, resolution + 1))
    values[-1] = 0.0
    if floor is not None:
        # exact-cost semantics, so that a lower bound on the grid cost can be imposed at the end
        values[-1, 1:] = np.inf
    for i in reversed(range(table.modules)):
        best = np.full(resolution + 1, np.inf)
        following = values[i + 1]
        for j in range(table.counts[i]):
            g = int(grid[i, j])
            if g > resolution:
                continue
            np.minimum(best[g:], table.damage[i, j] + following[: resolution + 1 - g], out=best[g:])
        values[i] = best
    low = 0
    if floor is not None and capacity > 0:
        low = min(max(math.ceil(Fraction(floor) * resolution / Fraction(capacity)), 0), resolution)
    window = values[0, low:]
    least = float(window.min())
    if not math.isfinite(least):
        raise InfeasibleError(
            table_minimum(table), (capacity,), f"nothing fits on a grid of {resolution} units (or above the floor)"
        )
    limit = least + tie_tolerance(least, table)
    remaining = low + int(np.argmax(window <= limit))
    choice = []
    spent = 0.0
    for i in range(table.modules):
        n = table.counts[i]
        g = grid[i, :n]
        usable = g <= remaining
        total = np.full(n, np.inf)
        total[usable] = spent + table.damage[i, :n][usable] + values[i + 1, remaining - g[usable]]
        hits = np.flatnonzero(total <= limit)
        # the invariant guarantees a hit; argmin only guards against a rounding surprise
        j = int(hits[0]) if hits.size else int(np.argmin(total))
        choice.append(j)
        spent += float(table.damage[i, j])
        remaining -= int(g[j])
    return tuple(choice), exact


def solve_dp(
    options: Options,
    capacity: float,
    *,
    resolution: int = 20000,
    floor: float | None = None,
    polish: bool = True,
) -> Solution:
    """Solve a one-constraint knapsack by dynamic programming over a discretised cost.

    Costs are rounded UP to whole units of capacity / `resolution` (in exact rational
    arithmetic), so a choice that fits on the grid truly fits: the DP is conservative, optimal on
    the grid, and can miss the true optimum by the rounding (at most M units of cost). `optimal` is
    True only when no cost needed rounding. Ties on the grid: least damage within the tie
    tolerance, then the least grid cost, then the lexicographically smallest choice.

    `polish` (default True) then applies exact single-module moves (`polish_choice`) that lower the
    damage, or keep it and lower the true cost, checked against the true capacity: they spend
    what the rounding left (so a capacity that admits the dearest option everywhere gets it
    everywhere) and cannot break the capacity. When a capacity within M units of the cheapest
    total leaves nothing on the grid, the polish starts from the cheapest choice instead;
    without polish that is an `InfeasibleError`. `polish=False` gives the pure grid optimum.

    Suffix values V_i(b) = least damage of modules i..M-1 within b units, vectorised over b with
    numpy (one shifted minimum per option); memory (M + 1) x (resolution + 1) float64. With a
    `floor` (used by `random_choice`) V counts exact grid costs and the answer must use at least
    ceil(floor / unit) units, so its true cost is above floor - M units.

    Raises `ConfigError` for more than one constraint or a bad resolution, `InfeasibleError`
    when the cheapest choice is above the capacity or nothing fits on the grid (raise resolution).
    """
    start = time.perf_counter()
    table = make_table(options)
    if table.constraints != 1:
        raise ConfigError(f"solve_dp handles one constraint; this instance has {table.constraints}: use solve_ilp")
    (cap,) = check_vector((capacity,), 1, "capacities")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
    lows = check_floors(None if floor is None else (floor,), 1)
    require_reachable(table, (cap,))
    scales = cost_scales((cap,))
    choice, exact = dp_choice(table, cap, resolution, lows, scales, polish)
    return make_solution(table, choice, scales, "dp", exact, start)


def dp_choice(
    table: Table,
    capacity: float,
    resolution: int,
    lows: Sequence[float] | None,
    scales: Sequence[float],
    polish: bool,
) -> tuple[tuple[int, ...], bool]:
    """The DP's choice, polished if asked; when the rounded grid admits nothing but the true
    cheapest choice fits (a capacity at, or a hair above, the minimum), that choice, polished."""
    try:
        choice, exact = _dp(table, capacity, resolution, None if lows is None else lows[0])
    except InfeasibleError:
        if lows is not None or not polish:
            raise
        # cheapest per module, then least damaging, then first: it fits since the minimum does
        choice = tuple(int(np.lexsort((table.damage[i], table.costs[i, :, 0]))[0]) for i in range(table.modules))
        exact = False
    if polish:
        choice = polish_choice(table, choice, (capacity,), lows, scales, exact_totals(table, choice, scales)[0])[0]
    return choice, exact


def brute_force(options: Options, capacities: Sequence[float]) -> Solution:
    """Every combination (at most `BRUTE_FORCE_LIMIT`, `ConfigError` above), with the tie rule
    applied exactly: the reference for tests and tiny instances."""
    start = time.perf_counter()
    table = make_table(options)
    caps = check_vector(capacities, table.constraints, "capacities")
    combinations = math.prod(table.counts)
    if combinations > BRUTE_FORCE_LIMIT:
        raise ConfigError(f"brute_force is for tiny instances: {combinations} combinations > {BRUTE_FORCE_LIMIT}")
    require_reachable(table, caps)
    scales = cost_scales(caps)
    damage = np.zeros(())
    costs = [np.zeros(()) for _ in range(table.constraints)]
    for i, n in enumerate(table.counts):
        damage = np.add.outer(damage, table.damage[i, :n])
        costs = [np.add.outer(c, table.costs[i, :n, k]) for k, c in enumerate(costs)]
    fits = np.ones(damage.shape, dtype=bool)
    near = np.zeros(damage.shape, dtype=bool)
    for k, total in enumerate(costs):
        fits &= total <= caps[k]
        # a running float sum may round across the capacity: those few are settled with exact sums
        near |= np.abs(total - caps[k]) <= 1e-12 * (abs(caps[k]) + float(np.abs(total).max()))
    for index in zip(*np.nonzero(near)):
        fits[index] = fits_within(exact_totals(table, index, scales)[1], caps, None)
    if not fits.any():
        raise InfeasibleError(table_minimum(table), caps, "no combination meets every constraint at once")
    least = float(damage[fits].min())
    tied = fits & (damage <= least + tie_tolerance(least, table))
    share = sum(total / scale for total, scale in zip(costs, scales))
    # the first index in C order among the least shares is the lexicographically smallest choice
    flat = int(np.argmin(np.where(tied, share, np.inf)))
    choice = np.unravel_index(flat, damage.shape)
    return make_solution(table, choice, scales, "brute-force", True, start)
