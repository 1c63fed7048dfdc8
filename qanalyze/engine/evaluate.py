"""Evaluation: predictions of a sequence-classification (or regression) model and the task's metrics,
or the perplexity of a causal language model (`qanalyze.engine.lm_eval`), by the task's kind."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qanalyze.data import Encoded, collate
from qanalyze.errors import ModelFormatError
from qanalyze.metrics import compute_metrics
from qanalyze.models import is_causal_lm_config
from qanalyze.tasks import AnyTask, TaskSpec


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation pass, with its mean loss and cost."""

    metrics: dict[str, float]
    loss: float
    examples: int
    seconds: float
    predictions: np.ndarray | None = None
    """Per-example predictions in input order (classification and regression; None for the ``lm`` task)."""
    labels: np.ndarray | None = None
    """The examples' labels, beside ``predictions``."""

    def to_dict(self) -> dict[str, float]:
        """Flat form used in records and logs: metrics plus ``loss``."""
        return {**self.metrics, "loss": self.loss}


def predict(
    model: torch.nn.Module, tokenizer: object, encoded: Encoded, *, batch_size: int = 64
) -> tuple[np.ndarray, float]:
    """Return per-example predictions (class index or regression value) in input order, and the mean loss."""
    device = next(model.parameters()).device
    # Batches of similar length waste little on padding; the order is undone below.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.features[i]["input_ids"]))
    outputs: list[torch.Tensor] = []
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(encoded, chunk, tokenizer).items()}
                out = model(**batch)
                loss_sum += float(out.loss) * len(chunk)
                logits = out.logits.float()
                outputs.append(logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1))
    finally:
        model.train(was_training)
    ordered = torch.cat(outputs).cpu().numpy() if outputs else np.empty(0)
    result = np.empty_like(ordered)
    result[np.asarray(order, dtype=np.int64)] = ordered
    return result, loss_sum / max(len(order), 1)


def evaluate(
    model: torch.nn.Module, tokenizer: object, encoded: Any, task: AnyTask, *, batch_size: int = 64,
    reference: torch.nn.Module | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``encoded`` (what `qanalyze.data.encode` made) with the metrics of ``task``,
    by the evaluator registered for the task's kind (`EVALUATORS`). ``reference`` (the unquantized model)
    adds the ``lm`` task's KL divergence and top-1 agreement against it; classification ignores it."""
    return EVALUATORS[task.kind](model, tokenizer, encoded, task, batch_size, reference)


def _evaluate_classification(
    model: torch.nn.Module, tokenizer: object, encoded: Encoded, task: TaskSpec, batch_size: int,
    reference: torch.nn.Module | None = None,
) -> EvalResult:
    start = time.perf_counter()
    config = getattr(model, "config", None)
    if is_causal_lm_config(config) and type(model).__name__.endswith("ForSequenceClassification"):
        # the checkpoint is a causal LM: its classification head was just made at random
        raise ModelFormatError(
            f"task {task.name} needs a trained classification head; this model is a causal language model "
            f"({', '.join(config.architectures)}) without one: fine-tune it first, or evaluate it with --task lm"
        )
    predictions, loss = predict(model, tokenizer, encoded, batch_size=batch_size)
    labels = encoded.labels.cpu().numpy()
    metrics = compute_metrics(task.metrics, predictions, labels)
    return EvalResult(metrics=metrics, loss=loss, examples=len(encoded), seconds=time.perf_counter() - start,
                      predictions=predictions, labels=labels)


def _evaluate_lm(model: torch.nn.Module, tokenizer: object, windows: Any, task: AnyTask, batch_size: int,
                 reference: torch.nn.Module | None = None) -> EvalResult:
    from qanalyze.engine.lm_eval import compare_lm, evaluate_lm

    if reference is None:
        value, nll, seconds = evaluate_lm(model, windows, batch_size=batch_size)
        return EvalResult(metrics={"perplexity": value}, loss=nll, examples=len(windows), seconds=seconds)
    found = compare_lm(model, windows, reference, batch_size=batch_size)
    return EvalResult(metrics={"perplexity": found.perplexity, **found.to_dict()}, loss=found.nll,
                      examples=len(windows), seconds=found.seconds)


EVALUATORS: dict[str, Callable[[torch.nn.Module, object, Any, Any, int, Any], EvalResult]] = {
    "classification": _evaluate_classification,
    "lm": _evaluate_lm,
}
"""Evaluator of each task kind: (model, tokenizer, encoded data, task, batch size, reference model or None)
-> `EvalResult`."""
