"""Exact multiple-choice knapsack solvers, and the baselines that show what the Hessian bought.

The problem: modules i = 0..M-1, each with options j (an `Item`: a cost vector, one entry per
constraint, and a damage). Choose exactly one option per module to minimise the total damage
subject to sum(cost[k]) <= capacity[k] for every constraint k. Plain numbers in, option indices
out: nothing here knows about bits or modules.

Solvers (the `SOLVERS` registry, behind `solve`):

- `solve_ilp`: binary variables through PuLP, with its bundled CBC or with HiGHS; any number of
  constraints; exact up to the solver's tolerances (an exact local polish removes what those
  tolerances leave, see `solve_ilp`);
- `solve_dp`: dynamic programming over a discretised cost, one constraint; conservative (costs are
  rounded up to the grid, so the true cost never exceeds the capacity) and optimal on the grid;
- `brute_force`: every combination, the reference for tests and tiny instances.

Ties are broken the same way everywhere. The tie set is every feasible choice whose damage is
within `TIE_RTOL` of the smallest, relative to max(|smallest|, sum over modules of the least
|damage|) (the second term only matters when signed damages cancel); that is far above the float
error of summing M damages, so rounding never splits a true tie. Within it: the lowest cost share
(sum over constraints of total cost / capacity; for one constraint simply the lowest cost), then
the lexicographically smallest choice. `brute_force` applies this rule exactly, `solve_dp`
exactly on its grid (cost measured in grid units), `solve_ilp` through a second solve and a local
polish (see there).

Baselines at (about) equal cost, each reporting the TRUE damage of its choice: `uniform_choice`
(the same label everywhere), `random_choice` (random damages, seeded, held at the optimal plan's
cost) and `reversed_choice` (most bits to the least sensitive).

Every total is a `math.fsum` of the chosen entries, so a reported cost is the correctly rounded
sum and "cost <= capacity" is checked on it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from qanalyze.errors import ConfigError, QAnalyzeError

TIE_RTOL = 1e-9
"""Relative tolerance under which two total damages count as equal (the tie set)."""

BRUTE_FORCE_LIMIT = 1_000_000
"""`brute_force` refuses instances with more combinations than this."""

EQUAL_COST_RTOL = 0.01
"""`random_choice` keeps its total cost within this fraction below the optimal plan's cost."""

SENSITIVITY_FLOOR = 1e-12
"""`reversed_choice` lifts sensitivities to at least this fraction of the largest positive one."""

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
"""Each re-solve tightens an overshot capacity by at least this fraction: ten times the backends'
default primal feasibility tolerance (1e-7) on the capacity-normalised row."""


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


# --------------------------------------------------------------------------- instance handling


