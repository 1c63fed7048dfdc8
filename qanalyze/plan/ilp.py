"""The exact knapsack as a binary ILP through PuLP (CBC or HiGHS): `solve_ilp`.

A feasible reference first, options pruned against it (`qanalyze.plan.prune`), a least-damage
solve and a tie-breaking solve (`_Phases`), re-solves under a tightened capacity when a backend's
tolerance let an answer overshoot, and an exact polish (`qanalyze.plan.polish`) of every answer.
The PuLP side (backends, the model, a run) is in `qanalyze.plan.ilp_backends`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qanalyze.errors import ConfigError
from qanalyze.plan.dp import dp_choice
from qanalyze.plan.ilp_backends import Backend, build_model, get_backend, import_pulp, run_model
from qanalyze.plan.knapsack import (
    InfeasibleError,
    Options,
    Solution,
    SolverError,
    SolverUnavailableError,
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
    tie_rank,
    tie_tolerance,
)
from qanalyze.plan.polish import polish_choice
from qanalyze.plan.prune import prune_options

REFERENCE_RESOLUTION = 20000
"""Grid of the DP that gives `solve_ilp` its reference choice (for scaling and pruning only)."""

TIE_BREAK_NODES = 100
"""Branch-and-bound node limit of the tie-breaking second ILP solve. Proving that no cheaper
choice ties the optimum is a subset-sum search that can cost seconds for nothing; a node limit
(unlike a time limit) keeps the answer the same on every machine."""

ILP_MIN_PHASE_SECONDS = 1.0
"""The tie-breaking second ILP solve gets at least this long, even when the first used the limit."""

_REPAIR_ATTEMPTS = 3
"""Re-solves with a tightened capacity when the solver's feasibility tolerance let a choice
overshoot a capacity in exact arithmetic."""

_REPAIR_RTOL = 1e-6
"""Each re-solve tightens an overshot capacity by at least this fraction of its slack over the
cheapest total: ten times the backends' default primal feasibility tolerance (1e-7) on the
slack-normalised row (see `build_model`)."""


def _reference(
    table: Table, caps: Sequence[float], lows: Sequence[float] | None, scales: Sequence[float]
) -> tuple[int, ...] | None:
    """A truly feasible choice found cheaply, the conservative DP polished with exact single moves
    (which spends what the grid's rounding left), or None for several constraints or when the
    grid admits nothing."""
    if table.constraints != 1:
        return None
    try:
        return dp_choice(table, caps[0], REFERENCE_RESOLUTION, lows, scales, True)[0]
    except InfeasibleError:
        return None


def solve_ilp(
    options: Options,
    capacities: Sequence[float],
    *,
    backend: str = "cbc",
    time_limit: float = 60.0,
    floors: Sequence[float] | None = None,
) -> Solution:
    """Solve the knapsack exactly as a binary ILP through PuLP (`backend` "cbc" or "highs").

    Variables x_ij in {0, 1}; sum_j x_ij = 1 per module; sum_ij cost_ijk x_ij <= capacity_k per
    constraint (and >= `floors[k]` when given: `random_choice` uses it to hold equal cost);
    minimise sum_ij damage_ij x_ij. Gaps are set to 0 and solver messages off.

    Reduction and scaling, because damages span many decades (4^-bits times sensitivities) and
    the backends work to absolute tolerances near 1e-7. A feasible reference choice comes first
    (the conservative DP, polished, for one constraint; else a first ILP solve on every option).
    Options that cannot be in any choice as good as the reference are dropped by Lagrangian
    reduced costs (`prune_options`: about 90 % of them on 60 x 48 planner-shaped instances), modules
    left with one option are fixed outside the model, each cost row counts costs above each
    module's cheapest option and is divided by the slack the capacity leaves over those (so a
    capacity at, or a few bits over, the cheapest total is not lost in the tolerances, see
    `build_model`), and each damage is shifted by its module's least damage (a constant, since one
    option is chosen) and divided by the reference's shifted total, so that the optimum is O(1)
    against the tolerances. CBC runs with preprocessing off (see `_cbc` for the bug that avoids).

    Ties, by a second solve and an exact polish: phase 1 finds the least damage D; phase 2 adds
    "damage <= D + tie tolerance" and minimises the cost share (on CBC within `TIE_BREAK_NODES`
    branch-and-bound nodes, a deterministic limit). Both answers, and the reference, are polished
    with single-module moves evaluated in exact arithmetic (`polish_choice`), which removes what solver
    tolerances leave (a damage difference below them, a capacity overshoot by a rounding) and
    moves duplicated options to their lowest index; the best of them under the tie rule is
    returned. That is the global rule whenever the rest of the tie set is one move away (as with
    duplicated options); beyond that the lexicographic part is local, but always deterministic.

    `time_limit` (seconds) bounds phase 1; phase 2 gets what is left, at least
    `ILP_MIN_PHASE_SECONDS`. A limit hit with a feasible choice returns it with `optimal=False`.
    Raises `InfeasibleError` when no choice fits, `SolverUnavailableError` when PuLP or the
    backend is missing, `SolverError` when the backend stops without a usable answer.
    """
    start = time.perf_counter()
    table = make_table(options)
    caps = check_vector(capacities, table.constraints, "capacities")
    lows = check_floors(floors, table.constraints)
    factory = get_backend(backend)
    if not (math.isfinite(time_limit) and time_limit > 0):
        raise ConfigError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    require_reachable(table, caps)
    pulp = import_pulp()
    if not factory(pulp, time_limit, None)[0].available():
        raise SolverUnavailableError(f"the ILP backend {backend!r} is not available to PuLP here")
    scales = cost_scales(caps)
    solve_for = _Phases(pulp, factory, table, scales, time_limit, start)
    reference = _reference(table, caps, lows, scales)
    rhs, floor = list(caps), None if lows is None else list(lows)
    for _ in range(_REPAIR_ATTEMPTS):
        answers, optimal = solve_for(rhs, floor, reference)
        feasible = [c for c in answers if fits_within(exact_totals(table, c, scales)[1], caps, lows)]
        if feasible:
            break
        # only a solver tolerance lets an answer cross a bound, so tighten past that tolerance (a
        # fraction of the slack over the cheapest total, the row's scale), never below that total;
        # the polish can still climb back to the exact bound
        spent = exact_totals(table, answers[0], scales)[1]
        rhs = [
            max(r - max(2 * (t - c), _REPAIR_RTOL * (r - low)), low) if t > c else r
            for r, t, c, low in zip(rhs, spent, caps, table_minimum(table))
        ]
        if floor is not None and lows is not None:
            floor = [
                f + max(2 * (low - t), _REPAIR_RTOL * s) if t < low else f
                for f, t, low, s in zip(floor, spent, lows, scales)
            ]
    else:
        raise SolverError(f"the {backend} answers exceed a capacity after {_REPAIR_ATTEMPTS} tightenings")
    if reference is not None:
        # a safety net: the answer is never worse than the feasible reference
        feasible.append(reference)
    best = min(exact_totals(table, c, scales)[0] for c in feasible)
    polished = [polish_choice(table, c, caps, lows, scales, best) for c in feasible]
    best = min(b for _, b in polished)
    tol = tie_tolerance(best, table)

    def key(choice: tuple[int, ...]) -> tuple:
        damage, _, share = exact_totals(table, choice, scales)
        return tie_rank(damage, share, choice, best, tol)

    choice = min((c for c, _ in polished), key=key)
    return make_solution(table, choice, scales, backend, optimal, start)


@dataclass(frozen=True)
class _Phases:
    """The ILP solves of `solve_ilp` for one set of right-hand sides."""

    pulp: Any
    factory: Backend
    table: Table
    scales: Sequence[float]
    time_limit: float
    start: float

    def __call__(
        self, rhs: Sequence[float], lows: Sequence[float] | None, reference: tuple[int, ...] | None
    ) -> tuple[list[tuple[int, ...]], bool]:
        """Phase 1 (least damage) and phase 2 (least cost share within the tie set) on the options
        that survive `prune_options`, under capacities `rhs` and floors `lows`: both answers, and whether
        phase 1 was proved optimal."""
        table = self.table
        finite = np.isfinite(table.damage)
        shifted = np.where(finite, table.damage - table.damage.min(axis=1, keepdims=True), 0.0)
        if reference is not None and not fits_within(exact_totals(table, reference, self.scales)[1], rhs, lows):
            # pruning against a choice outside the (tightened) bounds could cut the optimum
            reference = None
        if reference is None:
            # no cheap reference: a first solve on every option, scaled by the largest damage
            spread = float(shifted.max())
            reference, optimal = self._solve(rhs, lows, finite, shifted / (spread if spread > 0 else 1.0), None)
            if not fits_within(exact_totals(table, reference, self.scales)[1], rhs, lows):
                # outside a bound by the solver's tolerance: `solve_ilp` tightens and comes back
                return [reference], optimal
        rows = np.arange(table.modules)
        upper = exact_totals(table, reference, self.scales)[0]
        # the tie tolerance at the optimum, which lies between the lower bound and `upper`
        tol = tie_tolerance(max(abs(upper), abs(upper - math.fsum(shifted[rows, list(reference)].tolist()))), table)
        keep = prune_options(table, rhs, self.scales, upper, tol)
        keep[rows, list(reference)] = True
        # scaled so that the optimum is O(1) whatever the units and the spread of the damages
        spread = math.fsum(shifted[rows, list(reference)].tolist()) + tol
        # zero only when every kept option is equally damaging: any choice is optimal then
        spread = spread if spread > 0 else 1.0
        weights = shifted / spread
        first, optimal = self._solve(rhs, lows, keep, weights, None)
        share = np.where(finite, (table.costs / np.asarray(self.scales)).sum(axis=2), 0.0)
        if not share.any():
            return [first], optimal
        reached = exact_totals(table, first, self.scales)[0]
        tol = tie_tolerance(reached, table)
        keep = prune_options(table, rhs, self.scales, reached, tol)
        keep[rows, list(first)] = True
        bound = math.fsum(weights[rows, list(first)].tolist()) + tol / spread
        try:
            second, _ = self._solve(rhs, lows, keep, share, (weights, bound), TIE_BREAK_NODES)
        except (SolverError, InfeasibleError):
            # phase 2 only breaks ties: without it, the polish still does
            return [first], optimal
        return [first, second], optimal

    def _solve(
        self,
        rhs: Sequence[float],
        lows: Sequence[float] | None,
        keep: np.ndarray,
        objective: np.ndarray,
        cap: tuple[np.ndarray, float] | None,
        max_nodes: int | None = None,
    ) -> tuple[tuple[int, ...], bool]:
        model = build_model(self.pulp, self.table, keep, objective, rhs, lows, cap)
        left = max(self.time_limit - (time.perf_counter() - self.start), ILP_MIN_PHASE_SECONDS)
        engines = self.factory(self.pulp, left, max_nodes)
        choice, optimal, infeasible = run_model(self.pulp, model, engines, self.table.modules)
        if infeasible:
            raise InfeasibleError(table_minimum(self.table), rhs, "no choice meets every constraint at once")
        if choice is None:
            raise SolverError("the ILP backend stopped (time limit?) before finding any feasible choice")
        return choice, optimal
