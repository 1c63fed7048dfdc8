"""Lagrangian reduction: the options that cannot belong to any choice as good as a known one.

Used by `solve_ilp` to drop most options before the model is built (about 90 % of them on
60 x 48 planner-shaped instances).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qanalyze.plan.knapsack import Table


def _best_multiplier(damage: np.ndarray, share: np.ndarray, limit: float) -> float:
    """The multiplier lam >= 0 maximising the Lagrangian bound sum_i min_j (damage + lam share) -
    lam limit, by bisection on the sign of its subgradient (the bound is concave in lam)."""
    rows = np.arange(damage.shape[0])

    def slope(lam: float) -> float:
        picked = np.argmin(damage + lam * share, axis=1)
        return float(share[rows, picked].sum()) - limit

    if slope(0.0) <= 0:
        return 0.0
    finite = damage[np.isfinite(damage)]
    low, high = 0.0, max(float(finite.max() - finite.min()), 1e-300) / max(float(share[share > 0].min()), 1e-300)
    # at this price the cheapest option wins everywhere, but rounding may need a few doublings
    for _ in range(64):
        if slope(high) <= 0:
            break
        low, high = high, 2 * high
    for _ in range(100):
        middle = 0.5 * (low + high)
        if slope(middle) > 0:
            low = middle
        else:
            high = middle
    return high


def prune_options(table: Table, rhs: Sequence[float], scales: Sequence[float], upper: float, tol: float) -> np.ndarray:
    """Options that may belong to a choice with damage <= `upper` + `tol` (so to the tie set when
    `upper` is the damage of a feasible choice), by Lagrangian reduced costs.

    For any lam >= 0 and any choice within capacity k: damage >= L(lam) + sum_i r_i, where
    L(lam) = sum_i m_i - lam rhs_k, m_i = min_j (d_ij + lam s_ij) and r_ij = d_ij + lam s_ij - m_i
    >= 0 (s: cost share). So an option with r_ij > upper + tol - L(lam) is in no such choice. One
    multiplier per constraint (the best for that constraint alone); every test is valid alone."""
    finite = np.isfinite(table.damage)
    damage = np.where(finite, table.damage, np.inf)
    keep = finite.copy()
    for k in range(table.constraints):
        share = np.where(finite, table.costs[:, :, k] / scales[k], 0.0)
        limit = rhs[k] / scales[k]
        lam = _best_multiplier(damage, share, limit)
        priced = damage + lam * share
        least = priced.min(axis=1)
        bound = math.fsum(least.tolist()) - lam * limit
        reduced = priced - least[:, None]
        # float error of the bound and of each reduced cost, with a wide margin
        noise = 1e-10 * (
            np.abs(np.where(finite, damage, 0.0))
            + lam * share
            + np.abs(least)[:, None]
            + np.abs(least).sum()
            + lam * limit
        )
        keep &= reduced <= (upper + tol - bound) + noise
    return keep