@dataclass(frozen=True)
class _Table:
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
        total, so `_tolerance` is purely relative; it only matters when signed damages cancel."""
        finite = np.where(np.isfinite(self.damage), np.abs(self.damage), np.inf)
        return math.fsum(finite.min(axis=1).tolist())


def _table(options: Options) -> _Table:
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
    return _Table(damage, costs, counts)


def _vector(values: Sequence[float], width: int, what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != width:
        raise ConfigError(f"{len(out)} {what} given for {width} constraints")
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{what} must be finite, got {out}")
    return out


def _lows(floors: Sequence[float] | None, width: int) -> tuple[float, ...] | None:
    return None if floors is None else _vector(floors, width, "floors")


def _scales(capacities: Sequence[float]) -> tuple[float, ...]:
    # a zero capacity admits only zero-cost options, so any positive scale ranks those equally
    return tuple(c if c > 0 else 1.0 for c in capacities)


def minimum_costs(options: Options) -> tuple[float, ...]:
    """Per constraint, the sum over modules of the cheapest option's cost: the smallest reachable
    total for one constraint, a lower bound when there are several (each sum may use a different
    option of the same module)."""
    table = _table(options)
    return _minimum(table)


def _minimum(table: _Table) -> tuple[float, ...]:
    cheapest = table.costs.min(axis=1)
    return tuple(math.fsum(cheapest[:, k].tolist()) for k in range(table.constraints))


def _require_reachable(table: _Table, capacities: Sequence[float]) -> None:
    minimum = _minimum(table)
    if any(m > c for m, c in zip(minimum, capacities)):
        raise InfeasibleError(minimum, capacities)


def _totals(table: _Table, choice: Sequence[int], scales: Sequence[float]) -> tuple[float, tuple[float, ...], float]:
    """Exact (damage, costs, cost share) of a choice."""
    rows = np.arange(table.modules)
    picked = np.asarray(choice)
    damage = math.fsum(table.damage[rows, picked].tolist())
    chosen = table.costs[rows, picked]
    costs = tuple(math.fsum(chosen[:, k].tolist()) for k in range(table.constraints))
    return damage, costs, math.fsum(c / s for c, s in zip(costs, scales))


def _fits(costs: Sequence[float], capacities: Sequence[float], lows: Sequence[float] | None) -> bool:
    if not all(c <= cap for c, cap in zip(costs, capacities)):
        return False
    return lows is None or all(c >= low for c, low in zip(costs, lows))


def _tolerance(best: float, table: _Table) -> float:
    return TIE_RTOL * max(abs(best), table.magnitude)


def _rank(damage: float, share: float, choice: Sequence[int], best: float, tol: float) -> tuple:
    """Sort key of the tie rule: inside the tie set by (share, choice), outside by damage first."""
    if damage <= best + tol:
        return (0, share, tuple(choice))
    return (1, damage, share, tuple(choice))


def _solution(
    table: _Table, choice: Sequence[int], scales: Sequence[float], solver: str, optimal: bool, start: float
) -> Solution:
    damage, costs, _ = _totals(table, choice, scales)
    return Solution(tuple(int(c) for c in choice), damage, costs, solver, optimal, time.perf_counter() - start)


# --------------------------------------------------------------------------- exact local polish


def _polish(
    table: _Table,
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
    damage, costs, share = _totals(table, current, scales)
    best = min(best, damage)
    skipped = np.zeros(table.damage.shape, dtype=bool)
    # each accepted move strictly lowers the rank, so this bound is never reached in practice
    for _ in range(4 * table.damage.size):
        tol = _tolerance(best, table)
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
        trial_damage, trial_costs, trial_share = _totals(table, trial, scales)
        improves = trial_damage < best - tol or _rank(trial_damage, trial_share, trial, best, tol) < _rank(
            damage, share, current, best, tol
        )
        if not (improves and _fits(trial_costs, capacities, lows)):
            skipped[i, j] = True
            continue
        current, damage, costs, share = trial, trial_damage, trial_costs, trial_share
        best = min(best, damage)
        skipped[:] = False
    return tuple(current), best


# --------------------------------------------------------------------------- dynamic programming


def _grid(table: _Table, capacity: float, resolution: int) -> tuple[np.ndarray, bool]:
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


def _dp(table: _Table, capacity: float, resolution: int, floor: float | None) -> tuple[tuple[int, ...], bool]:
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
            _minimum(table), (capacity,), f"nothing fits on a grid of {resolution} units (or above the floor)"
        )
    limit = least + _tolerance(least, table)
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

    `polish` (default True) then applies exact single-module moves (`_polish`) that lower the
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
    table = _table(options)
    if table.constraints != 1:
        raise ConfigError(f"solve_dp handles one constraint; this instance has {table.constraints}: use solve_ilp")
    (cap,) = _vector((capacity,), 1, "capacities")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
    lows = _lows(None if floor is None else (floor,), 1)
    _require_reachable(table, (cap,))
    scales = _scales((cap,))
    choice, exact = _dp_choice(table, cap, resolution, lows, scales, polish)
    return _solution(table, choice, scales, "dp", exact, start)


def _dp_choice(
    table: _Table,
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
        choice = _polish(table, choice, (capacity,), lows, scales, _totals(table, choice, scales)[0])[0]
    return choice, exact


# --------------------------------------------------------------------------- ILP


def _import_pulp() -> Any:
    try:
        import pulp
    except ImportError as error:
        raise SolverUnavailableError("the ILP solvers need PuLP: pip install pulp highspy") from error
    return pulp


def _cbc(pulp: Any, time_limit: float, max_nodes: int | None = None) -> tuple[Any, ...]:
    # CBC 2.10.3 (PuLP's bundled build) preprocessing can return a wrong "optimal" answer when it
    # reduces a model to nothing (coin-or/Cbc#751, #283): 2 in 1200 small reduced knapsacks here.
    # With preprocessing off every one matched brute force, but CBC then crashes on an infeasible
    # model, so the default settings are the fallback when the first run dies.
    settings = {
        "msg": False,
        "timeLimit": time_limit,
        "gapRel": 0.0,
        "gapAbs": 0.0,
        "threads": 1,
        "maxNodes": max_nodes,
    }
    system = pulp.COIN_CMD(**settings)
    if system.available():
        return pulp.COIN_CMD(**settings, options=["preprocess off"]), system
    # PuLP 3.x flags its bundled CBC as going away in 4.0; it is the CBC the design relies on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**settings, options=["preprocess off"]), pulp.PULP_CBC_CMD(**settings)


def _highs(pulp: Any, time_limit: float, max_nodes: int | None = None) -> tuple[Any, ...]:
    # HiGHS stops at a 1e-4 relative gap by default: far too loose for an exact plan. The node
    # limit is not passed on: PuLP 3.3 has no mapping for the status HiGHS then returns
    # (kSolutionLimit, a KeyError), and HiGHS closes the tie-break search quickly anyway.
    del max_nodes
    return (pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=0.0, gapAbs=0.0, threads=1),)


Backend = Callable[[Any, float, int | None], tuple[Any, ...]]
"""An ILP backend factory: (pulp module, time limit in seconds, branch-and-bound node limit or
None) -> PuLP solver objects to try in order, each only if the one before it crashed."""

ILP_BACKENDS: dict[str, Backend] = {"cbc": _cbc, "highs": _highs}
"""ILP backends by name (see `Backend`)."""


def ilp_available(backend: str = "cbc") -> bool:
    """Whether PuLP and the named backend can run here."""
    if backend not in ILP_BACKENDS:
        return False
    try:
        pulp = _import_pulp()
    except SolverUnavailableError:
        return False
    return bool(ILP_BACKENDS[backend](pulp, 1.0, None)[0].available())


def _backend(backend: str) -> Backend:
    if backend not in ILP_BACKENDS:
        raise ConfigError(f"unknown ILP backend {backend!r}; known: {', '.join(sorted(ILP_BACKENDS))}")
    return ILP_BACKENDS[backend]


@dataclass(frozen=True)
class _Model:
    """A PuLP model over the kept options, `x[(i, j)]` binary; modules left with a single option
    are `fixed` outside it (module -> option)."""

    problem: Any
    x: dict[tuple[int, int], Any]
    fixed: dict[int, int]


def _model(
    pulp: Any,
    table: _Table,
    keep: np.ndarray,
    objective: np.ndarray,
    rhs: Sequence[float],
    lows: Sequence[float] | None,
    scales: Sequence[float],
    cap: tuple[np.ndarray, float] | None,
) -> _Model:
    """One option per module, every capacity (and floor), `sum objective x` to minimise and, with
    `cap` = (weights, bound), the extra row `sum weights x <= bound`. Modules with one kept option
    are fixed and their share moved to the right-hand sides: equality rows of one variable are
    what CBC's preprocessing trips on, and they cost nothing to remove."""
    problem = pulp.LpProblem("mckp", pulp.LpMinimize)
    fixed = {i: int(np.flatnonzero(keep[i])[0]) for i in range(table.modules) if keep[i].sum() == 1}
    free = keep.copy()
    free[list(fixed)] = False
    # PuLP 3.x deprecates free-standing variables in favour of add_variable (PuLP >= 3.3)
    make = getattr(problem, "add_variable", None) or (lambda name, **kw: pulp.LpVariable(name, **kw))
    x = {(int(i), int(j)): make(f"x_{i}_{j}", cat=pulp.LpBinary) for i, j in zip(*np.nonzero(free))}
    rows_fixed = np.asarray(list(fixed), dtype=np.int64)
    columns_fixed = np.asarray(list(fixed.values()), dtype=np.int64)

    def expression(values: np.ndarray) -> Any:
        return pulp.LpAffineExpression([(v, float(values[i, j])) for (i, j), v in x.items() if values[i, j]])

    def add(values: np.ndarray, upper: float | None, lower: float | None, name: str, scale: float = 1.0) -> None:
        # the fixed part is summed unscaled, so that "it fits" is decided exactly
        spent = math.fsum(values[rows_fixed, columns_fixed].tolist())
        terms = np.where(free, values, 0.0) / scale
        if not terms.any():
            # nothing left to choose on this row: it holds or the problem is infeasible
            if (upper is not None and spent > upper) or (lower is not None and spent < lower):
                raise InfeasibleError(_minimum(table), rhs, "no choice meets every constraint at once")
            return
        if upper is not None:
            problem.addConstraint(expression(terms) <= (upper - spent) / scale, f"{name}_max")
        if lower is not None:
            problem.addConstraint(expression(terms) >= (lower - spent) / scale, f"{name}_min")

    rows: list[list[Any]] = [[] for _ in range(table.modules)]
    for (i, _), v in x.items():
        rows[i].append((v, 1.0))
    for i, row in enumerate(rows):
        if row:
            problem.addConstraint(pulp.LpAffineExpression(row) == 1, f"one_{i}")
    for k in range(table.constraints):
        costs = np.where(keep, table.costs[:, :, k], 0.0)
        add(costs, rhs[k], None if lows is None else lows[k], f"cost_{k}", scales[k])
    if cap is not None:
        add(cap[0], cap[1], None, "tie")
    problem.setObjective(expression(np.where(free, objective, 0.0)))
    return _Model(problem, x, fixed)


