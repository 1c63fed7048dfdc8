"""Evaluation metrics by name: the GLUE metrics, computed by the reference libraries GLUE uses, and
the next-token scores of language models.

Every registered metric takes ``(predictions, labels)``: class indices for classification, floats for
regression, both 1-D and of equal length, and returns a Python float. Tasks name their metrics
(``TaskSpec.metrics``); more can be added with :func:`register_metric`. Language models are judged on
logits instead: :func:`next_token_nll` and :func:`perplexity`, and against a reference model
:func:`next_token_kl` and :func:`top1_agreement` (the figures llama.cpp and exllamav3 report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from qanalyze.errors import ConfigError

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    # zero_division=0.0: a model that never predicts the positive class scores 0, without a warning
    return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def _mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(matthews_corrcoef(labels, predictions))


def _is_constant(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


def _correlation(statistic: Callable) -> MetricFn:
    def metric(predictions: np.ndarray, labels: np.ndarray) -> float:
        # A correlation with a constant series is undefined (scipy warns and returns nan). Report 0.0,
        # the convention sklearn uses for MCC, so records stay valid JSON and runs stay comparable.
        if len(predictions) < 2 or _is_constant(predictions) or _is_constant(labels):
            return 0.0
        return float(statistic(predictions.astype(np.float64), labels.astype(np.float64)).statistic)

    return metric


METRICS: dict[str, MetricFn] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _correlation(stats.pearsonr),
    "spearman": _correlation(stats.spearmanr),
}
"""Registry of metrics by name; each maps ``(predictions, labels)`` to a float."""


def _known() -> str:
    return ", ".join(sorted(METRICS))


def register_metric(name: str, fn: MetricFn) -> None:
    """Add a metric under ``name``; re-registering the same function is a no-op.

    Raises ConfigError for an empty name, a non-callable, or a name already taken by another function.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a metric name must be a non-empty string, not {name!r}")
    if not callable(fn):
        raise ConfigError(f"metric '{name}' must be callable, not {type(fn).__name__}")
    if name in METRICS and METRICS[name] is not fn:
        raise ConfigError(f"metric '{name}' is already registered; known metrics: {_known()}")
    METRICS[name] = fn


def check_metric_names(names: Sequence[str]) -> None:
    """Raise ConfigError naming the first unknown metric in ``names`` and listing the known ones."""
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"unknown metric '{name}'; known metrics: {_known()}")


def compute_metrics(names: Sequence[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute each named metric of ``predictions`` against ``labels``, in the order given.

    ``predictions`` are class indices (classification) or floats (regression), 1-D and as long as
    ``labels``. An unknown name is a ConfigError; mismatched or empty arrays are a ValueError (a bug in
    the caller, not the user's input).
    """
    check_metric_names(names)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D (class indices or regression values); "
            f"got shapes {predictions.shape} and {labels.shape}"
        )
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics over zero examples")
    return {name: METRICS[name](predictions, labels) for name in names}


# ---------------------------------------------------------------------------------------------
# Language models: next-token scores over token windows (logits of shape (windows, L, vocab))


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of tokens 1..L-1 of each window given the tokens before them, shape
    (windows, L-1): the terms ``model(input_ids=w, labels=w).loss`` averages."""
    predicted = logits[:, :-1].float()
    # Classes on the last, contiguous dimension: with the vocabulary moved to dimension 1 (the
    # layout cross_entropy also accepts) torch's CPU log-softmax sums 49k terms less accurately
    # (1.4e-4 off in the mean NLL of SmolLM2 windows).
    flat = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), input_ids[:, 1:].reshape(-1),
                                             reduction="none")
    return flat.view(predicted.shape[:-1])


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp of the token-weighted mean next-token NLL: ``nll_sum`` summed over ``tokens`` predicted tokens."""
    if tokens < 1:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(nll_sum / tokens)


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) of the next-token distributions at each position, in nats, shape (windows, positions).

    Both inputs hold logits of the same positions (the caller drops the last one, which predicts
    nothing scored); they are normalized here, in float32.
    """
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    other = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - other)).sum(-1)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the most likely next token is the same under both, at each position (a bool tensor)."""
    return reference_logits.argmax(-1) == logits.argmax(-1)


LOWER_IS_BETTER = frozenset({"perplexity", "kl", "loss"})
"""Metrics where a smaller value is the better model (every other metric: larger is better)."""


def better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` of ``metric`` is strictly better than ``b``."""
    return a < b if metric in LOWER_IS_BETTER else a > b


RAW_METRICS = frozenset({"perplexity", "kl", "loss"})
"""Metrics shown as they are: a perplexity or a divergence has no "points" (rates shown x100 do)."""


def display_scale(metric: str | None) -> float:
    """The factor tables and figures show ``metric`` with: 100 for rates and correlations (points), 1 for
    `RAW_METRICS`."""
    return 1.0 if metric in RAW_METRICS else 100.0


def display_unit(metric: str | None) -> str:
    """The unit of ``metric`` as `display_scale` shows it: "points", or nothing."""
    return "" if metric in RAW_METRICS else " (points)"
