"""A sweep's independent jobs spread over the ranks of ``torchrun --nproc-per-node N -m qanalyze sweep ...``.

A sweep's jobs (the FP32 reference, each distinct plan's run) share nothing but the files they read. Each one runs
whole in one process on one rank, as in a sweep of one process: inside `alone` the helpers of
`qanalyze.distributed` answer rank 0 of 1, so a job neither shards its batches nor sums gradients with the other
ranks, and it draws from the generators one process seeds (rank 0's). Its numbers therefore depend neither on the
rank that ran it nor on the number of ranks. `spread` runs this rank's share and returns every job's result, in
order, on every rank.

Who runs what (`balance`): jobs the caller pins go to rank 0 (the sweep's FP32 reference, so that rank 0 can
report each of its runs against it as it ends), then the most expensive job first, each to the rank with the least
work so far; with equal costs job ``i`` goes to rank ``i mod N``. The costs are the caller's estimates (a finished
run that will be reused costs nothing, so a resumed sweep spreads what is left); rank 0 computes them and
broadcasts the assignment, so that every rank follows the same one even while the ranks' views of the files
differ.

Waiting: a rank whose share is done waits for the others by polling the launcher's key-value store, not inside a
collective, whose timeout (`qanalyze.distributed.timeout`) bounds the work between two collectives, not a share of
a sweep (shares can differ by hours). It stops waiting when another rank publishes its failure
(`qanalyze.launch`), which the CLI then reports as that rank's error; a rank that dies without a word makes the
launcher stop the others.

Assumes a file system every rank sees (one machine, or a shared one across machines): a job writes its files where
the one-process sweep would, from the rank that ran it, and the results (gathered as objects) point at them.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from qanalyze.distributed import broadcast_object, gather_objects, world

R = TypeVar("R")

DONE_KEY = "qanalyze/sweep/done/"
"""Store key prefix a rank sets when its share of a spread is done: ``qanalyze/sweep/done/<spread>/<rank>``."""

POLL_S = 0.5
"""How often a rank whose share is done looks at the store."""

_spreads = itertools.count()  # spreads begun in this process: the same count on every rank, so it names the keys


@contextmanager
def alone() -> Iterator[None]:
    """Make `qanalyze.distributed.world` answer one process (rank 0 of 1) inside the block: every helper there is
    the identity, training takes whole batches and sums no gradient, and this process writes its files.

    It sets ``WORLD_SIZE`` to 1, which `qanalyze.distributed.launched` reads at every call, and puts it back
    afterwards; the process group stays joined for the collectives after the block. The environment is the
    process's: not for threads that use the group meanwhile (a sweep runs its jobs one after another)."""
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = before


def balance(costs: Sequence[float], ranks: int, *, pinned: int = 0) -> list[int]:
    """The rank of each job: the first ``pinned`` on rank 0, then the most expensive first (equal costs in job
    order), each to the rank with the least work so far (the lowest of equals). Equal costs and nothing pinned
    give job ``i`` to rank ``i mod ranks``."""
    load = [sum(costs[:pinned])] + [0.0] * (ranks - 1)
    owners = [0] * len(costs)
    for job in sorted(range(pinned, len(costs)), key=lambda j: -costs[j]):
        rank = min(range(ranks), key=lambda r: load[r])
        owners[job] = rank
        load[rank] += costs[job]
    return owners


def spread(jobs: Sequence[Callable[[], R]], costs: Callable[[], Sequence[float]], *, pinned: int = 0) -> list[R]:
    """Every job's result (picklable), in job order, on every rank. Each job runs on one rank, inside `alone`:
    `balance` of ``costs()`` (called on rank 0 only) and ``pinned`` says which; a rank runs its jobs in job order,
    so rank 0 runs the ``pinned`` first. In one process: every job here, in order."""
    here = world()
    number = next(_spreads)
    owners = broadcast_object(balance(costs(), here.size, pinned=pinned) if here.is_main else None)
    done: dict[int, R] = {}
    for index, job in enumerate(jobs):
        if owners[index] == here.rank:
            with alone():
                done[index] = job()
    if here.distributed:
        _wait_for_ranks(number)
    merged: dict[int, R] = {}
    for part in gather_objects(done):
        merged.update(part)
    return [merged[index] for index in range(len(jobs))]


def _wait_for_ranks(number: int) -> None:
    """Return once every rank has finished its share of spread ``number``; RuntimeError naming another rank's
    failure as soon as it is published. Without the store the gather's collective waits instead."""
    from qanalyze.launch import FAILURE_KEY, launcher_store

    store = launcher_store()
    if store is None:
        return
    here = world()
    store.set(f"{DONE_KEY}{number}/{here.rank}", "1")
    done = [f"{DONE_KEY}{number}/{rank}" for rank in range(here.size)]
    failures = [f"{FAILURE_KEY}{rank}" for rank in range(here.size) if rank != here.rank]
    while not store.check(done):
        for key in failures:
            if store.check([key]):
                raise RuntimeError(f"rank {key.rsplit('/', 1)[1]} failed: {store.get(key).decode().partition(' ')[2]}")
        time.sleep(POLL_S)