def _run(pulp: Any, model: _Model, engines: Sequence[Any], modules: int) -> tuple[tuple[int, ...] | None, bool, bool]:
    """Solve with the first engine that does not crash; returns (choice or None, proved optimal,
    proved infeasible)."""
    choice = [model.fixed.get(i, -1) for i in range(modules)]
    if not model.x:
        # every module fixed, and `_model` checked each row
        return tuple(choice), True, False
    failure = None
    for engine in engines:
        try:
            model.problem.solve(engine)
            break
        except pulp.PulpSolverError as error:
            failure = error
    else:
        raise SolverError(f"the ILP backend failed: {failure}") from failure
    if model.problem.status == pulp.LpStatusInfeasible:
        return None, False, True
    for (i, j), v in model.x.items():
        if v.varValue is not None and v.varValue > 0.5:
            choice[i] = j
    if min(choice) < 0:
        return None, False, False
    return tuple(choice), model.problem.sol_status == pulp.LpSolutionOptimal, False


def _reference(
    table: _Table, caps: Sequence[float], lows: Sequence[float] | None, scales: Sequence[float]
) -> tuple[int, ...] | None:
    """A truly feasible choice found cheaply, the conservative DP polished with exact single moves
    (which spends what the grid's rounding left), or None for several constraints or when the
    grid admits nothing."""
    if table.constraints != 1:
        return None
    try:
        return _dp_choice(table, caps[0], REFERENCE_RESOLUTION, lows, scales, True)[0]
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
    reduced costs (`_prune`: about 90 % of them on 60 x 48 planner-shaped instances), modules
    left with one option are fixed outside the model, each cost row is divided by its capacity,
    and each damage is shifted by its module's least damage (a constant, since one option is
    chosen) and divided by the reference's shifted total, so that the optimum is O(1) against
    the tolerances. CBC runs with preprocessing off (see `_cbc` for the bug that avoids).

    Ties, by a second solve and an exact polish: phase 1 finds the least damage D; phase 2 adds
    "damage <= D + tie tolerance" and minimises the cost share (on CBC within `TIE_BREAK_NODES`
    branch-and-bound nodes, a deterministic limit). Both answers, and the reference, are polished
    with single-module moves evaluated in exact arithmetic (`_polish`), which removes what solver
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
    table = _table(options)
    caps = _vector(capacities, table.constraints, "capacities")
    lows = _lows(floors, table.constraints)
    factory = _backend(backend)
    if not (math.isfinite(time_limit) and time_limit > 0):
        raise ConfigError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    _require_reachable(table, caps)
    pulp = _import_pulp()
    if not factory(pulp, time_limit, None)[0].available():
        raise SolverUnavailableError(f"the ILP backend {backend!r} is not available to PuLP here")
    scales = _scales(caps)
    solve_for = _Phases(pulp, factory, table, scales, time_limit, start)
    reference = _reference(table, caps, lows, scales)
    rhs, floor = list(caps), None if lows is None else list(lows)
    for _ in range(_REPAIR_ATTEMPTS):
        answers, optimal = solve_for(rhs, floor, reference)
        feasible = [c for c in answers if _fits(_totals(table, c, scales)[1], caps, lows)]
        if feasible:
            break
        # only a solver tolerance lets an answer cross a bound, so tighten past that tolerance;
        # the polish can still climb back to the exact bound
        spent = _totals(table, answers[0], scales)[1]
        rhs = [r - max(2 * (t - c), _REPAIR_RTOL * s) if t > c else r for r, t, c, s in zip(rhs, spent, caps, scales)]
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
    best = min(_totals(table, c, scales)[0] for c in feasible)
    polished = [_polish(table, c, caps, lows, scales, best) for c in feasible]
    best = min(b for _, b in polished)
    tol = _tolerance(best, table)

    def key(choice: tuple[int, ...]) -> tuple:
        damage, _, share = _totals(table, choice, scales)
        return _rank(damage, share, choice, best, tol)

    choice = min((c for c, _ in polished), key=key)
    return _solution(table, choice, scales, backend, optimal, start)


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


