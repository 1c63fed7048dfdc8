"""The multiple-choice knapsack that every solver works on: its records, the tie rule, exact totals.

The problem: modules i = 0..M-1, each with options j (an `Item`: a cost vector, one entry per
constraint, and a damage). Choose exactly one option per module to minimise the total damage
subject to sum(cost[k]) <= capacity[k] for every constraint k. Plain numbers in, option indices
out (a `Solution`): nothing here knows about bits or modules.

Ties are broken the same way by every solver. The tie set is every feasible choice whose damage
is within `TIE_RTOL` of the smallest, relative to max(|smallest|, sum over modules of the least
|damage|) (the second term only matters when signed damages cancel); that is far above the float
error of summing M damages, so rounding never splits a true tie. Within it: the lowest cost share
(sum over constraints of total cost / capacity; for one constraint simply the lowest cost), then
the lexicographically smallest choice (`tie_rank`).

Every total is a `math.fsum` of the chosen entries (`exact_totals`), so a reported cost is the
correctly rounded sum and "cost <= capacity" is checked on it.

Two layers of names. `Item`, `Solution`, `Options`, the errors, `TIE_RTOL` and `minimum_costs` are
the knapsack's API (re-exported by `qanalyze.plan.solvers`). The table helpers below them (`Table`,
`make_table`, `check_vector`, `check_floors`, `cost_scales`, `table_minimum`, `require_reachable`,
`exact_totals`, `fits_within`, `tie_tolerance`, `tie_rank`, `make_solution`) are the package's
internal API: public names, so that the solver modules of `qanalyze.plan` share one definition of
the table and the tie rule instead of reaching into each other's private helpers; code outside
`qanalyze.plan` should go through `qanalyze.plan.solvers`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qanalyze.errors import ConfigError, QAnalyzeError

TIE_RTOL = 1e-9
"""Relative tolerance under which two total damages count as equal (the tie set)."""


@dataclass(frozen=True)
class Item:
    """One option of one module: its cost per constraint (the first is weight storage in bits, a
    second may be bit operations) and its predicted damage."""

    costs: tuple[float, ...]
    damage: float

    def __post_init__(self) -> None:
        costs = tuple(float(c) for c in self.costs)
        if not costs:
            raise ConfigError("an Item needs at least one cost")
        if not all(math.isfinite(c) and c >= 0 for c in costs):
            raise ConfigError(f"Item costs must be finite and non-negative, got {costs}")
        if not math.isfinite(self.damage):
            raise ConfigError(f"Item damage must be finite, got {self.damage!r}")
        # normalised to a tuple of floats so that equal items compare and hash equal
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "damage", float(self.damage))


Options = Sequence[Sequence[Item]]
"""An instance: per module, its options."""


@dataclass(frozen=True)
class Solution:
    """A choice of one option per module, with its true totals.

    `damage` and `costs` are exact sums (`math.fsum`) of the chosen items; `solver` names what
    produced it; `optimal` is True when the solver proved it optimal for the problem as given (an
    ILP solved to completion, a DP whose grid rounded no cost; never for a baseline); `seconds` is
    wall-clock time, so leave it out of anything that must be byte-identical across runs.
    """

    choice: tuple[int, ...]
    damage: float
    costs: tuple[float, ...]
    solver: str
    optimal: bool
    seconds: float


class InfeasibleError(ConfigError):
    """No choice fits the capacities. `minimum` is the smallest reachable total per constraint (the
    sum of per-module minima: exact for one constraint, a lower bound for several), `capacities`
    the capacities that were asked for; the message states both."""

    def __init__(self, minimum: Sequence[float], capacities: Sequence[float], reason: str = "") -> None:
        self.minimum = tuple(float(m) for m in minimum)
        self.capacities = tuple(float(c) for c in capacities)
        reachable = ", ".join(f"{m:.12g}" for m in self.minimum)
        asked = ", ".join(f"{c:.12g}" for c in self.capacities)
        super().__init__(
            f"{reason or 'budget below the cheapest choice'}: smallest reachable total per constraint "
            f"({reachable}), capacity ({asked})"
        )


class SolverUnavailableError(ConfigError):
    """The solver asked for cannot run here (PuLP or the backend is not installed)."""


class SolverError(QAnalyzeError):
    """The backend stopped without a usable answer (a crash, or a time limit hit before any
    feasible choice was found)."""


@dataclass(frozen=True)
class Table:
    """An instance as dense arrays: `damage` (M, J) and `costs` (M, J, K), padded with +inf past
    a module's last option so that padding is never affordable."""

    damage: np.ndarray
    costs: np.ndarray
    counts: tuple[int, ...]

    @property
    def modules(self) -> int:
        """Number of modules M."""
        return len(self.counts)

    @property
    def constraints(self) -> int:
        """Number of constraints K."""
        return int(self.costs.shape[2])

    @property
    def magnitude(self) -> float:
        """Sum over modules of the smallest |damage|: for non-negative damages a lower bound of any
        total, so `tie_tolerance` is purely relative; it only matters when signed damages cancel."""
        finite = np.where(np.isfinite(self.damage), np.abs(self.damage), np.inf)
        return math.fsum(finite.min(axis=1).tolist())


