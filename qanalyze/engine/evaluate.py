"""Evaluation: predictions of a sequence-classification (or regression) model and the task's metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from qanalyze.data import Encoded, collate
from qanalyze.metrics import compute_metrics
from qanalyze.tasks import TaskSpec


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation pass, with its mean loss and cost."""

    metrics: dict[str, float]
    loss: float
    examples: int
    seconds: float

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
    model: torch.nn.Module, tokenizer: object, encoded: Encoded, task: TaskSpec, *, batch_size: int = 64
) -> EvalResult:
    """Evaluate ``model`` on ``encoded`` with the metrics of ``task``."""
    start = time.perf_counter()
    predictions, loss = predict(model, tokenizer, encoded, batch_size=batch_size)
    metrics = compute_metrics(task.metrics, predictions, encoded.labels.cpu().numpy())
    return EvalResult(metrics=metrics, loss=loss, examples=len(encoded), seconds=time.perf_counter() - start)