def _prune(table: _Table, rhs: Sequence[float], scales: Sequence[float], upper: float, tol: float) -> np.ndarray:
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


@dataclass(frozen=True)
class _Phases:
    """The ILP solves of `solve_ilp` for one set of right-hand sides."""

    pulp: Any
    factory: Backend
    table: _Table
    scales: Sequence[float]
    time_limit: float
    start: float

    def __call__(
        self, rhs: Sequence[float], lows: Sequence[float] | None, reference: tuple[int, ...] | None
    ) -> tuple[list[tuple[int, ...]], bool]:
        """Phase 1 (least damage) and phase 2 (least cost share within the tie set) on the options
        that survive `_prune`, under capacities `rhs` and floors `lows`: both answers, and whether
        phase 1 was proved optimal."""
        table = self.table
        finite = np.isfinite(table.damage)
        shifted = np.where(finite, table.damage - table.damage.min(axis=1, keepdims=True), 0.0)
        if reference is not None and not _fits(_totals(table, reference, self.scales)[1], rhs, lows):
            # pruning against a choice outside the (tightened) bounds could cut the optimum
            reference = None
        if reference is None:
            # no cheap reference: a first solve on every option, scaled by the largest damage
            spread = float(shifted.max())
            reference, optimal = self._solve(rhs, lows, finite, shifted / (spread if spread > 0 else 1.0), None)
            if not _fits(_totals(table, reference, self.scales)[1], rhs, lows):
                # outside a bound by the solver's tolerance: `solve_ilp` tightens and comes back
                return [reference], optimal
        rows = np.arange(table.modules)
        upper = _totals(table, reference, self.scales)[0]
        # the tie tolerance at the optimum, which lies between the lower bound and `upper`
        tol = _tolerance(max(abs(upper), abs(upper - math.fsum(shifted[rows, list(reference)].tolist()))), table)
        keep = _prune(table, rhs, self.scales, upper, tol)
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
        reached = _totals(table, first, self.scales)[0]
        tol = _tolerance(reached, table)
        keep = _prune(table, rhs, self.scales, reached, tol)
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
        model = _model(self.pulp, self.table, keep, objective, rhs, lows, self.scales, cap)
        left = max(self.time_limit - (time.perf_counter() - self.start), ILP_MIN_PHASE_SECONDS)
        engines = self.factory(self.pulp, left, max_nodes)
        choice, optimal, infeasible = _run(self.pulp, model, engines, self.table.modules)
        if infeasible:
            raise InfeasibleError(_minimum(self.table), rhs, "no choice meets every constraint at once")
        if choice is None:
            raise SolverError("the ILP backend stopped (time limit?) before finding any feasible choice")
        return choice, optimal


