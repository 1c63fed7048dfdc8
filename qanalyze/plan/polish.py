"""Exact local polish: single-module moves under the tie rule, checked in exact arithmetic.

What the dynamic programming grid and the ILP backends' tolerances leave (a damage difference
below a tolerance, a capacity left unspent by rounding, or overshot by one) is removed here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qanalyze.plan.knapsack import Table, exact_totals, fits_within, tie_rank, tie_tolerance


def polish_choice(
    table: Table,
    choice: Sequence[int],
    capacities: Sequence[float],
    lows: Sequence[float] | None,
    scales: Sequence[float],
    best: float,
) -> tuple[tuple[int, ...], float]:
    """Single-module moves under the exact tie rule until none improves; returns the choice and the
    smallest damage seen. A move is taken when it lowers the damage beyond the tie tolerance, or
    keeps it in the tie set and lowers (cost share, choice). Candidates are screened in float and
    confirmed with exact sums; a candidate that fails confirmation is skipped until the next move."""
    rows = np.arange(table.modules)
    columns = np.arange(table.damage.shape[1])
    upper = np.asarray(capacities)
    lower = None if lows is None else np.asarray(lows)
    option_share = (table.costs / np.asarray(scales)).sum(axis=2)
    current = list(choice)
    damage, costs, share = exact_totals(table, current, scales)
    best = min(best, damage)
    skipped = np.zeros(table.damage.shape, dtype=bool)
    # each accepted move strictly lowers the rank, so this bound is never reached in practice
    for _ in range(4 * table.damage.size):
        tol = tie_tolerance(best, table)
        picked = np.asarray(current)
        new_damage = damage + (table.damage - table.damage[rows, picked][:, None])
        new_costs = np.asarray(costs) + (table.costs - table.costs[rows, picked][:, None, :])
        new_share = share + (option_share - option_share[rows, picked][:, None])
        usable = np.isfinite(new_damage) & np.all(new_costs <= upper, axis=2) & ~skipped
        if lower is not None:
            usable &= np.all(new_costs >= lower, axis=2)
        usable[rows, picked] = False
        lower_damage = usable & (new_damage < best - tol)
        if lower_damage.any():
            flat = int(np.argmin(np.where(lower_damage, new_damage, np.inf)))
        else:
            tied = usable & (new_damage <= best + tol)
            if damage <= best + tol:
                tied &= (new_share < share) | ((new_share == share) & (columns[None, :] < picked[:, None]))
            if not tied.any():
                break
            flat = int(np.argmin(np.where(tied, new_share, np.inf)))
        i, j = divmod(flat, table.damage.shape[1])
        trial = [*current[:i], j, *current[i + 1 :]]
        trial_damage, trial_costs, trial_share = exact_totals(table, trial, scales)
        improves = trial_damage < best - tol or tie_rank(trial_damage, trial_share, trial, best, tol) < tie_rank(
            damage, share, current, best, tol
        )
        if not (improves and fits_within(trial_costs, capacities, lows)):
            skipped[i, j] = True
            continue
        current, damage, costs, share = trial, trial_damage, trial_costs, trial_share
        best = min(best, damage)
        skipped[:] = False
    return tuple(current), best
