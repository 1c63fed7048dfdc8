"""PuLP and its ILP backends (CBC, HiGHS): building the binary model of a knapsack and running it.

Each backend's settings carry the reason for them (a CBC bug, a HiGHS default gap); `solve_ilp`
in `qanalyze.plan.ilp` holds the algorithm around these runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qanalyze.errors import ConfigError
from qanalyze.plan.knapsack import InfeasibleError, SolverError, SolverUnavailableError, Table, table_minimum


def import_pulp() -> Any:
    """The ``pulp`` module, imported on first use (`SolverUnavailableError` when it is not installed)."""
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
        pulp = import_pulp()
    except SolverUnavailableError:
        return False
    return bool(ILP_BACKENDS[backend](pulp, 1.0, None)[0].available())


def get_backend(backend: str) -> Backend:
    """The factory of the named ILP backend (`ConfigError` listing the known names)."""
    if backend not in ILP_BACKENDS:
        raise ConfigError(f"unknown ILP backend {backend!r}; known: {', '.join(sorted(ILP_BACKENDS))}")
    return ILP_BACKENDS[backend]


@dataclass(frozen=True)
class IlpModel:
    """A PuLP model over the kept options, `x[(i, j)]` binary; modules left with a single option
    are `fixed` outside it (module -> option)."""

    problem: Any
    x: dict[tuple[int, int], Any]
    fixed: dict[int, int]


def build_model(
    pulp: Any,
    table: Table,
    keep: np.ndarray,
    objective: np.ndarray,
    rhs: Sequence[float],
    lows: Sequence[float] | None,
    cap: tuple[np.ndarray, float] | None,
) -> IlpModel:
    """One option per module, every capacity (and floor), `sum objective x` to minimise and, with
    `cap` = (weights, bound), the extra row `sum weights x <= bound`. Modules with one kept option
    are fixed and their share moved to the right-hand sides: equality rows of one variable are
    what CBC's preprocessing trips on, and they cost nothing to remove.

    A cost row counts each free module's cost above its cheapest kept option and is divided by
    what the capacity leaves above those cheapest options (the slack). The backends work to
    tolerances near 1e-6 of a row's scale: scaled by the capacity, a capacity within that fraction
    of the cheapest total (a 2-bit plan of 22M weights: 45 bits) was below their resolution, so
    they returned choices over it. Scaled by the slack, the tolerance is a fraction of the slack."""
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

    def add(values: np.ndarray, upper: float, lower: float | None, name: str, slack_scaled: bool) -> None:
        # each free module's least value and the fixed part are summed exactly, so that "it fits" is
        # decided exactly
        least = np.where(free, values, np.inf).min(axis=1)
        base = np.where(np.isfinite(least), least, 0.0) if slack_scaled else np.zeros(table.modules)
        spent = math.fsum([*values[rows_fixed, columns_fixed].tolist(), *base.tolist()])
        terms = np.where(free, values - base[:, None], 0.0)
        if not terms.any():
            # nothing left to choose on this row: it holds or the problem is infeasible
            if spent > upper or (lower is not None and spent < lower):
                raise InfeasibleError(table_minimum(table), rhs, "no choice meets every constraint at once")
            return
        slack = math.fsum([upper, -spent])
        scale = slack if slack_scaled and slack > 0 else 1.0
        problem.addConstraint(expression(terms / scale) <= slack / scale, f"{name}_max")
        if lower is not None:
            problem.addConstraint(expression(terms / scale) >= math.fsum([lower, -spent]) / scale, f"{name}_min")

    rows: list[list[Any]] = [[] for _ in range(table.modules)]
    for (i, _), v in x.items():
        rows[i].append((v, 1.0))
    for i, row in enumerate(rows):
        if row:
            problem.addConstraint(pulp.LpAffineExpression(row) == 1, f"one_{i}")
    for k in range(table.constraints):
        costs = np.where(keep, table.costs[:, :, k], 0.0)
        add(costs, rhs[k], None if lows is None else lows[k], f"cost_{k}", True)
    if cap is not None:
        add(cap[0], cap[1], None, "tie", False)
    problem.setObjective(expression(np.where(free, objective, 0.0)))
    return IlpModel(problem, x, fixed)


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to /dev/null for the duration of the block.

    highspy prints its banner from C++ the first time a `Highs` object is made, whatever PuLP's
    ``msg=False`` says; on the command line that lands in the middle of a command's output.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def run_model(
    pulp: Any, model: IlpModel, engines: Sequence[Any], modules: int
) -> tuple[tuple[int, ...] | None, bool, bool]:
    """Solve with the first engine that does not crash; returns (choice or None, proved optimal,
    proved infeasible)."""
    choice = [model.fixed.get(i, -1) for i in range(modules)]
    if not model.x:
        # every module fixed, and `build_model` checked each row
        return tuple(choice), True, False
    failure = None
    for engine in engines:
        try:
            with _native_stdout_silenced():
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

