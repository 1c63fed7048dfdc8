"""torch.distributed for the stages that sum over calibration data: who this process is, its share of the
batches, and the sums over every rank.

Launched by ``torchrun`` (``WORLD_SIZE`` set), the first call of `world` joins the process group the
launcher's environment describes: gloo for tensors on the CPU and NCCL for CUDA tensors when the machine has
a GPU, with a timeout on every collective (`TIMEOUT_ENV`), so that a rank whose peer died stops instead of
waiting for ever. Without ``WORLD_SIZE`` nothing here starts a group: every helper is the identity and costs
nothing, and the numbers are those of one process.

The stages stay independent of the number of ranks N: work is split by calibration batch (`shard`, strided,
so batch ``i`` belongs to rank ``i mod N`` and a gather of one batch per rank returns them in global order);
sums are reduced over ranks (`all_reduce_sum`, `all_reduce_floats`); and every random draw comes from a
generator keyed by what it is for and the global index of its batch (`keyed_generator`), never from one
generator running through the batches, whose state at batch ``i`` would depend on which batches came before
it on the same rank. torch is imported inside the functions: the CLI asks `launched` before torch may load
(`qanalyze.threads`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qanalyze.errors import ConfigError

if TYPE_CHECKING:
    import torch

TIMEOUT_ENV = "QANALYZE_DIST_TIMEOUT"
"""Seconds a collective may wait for the other ranks (default `DEFAULT_TIMEOUT_S`). It bounds how long a rank
waits for a peer that died without a word, and must exceed the longest stretch of work between two collectives
on the slowest rank (one Hessian batch of an analysis, one decoder layer of GPTQ)."""

DEFAULT_TIMEOUT_S = 1800

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size`` (0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files and speaks (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to share the work with."""
        return self.size > 1


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several ranks (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def timeout() -> timedelta:
    """The collective timeout (`TIMEOUT_ENV`); ConfigError for a value that is not a positive number."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {text!r}")
    return timedelta(seconds=seconds)


def init_from_env() -> World:
    """Join the process group described by the launcher's environment (once; later calls return the same
    world); `World()` when not launched as several ranks."""
    if not launched():
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # each rank its own GPU, so that "cuda" means this rank's device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout())
    return World(dist.get_rank(), dist.get_world_size())


def world() -> World:
    """This process's `World`, joining the launcher's process group at the first call."""
    return init_from_env()


def shard(count: int, what: str) -> list[int]:
    """The indices of ``count`` items (calibration batches) this rank works on: ``rank, rank + N, ...``.
    ConfigError (the same on every rank) when there are fewer items than ranks; ``what`` names the items and
    how to get more of them."""
    here = world()
    if count < here.size:
        raise ConfigError(f"{here.size} ranks need at least {here.size} {what}; there are {count}")
    return list(range(here.rank, count, here.size))


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if world().distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced in place by its sum over every rank (returned); unchanged when not distributed."""
    return _all_reduce(tensor, "SUM")


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced in place by its elementwise maximum over every rank (returned); unchanged when not
    distributed."""
    return _all_reduce(tensor, "MAX")


def all_reduce_floats(values: Sequence[float]) -> list[float]:
    """The sums over every rank of a list of numbers (in float64); the numbers themselves when not
    distributed."""
    if not world().distributed:
        return list(values)
    import torch

    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` when not distributed."""
    if not world().distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world().size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable); ``value`` itself when not distributed."""
    if not world().distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank got here (nothing when not distributed)."""
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def private_output(out: str | Path) -> Iterator[Path]:
    """``out`` on rank 0; on the other ranks a temporary folder of the same name, removed afterwards: code
    that writes its results where it is told can run unchanged on every rank while only rank 0's files stay."""
    if world().is_main:
        yield Path(out)
        return
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=f"qanalyze-rank{world().rank}-"))
    try:
        yield scratch / Path(out).name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def keyed_seed(*key: object) -> int:
    """A 63-bit seed derived from ``key`` (its ``repr`` hashed by BLAKE2b): the same on every rank and in every
    process, and unrelated seeds for different keys."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def keyed_generator(*key: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``key`` (for example the seed, a stream name and a global batch index): the
    same draws on every rank and for any number of ranks, and independent streams for different keys."""
    import torch

    return torch.Generator(device=device).manual_seed(keyed_seed(*key))