# --------------------------------------------------------------------------- brute force


def brute_force(options: Options, capacities: Sequence[float]) -> Solution:
    """Every combination (at most `BRUTE_FORCE_LIMIT`, `ConfigError` above), with the tie rule
    applied exactly: the reference for tests and tiny instances."""
    start = time.perf_counter()
    table = _table(options)
    caps = _vector(capacities, table.constraints, "capacities")
    combinations = math.prod(table.counts)
    if combinations > BRUTE_FORCE_LIMIT:
        raise ConfigError(f"brute_force is for tiny instances: {combinations} combinations > {BRUTE_FORCE_LIMIT}")
    _require_reachable(table, caps)
    scales = _scales(caps)
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
        fits[index] = _fits(_totals(table, index, scales)[1], caps, None)
    if not fits.any():
        raise InfeasibleError(_minimum(table), caps, "no combination meets every constraint at once")
    least = float(damage[fits].min())
    tied = fits & (damage <= least + _tolerance(least, table))
    share = sum(total / scale for total, scale in zip(costs, scales))
    # the first index in C order among the least shares is the lexicographically smallest choice
    flat = int(np.argmin(np.where(tied, share, np.inf)))
    choice = np.unravel_index(flat, damage.shape)
    return _solution(table, choice, scales, "brute-force", True, start)


# --------------------------------------------------------------------------- registry


SolverFn = Callable[[Options, Sequence[float], Sequence[float] | None], Solution]
"""A registered solver: (options, capacities, floors or None) -> Solution."""


def _via_cbc(options: Options, capacities: Sequence[float], floors: Sequence[float] | None) -> Solution:
    return solve_ilp(options, capacities, backend="cbc", floors=floors)