def make_table(options: Options) -> Table:
    """Validate an instance and lay it out as a `Table` (`ConfigError` naming the first bad module or option)."""
    if len(options) == 0:
        raise ConfigError("the knapsack needs at least one module; options is empty")
    width = None
    for i, module in enumerate(options):
        if len(module) == 0:
            raise ConfigError(f"module {i} has no options")
        for j, item in enumerate(module):
            if not isinstance(item, Item):
                raise ConfigError(f"option {j} of module {i} is a {type(item).__name__}, not an Item")
            if width is None:
                width = len(item.costs)
            elif len(item.costs) != width:
                raise ConfigError(f"option {j} of module {i} has {len(item.costs)} costs; the first option has {width}")
    counts = tuple(len(module) for module in options)
    damage = np.full((len(options), max(counts)), np.inf)
    costs = np.full((len(options), max(counts), width), np.inf)
    for i, module in enumerate(options):
        damage[i, : counts[i]] = [item.damage for item in module]
        costs[i, : counts[i]] = [item.costs for item in module]
    return Table(damage, costs, counts)


def check_vector(values: Sequence[float], width: int, what: str) -> tuple[float, ...]:
    """``values`` as floats, one per constraint and finite (`ConfigError` naming ``what`` otherwise)."""
    out = tuple(float(v) for v in values)
    if len(out) != width:
        raise ConfigError(f"{len(out)} {what} given for {width} constraints")
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{what} must be finite, got {out}")
    return out


def check_floors(floors: Sequence[float] | None, width: int) -> tuple[float, ...] | None:
    """Lower bounds on the total costs, checked like capacities; None when there are none."""
    return None if floors is None else check_vector(floors, width, "floors")


def cost_scales(capacities: Sequence[float]) -> tuple[float, ...]:
    """Per constraint, what a total cost is divided by in the cost share of the tie rule."""
    # a zero capacity admits only zero-cost options, so any positive scale ranks those equally
    return tuple(c if c > 0 else 1.0 for c in capacities)


def minimum_costs(options: Options) -> tuple[float, ...]:
    """Per constraint, the sum over modules of the cheapest option's cost: the smallest reachable
    total for one constraint, a lower bound when there are several (each sum may use a different
    option of the same module)."""
    table = make_table(options)
    return table_minimum(table)


def table_minimum(table: Table) -> tuple[float, ...]:
    """`minimum_costs` of a table already built."""
    cheapest = table.costs.min(axis=1)
    return tuple(math.fsum(cheapest[:, k].tolist()) for k in range(table.constraints))


def require_reachable(table: Table, capacities: Sequence[float]) -> None:
    """`InfeasibleError` when even the cheapest option of every module exceeds a capacity."""
    minimum = table_minimum(table)
    if any(m > c for m, c in zip(minimum, capacities)):
        raise InfeasibleError(minimum, capacities)


def exact_totals(
    table: Table, choice: Sequence[int], scales: Sequence[float]
) -> tuple[float, tuple[float, ...], float]:
    """Exact (damage, costs, cost share) of a choice."""
    rows = np.arange(table.modules)
    picked = np.asarray(choice)
    damage = math.fsum(table.damage[rows, picked].tolist())
    chosen = table.costs[rows, picked]
    costs = tuple(math.fsum(chosen[:, k].tolist()) for k in range(table.constraints))
    return damage, costs, math.fsum(c / s for c, s in zip(costs, scales))


def fits_within(costs: Sequence[float], capacities: Sequence[float], lows: Sequence[float] | None) -> bool:
    """Whether total ``costs`` are within every capacity and, when ``lows`` is given, at or above every floor."""
    if not all(c <= cap for c, cap in zip(costs, capacities)):
        return False
    return lows is None or all(c >= low for c, low in zip(costs, lows))


def tie_tolerance(best: float, table: Table) -> float:
    """How far above the least damage ``best`` a total damage still ties it (see the module docstring)."""
    return TIE_RTOL * max(abs(best), table.magnitude)


def tie_rank(damage: float, share: float, choice: Sequence[int], best: float, tol: float) -> tuple:
    """Sort key of the tie rule: inside the tie set by (share, choice), outside by damage first."""
    if damage <= best + tol:
        return (0, share, tuple(choice))
    return (1, damage, share, tuple(choice))


def make_solution(
    table: Table, choice: Sequence[int], scales: Sequence[float], solver: str, optimal: bool, start: float
) -> Solution:
    """The `Solution` of ``choice``: its exact totals, ``solver``'s name, and the time since ``start``."""
    damage, costs, _ = exact_totals(table, choice, scales)
    return Solution(tuple(int(c) for c in choice), damage, costs, solver, optimal, time.perf_counter() - start)
