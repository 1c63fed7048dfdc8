"""Exact multiple-choice knapsack solvers by name: the `SOLVERS` registry behind `solve`.

The problem, its records (`Item`, `Solution`, `InfeasibleError`) and the tie rule every solver
follows are in `qanalyze.plan.knapsack`; they are importable from here too. Solvers:

- "ilp" (default): HiGHS, else CBC, else "dp" (one constraint) when neither is installed;
- "highs", "cbc": `solve_ilp` (`qanalyze.plan.ilp`) with that backend: binary variables through
  PuLP, any number of constraints, exact up to the backend's tolerances, which an exact local
  polish removes;
- "dp": `solve_dp` (`qanalyze.plan.dp`), dynamic programming over a discretised cost, one
  constraint, conservative and optimal on its grid.

`brute_force` (`qanalyze.plan.dp`) is the reference for tests and tiny instances, and the
baselines that show what the Hessian bought are in `qanalyze.plan.baselines`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qanalyze.errors import ConfigError
from qanalyze.plan.dp import BRUTE_FORCE_LIMIT, brute_force, solve_dp
from qanalyze.plan.ilp import solve_ilp
from qanalyze.plan.ilp_backends import ILP_BACKENDS, ilp_available
from qanalyze.plan.knapsack import (
    TIE_RTOL,
    InfeasibleError,
    Item,
    Options,
    Solution,
    SolverError,
    SolverUnavailableError,
    minimum_costs,
)

__all__ = [
    "BRUTE_FORCE_LIMIT",
    "ILP_BACKENDS",
    "SOLVERS",
    "TIE_RTOL",
    "InfeasibleError",
    "Item",
    "Options",
    "Solution",
    "SolverError",
    "SolverFn",
    "SolverUnavailableError",
    "brute_force",
    "ilp_available",
    "minimum_costs",
    "register_solver",
    "solve",
    "solve_dp",
    "solve_ilp",
]


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