def _via_highs(options: Options, capacities: Sequence[float], floors: Sequence[float] | None) -> Solution:
    return solve_ilp(options, capacities, backend="highs", floors=floors)


def _via_dp(options: Options, capacities: Sequence[float], floors: Sequence[float] | None) -> Solution:
    caps = tuple(capacities)
    if len(caps) != 1:
        raise ConfigError(f"the dp solver handles one constraint; {len(caps)} given: use 'ilp' or 'highs'")
    lows = None if floors is None else tuple(floors)
    if lows is not None and len(lows) != 1:
        raise ConfigError("the dp solver takes one floor")
    return solve_dp(options, caps[0], floor=None if lows is None else lows[0])


def _via_ilp(options: Options, capacities: Sequence[float], floors: Sequence[float] | None) -> Solution:
    # HiGHS first: PuLP's bundled CBC 2.10.3 has claimed optimality for worse choices on reduced
    # knapsacks (coin-or/Cbc #751) and needs the workarounds in `_cbc`; it stays as the second choice.
    for backend, via in (("highs", _via_highs), ("cbc", _via_cbc)):
        if ilp_available(backend):
            return via(options, capacities, floors)
    if len(tuple(capacities)) == 1:
        return _via_dp(options, capacities, floors)
    raise SolverUnavailableError("neither HiGHS nor CBC is available and the dp fallback handles one constraint only")


SOLVERS: dict[str, SolverFn] = {"ilp": _via_ilp, "cbc": _via_cbc, "highs": _via_highs, "dp": _via_dp}
"""Solvers by name. "ilp" is HiGHS, else CBC, else "dp" (one constraint) when neither is installed."""


def register_solver(name: str, solver: SolverFn) -> None:
    """Add a solver to `SOLVERS` under a new name (`ConfigError` if the name is taken)."""
    if name in SOLVERS:
        raise ConfigError(f"a solver named {name!r} is already registered")
    SOLVERS[name] = solver


def solve(
    options: Options,
    capacities: Sequence[float],
    *,
    solver: str = "ilp",
    floors: Sequence[float] | None = None,
) -> Solution:
    """Solve the knapsack with the named solver from `SOLVERS` (`ConfigError` listing the known
    names for an unknown one). `floors`, per constraint, bounds the total cost from below."""
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; known: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[solver](options, capacities, floors)


# --------------------------------------------------------------------------- baselines


def uniform_choice(options: Options, capacities: Sequence[float], labels: Sequence[Sequence[Hashable]]) -> Solution:
    """The same label (e.g. (bits, group)) for every module: among the labels every module offers,
    the one whose total cost fits and is highest ("as many bits as the budget allows, the same
    for all"; cost share for several constraints), ties to the lower damage, then to the earlier
    label in module 0's order. `labels[i][j]` names option j of module i; a label may appear
    once per module. `InfeasibleError` when no common label fits."""
    start = time.perf_counter()
    table = _table(options)
    caps = _vector(capacities, table.constraints, "capacities")
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
    scales = _scales(caps)
    candidates = []
    for position, label in enumerate(common):
        choice = [index[label] for index in where]
        damage, costs, share = _totals(table, choice, scales)
        candidates.append((choice, damage, costs, share, position))
    fitting = [c for c in candidates if _fits(c[2], caps, None)]
    if not fitting:
        cheapest = tuple(min(c[2][k] for c in candidates) for k in range(table.constraints))
        raise InfeasibleError(cheapest, caps, "no uniform choice fits the budget")
    choice = min(fitting, key=lambda c: (-c[3], c[1], c[4]))[0]
    return _solution(table, choice, scales, "uniform", False, start)


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
    table = _table(options)
    caps = _vector(capacities, table.constraints, "capacities")
    if reference is None:
        reference = solve(options, caps, solver=solver)
    rng = np.random.default_rng(seed)
    draws = [rng.random(len(module)) for module in options]
    noise = [[Item(item.costs, float(u)) for item, u in zip(module, row)] for module, row in zip(options, draws)]
    floors = tuple((1.0 - EQUAL_COST_RTOL) * c for c in reference.costs)
    picked = solve(noise, caps, solver=solver, floors=floors)
    return _solution(table, picked.choice, _scales(caps), f"random:{picked.solver}", False, start)


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
    table = _table(options)
    caps = _vector(capacities, table.constraints, "capacities")
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
    return _solution(table, picked.choice, _scales(caps), f"reversed:{picked.solver}", False, start)
