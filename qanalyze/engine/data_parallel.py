"""Fine-tuning on N ranks (``torchrun``) as one process trains on the same global batches.

The batches: every rank draws an epoch's order from the same seeded generator (`qanalyze.data.epoch_order`)
and cuts the same global batches of ``--batch-size`` examples; rank r takes the r-th contiguous slice of each
(`rank_share`: ``batch_size / N`` examples; the last, smaller batch of an epoch is split as evenly as it goes).

The gradient: a model's loss is the mean over its batch's items (examples for a task head, predicted tokens
for a causal LM: `loss_items`). Rank r's loss is scaled by ``items_r / items`` of the global batch before its
backward pass and the gradients are then summed over ranks (`sum_gradients`), which is the gradient of the
global batch's mean; averaging the ranks' means instead would weigh a rank with fewer tokens as much as one
with more. Clipping, AdamW and the schedule then run on every rank on the same gradient, so the weights stay
equal without a broadcast. `reduce_step` sums each step's counts, losses and flags in one collective: a
non-finite loss on any rank, or a Ctrl-C on any rank, stops every rank at the same step.

Why not DistributedDataParallel: it averages gradients (the token weighting needs the counts before the
backward pass all the same), it needs ``find_unused_parameters`` (a walk of the graph every step) for DyLoRA,
whose drawn rank leaves adapter rows without gradient, and it broadcasts rank 0's buffers before each forward
pass, which would replace the ranks' activation ranges instead of taking them over the global batch. One
summed buffer after the backward pass has none of these problems; it does not overlap communication with the
backward pass as DDP's buckets do, which matters for large models on many GPUs, not for the models here.

What a module takes from its training batches is taken over every rank's share (`share_batch_statistics`):
QAT's EMA input range (max|x| of the batch: N ranks keep the range one process keeps) and int4's Hadamard block
and input step size, chosen on the first batch (the ranks must choose alike, or their models would part).

Random draws (per-rank generators, documented seeds): rank 0 draws from the generators one process uses (the
global generator seeded with ``--seed``, which dropout draws from; each swapped module's generator as
`qanalyze.engine.apply.apply_plan` seeds it, which stochastic rounding draws from). Rank r > 0 seeds the
global generator with ``keyed_seed(seed, "global", r)`` and the module generator named ``name`` with
``keyed_seed(its seed, name, r)`` (`qanalyze.distributed.keyed_seed`), so that the ranks' draws for their
different examples are independent streams rather than copies of one. Generators whose draws must be the same
on every rank (DyLoRA's rank of each step) are named by the method (``Prepared.shared_generators``) and keep
their seed. Modes that draw per example (dropout, the stochastic rounding of gradients in ``int`` and
``int4``) or take a per-tensor scale from the batch inside an autograd Function (the ``int`` modes' dynamic
activation and gradient scales, over each rank's share) therefore train the same way as one process, not to
the same numbers; deterministic ones (``fp32`` on a model without dropout, ``qat``) follow one process's loss
curve within float rounding (tests/engine/test_data_parallel.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qanalyze.data import collate, iter_batches, num_batches
from qanalyze.distributed import all_reduce_floats, all_reduce_sum, keyed_seed, world
from qanalyze.errors import ConfigError
from qanalyze.models import is_causal_lm

IGNORE_INDEX = -100
"""The label Hugging Face's losses skip (padding of a causal LM's labels)."""


def check_batch_size(batch_size: int) -> None:
    """ConfigError (the same on every rank) when the global ``batch_size`` does not split evenly over the ranks."""
    size = world().size
    if batch_size % size:
        raise ConfigError(f"--batch-size {batch_size} is the global batch, split over {size} ranks: it must be a "
                          f"multiple of {size}")


def check_last_batch(examples: int, batch_size: int, total_steps: int) -> None:
    """ConfigError when a batch the run reaches leaves a rank without an example: the last batch of an epoch
    holds ``examples mod batch_size`` of them, which must be none or at least one per rank."""
    size, last = world().size, examples % batch_size
    if 0 < last < size and total_steps >= num_batches(examples, batch_size):
        raise ConfigError(f"the last batch of each epoch holds {last} of the {examples} training examples, fewer "
                          f"than the {size} ranks that share it: choose --batch-size or --max-train-examples so "
                          "that it is empty or holds one per rank")


def rank_share(indices: Sequence[int]) -> list[int]:
    """This rank's contiguous slice of a global batch's ``indices``: the first ``len mod N`` ranks take one
    more than the others. All of them when not distributed."""
    here = world()
    size, extra = divmod(len(indices), here.size)
    begin = here.rank * size + min(here.rank, extra)
    return list(indices[begin : begin + size + (here.rank < extra)])


def rank_batches(encoded: Any, tokenizer: Any, *, batch_size: int, order: Sequence[int],
                 start: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of each global batch of `qanalyze.data.iter_batches` (the same arguments), collated;
    exactly `iter_batches` when not distributed."""
    if not world().distributed:
        return iter_batches(encoded, tokenizer, batch_size=batch_size, order=order, start=start)
    order = list(order)
    total = num_batches(len(order), batch_size)
    if not 0 <= start <= total:
        raise ConfigError(f"start batch must lie in 0..{total}, got {start!r}")
    return (collate(encoded, rank_share(order[b * batch_size : (b + 1) * batch_size]), tokenizer)
            for b in range(start, total))


