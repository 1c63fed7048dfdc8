"""The Fisher diagonal of a model split by decoder layers over the ranks (`qanalyze.sensitivity.stages`), as
`qanalyze.sensitivity.scores.measure_scores` measures it in one process: the mean over calibration windows of
each weight's squared gradient, one forward and one backward pass per window.

Per window, a forward sweep sends the activations on (`qanalyze.sensitivity.pipeline.forward_sweep`); the last
rank computes the logits, relabels the window with the score labels' function (`SCORE_LABELS`: ``sampled``
draws the next tokens from those logits with the generator one process uses for that window, keyed by (seed,
`SCORE_STREAM`, window index), in the same single draw), and the loss; a plain backward sweep sends ∂L/∂h back
(`backward_sweep`). Each rank squares the gradients of its own modules' weights; the tied table's two uses are
summed on rank 0 before squaring (`sum_tied_table`), as autograd sums them for one shared tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from qanalyze.distributed import keyed_generator
from qanalyze.errors import ConfigError, NonFiniteError
from qanalyze.sensitivity.pipeline import (
    agreed_loss,
    backward_sweep,
    differentiable,
    forward_sweep,
    stage_params,
    sum_tied_table,
)
from qanalyze.sensitivity.scores import SCORE_LABELS, single_examples
from qanalyze.sensitivity.stages import Stage

SCORE_STREAM = "score-labels"
"""The stream name in the key of each window's label generator: one process's (`qanalyze.sensitivity.analyze`)."""


@dataclass(frozen=True)
class PipelinedFisher:
    """What `pipelined_fisher` found on this rank: ``fisher`` (module name -> the mean squared gradient of its
    weight, for the modules this rank reports: a tied table on rank 0 only) and ``passes`` (the windows)."""

    fisher: dict[str, Tensor]
    passes: int


class _Logits:
    """What a relabel function of `SCORE_LABELS` reads of a model: its output's ``logits`` on the window."""

    def __init__(self, logits: Tensor) -> None:
        """Hold the last rank's ``logits`` (detached) of the window being relabelled."""
        self.logits = logits

    def __call__(self, **inputs: Tensor) -> SimpleNamespace:
        """The window's logits, whatever the inputs (they are the window's)."""
        return SimpleNamespace(logits=self.logits)


def pipelined_fisher(stage: Stage, batches: Sequence[Mapping[str, Tensor]], *, labels: str, seed: int,
                     modules: Sequence[str] | None = None,
                     progress: Callable[[str, int, int, str], None] | None = None) -> PipelinedFisher:
    """The Fisher diagonal of the weights of ``modules`` (default: every quantizable module) this rank owns, from
    one pipelined forward and backward pass per example of ``batches`` (task ``lm``: one window each) with the
    labels ``labels`` names (`SCORE_LABELS`), batch i's drawn from the generator keyed by (``seed``,
    `SCORE_STREAM`, i). Every rank calls it with the same arguments. NonFiniteError (on every rank) when a
    window's loss is NaN or infinite."""
    if labels not in SCORE_LABELS:
        raise ConfigError(f"unknown score labels {labels!r}; known: {', '.join(SCORE_LABELS)}")
    report = progress or (lambda *_: None)
    params = stage_params(stage, modules)
    sums: dict[str, Tensor] = {}
    passes = 0
    for index, batch in enumerate(batches):
        report("fisher", index, len(batches), f"batch {index + 1}")
        generator = keyed_generator(seed, SCORE_STREAM, index)  # one per batch, as one process draws
        for single in single_examples(batch):
            try:
                grads = _gradients(stage, params, single, labels, generator)
            except NonFiniteError as exc:
                raise NonFiniteError(f"calibration batch {index + 1}: {exc}") from None
            for name, grad in grads.items():  # in place and in float32, as `measure_scores` sums them
                if name in sums:
                    sums[name].addcmul_(grad, grad)
                else:
                    sums[name] = grad.square()
            passes += 1
    report("fisher", len(batches), len(batches), "done")
    return PipelinedFisher({name: total.div_(max(passes, 1)) for name, total in sums.items()}, passes)


def _gradients(stage: Stage, params: Mapping[str, Tensor], batch: Mapping[str, Tensor], labels: str,
               generator: torch.Generator) -> dict[str, Tensor]:
    """One window's gradient of each of this rank's ``params``, the tied table's two uses summed on rank 0."""
    with differentiable(params.values()):
        hidden, output = forward_sweep(stage, batch["input_ids"])
        if stage.split.last:
            logits = stage.logits(output)
            relabelled = SCORE_LABELS[labels](_Logits(logits.detach()), batch, generator)
            output = stage.loss(logits, relabelled["labels"])
        agreed_loss(stage, output, "an example")
        grads = backward_sweep(stage, hidden, output, params.values())
    return sum_tied_table(stage, dict(zip(params, grads[len(grads) - len(params):])))
