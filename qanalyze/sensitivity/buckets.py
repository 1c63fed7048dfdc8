"""Length buckets: one right-padded batch run as a few sub-batches that drop the padding they share.

A batch padded to its longest sentence spends most of a Hessian-vector product on padding: the 16
SST-2 sentences of the issue-3 benchmark hold 218 tokens in 16 x 40 = 640 rows. Padding changes
neither the loss nor its derivatives (the attention mask gives padded keys exactly zero weight, the
classifier reads real tokens only), so the same loss is the example-weighted sum of the losses of
sub-batches of similar length, each cut to its own longest sentence. `LengthBuckets.of` picks the
sub-batches; `LengthBuckets.loss` turns a per-batch mean loss into that sum. The products are the
padded batch's to rounding, on fewer rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

OVERHEAD_TOKENS = 64
"""What one more sub-batch costs, in padded token rows: its share of a product's fixed work (the
autograd nodes of every layer, small GEMMs). On minilm-l6 a double-backward product through six layers
costs about 0.6 ms per row and 15 to 30 ms per sub-batch (2 cores)."""

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]
"""A loss on one batch: ``loss_fn(model, batch)`` returns a scalar tensor."""

IGNORE_INDEX = -100
"""The label Hugging Face losses skip; a batch holding it is not a plain mean over examples."""


@dataclass(frozen=True)
class LengthBuckets:
    """A batch's examples in groups of similar length.

    `groups` holds the example indices of each sub-batch (longest first), `lengths` the columns each
    keeps (its longest example's length), `size` the batch's examples and `columns` its padded length.
    """

    groups: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]
    size: int
    columns: int

    @classmethod
    def of(cls, batch: Mapping[str, Any], *, overhead_tokens: int = OVERHEAD_TOKENS) -> LengthBuckets | None:
        """The cheapest split of `batch` into sub-batches of contiguous lengths, or None when splitting
        would save nothing or could change the loss.

        The cost of a split is its rows (examples x kept columns) plus `overhead_tokens` per sub-batch.
        A split needs: an ``attention_mask`` of 0 and 1 that pads on the right only; one label per
        example (a per-example mean loss: sequence classification or regression), none of them
        `IGNORE_INDEX`; and every other value a tensor of shape (examples,) or (examples, columns, ...).
        """
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        if not isinstance(mask, Tensor) or mask.dim() != 2 or not isinstance(labels, Tensor) or labels.dim() != 1:
            return None
        size, columns = mask.shape
        if labels.shape[0] != size or size < 2 or not _splittable(batch, size, columns):
            return None
        if bool(((mask != 0) & (mask != 1)).any()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
            return None  # not a 0/1 mask padded on the right: cutting columns would move or drop tokens
        if not labels.is_floating_point() and bool((labels == IGNORE_INDEX).any()):
            return None
        lengths = mask.sum(dim=1).tolist()
        if min(lengths) == 0:
            return None  # an all-padding row attends to every column alike: cutting columns would change it
        order = sorted(range(size), key=lambda i: -lengths[i])
        groups = _cheapest_split([lengths[i] for i in order], overhead_tokens)
        if len(groups) == 1 and lengths[order[0]] == columns:
            return None
        chosen = tuple(tuple(order[start:stop]) for start, stop in groups)
        return cls(chosen, tuple(lengths[g[0]] for g in chosen), size, columns)

    @property
    def tokens(self) -> int:
        """Rows the sub-batches hold together (the padded batch holds ``size * columns``)."""
        return sum(len(group) * length for group, length in zip(self.groups, self.lengths))

    def split(self, batch: Mapping[str, Tensor]) -> list[tuple[dict[str, Tensor], float]]:
        """Each sub-batch of `batch` with its weight (its share of the examples)."""
        parts = []
        for group, length in zip(self.groups, self.lengths):
            rows = torch.tensor(group, device=batch["attention_mask"].device)
            part = {key: _cut(value.index_select(0, rows.to(value.device)), length) for key, value in batch.items()}
            parts.append((part, len(group) / self.size))
        return parts

    def loss(self, loss_fn: LossFn) -> LossFn:
        """The loss of the whole batch from `loss_fn`, a mean over examples, as the weighted sum of its
        sub-batches' losses: equal to ``loss_fn(model, batch)`` up to rounding."""

        def bucketed(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
            terms = [weight * loss_fn(model, part) for part, weight in self.split(batch)]
            return torch.stack(terms).sum()

        return bucketed


def _splittable(batch: Mapping[str, Any], size: int, columns: int) -> bool:
    # Every value must be a per-example tensor, so rows can be picked and padding columns cut.
    for value in batch.values():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != size:
            return False
        if value.dim() > 1 and value.shape[1] != columns:
            return False
    return True


def _cut(value: Tensor, length: int) -> Tensor:
    # `_splittable` let in only (examples,) and (examples, columns, ...) values.
    return value[:, :length] if value.dim() > 1 else value


def _cheapest_split(lengths: list[int], overhead: int) -> list[tuple[int, int]]:
    # Lengths sorted longest first, so a group's cost is its size times its first length. Dynamic
    # programming over where the last group starts: O(n²) for n examples, nothing at batch sizes.
    best = [0] + [0] * len(lengths)
    start_of = [0] * (len(lengths) + 1)
    for stop in range(1, len(lengths) + 1):
        costs = [(best[start] + (stop - start) * lengths[start] + overhead, start) for start in range(stop)]
        best[stop], start_of[stop] = min(costs)
    groups, stop = [], len(lengths)
    while stop:
        groups.append((start_of[stop], stop))
        stop = start_of[stop]
    return groups[::-1]