def loss_items(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """How many items ``model``'s loss on ``batch`` averages over: the labelled next tokens of a causal LM
    (Hugging Face shifts the labels by one and skips `IGNORE_INDEX`), else the examples."""
    labels = batch["labels"]
    if is_causal_lm(model):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return int(labels.shape[0])


@dataclass(frozen=True)
class StepTotals:
    """One step summed over the ranks: this rank's ``weight`` (its share of the global batch's items), the
    global batch's mean ``loss`` (nan when any rank's loss was not finite), and whether any rank asked to
    ``stop`` (Ctrl-C)."""

    weight: float
    loss: float
    finite: bool
    stop: bool


def reduce_step(loss: torch.Tensor, items: int, stop: bool) -> StepTotals:
    """Sum this rank's item count, loss times items, non-finite flag and stop flag over every rank (one
    collective) into the step's `StepTotals`."""
    value = float(loss.detach())
    finite = math.isfinite(value)
    total, summed, bad, stops = all_reduce_floats([items, value * items if finite else 0.0, float(not finite),
                                                   float(stop)])
    return StepTotals(weight=items / total, loss=summed / total if not bad else math.nan, finite=not bad,
                      stop=stops > 0)


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its sum over the ranks: one flat buffer per dtype and device, one collective
    each (a collective per tensor would pay the latency hundreds of times a step). Every rank holds gradients
    for the same parameters: the same modules run on every rank."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            groups.setdefault((param.grad.dtype, param.grad.device), []).append(param.grad)
    for grads in groups.values():
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def share_batch_statistics(model: torch.nn.Module) -> None:
    """Make every module that takes something from its training batches (an attribute ``ranks_share_batch``:
    QAT's and int4's linear layers) take it over every rank's share of the global batch."""
    for module in model.modules():
        if hasattr(module, "ranks_share_batch"):
            module.ranks_share_batch = True


def rank_seed(seed: int) -> int:
    """The seed of the global generator (dropout) on this rank: ``seed`` on rank 0 and in one process,
    ``keyed_seed(seed, "global", r)`` on rank r > 0."""
    rank = world().rank
    return seed if rank == 0 else keyed_seed(seed, "global", rank)


def seed_rank_generators(generators: Mapping[str, torch.Generator], shared: Collection[str]) -> None:
    """On rank r > 0, reseed each generator not named in ``shared`` with ``keyed_seed(its seed, name, r)``;
    nothing on rank 0 and in one process."""
    rank = world().rank
    if rank == 0:
        return
    for name, generator in generators.items():
        if name not in shared:
            generator.manual_seed(keyed_seed(generator.initial_seed(), name, rank))
