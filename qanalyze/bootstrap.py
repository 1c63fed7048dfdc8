"""Bootstrap intervals of a task metric over the evaluation examples, and the paired test of two runs.

GLUE dev sets are small (277 RTE examples, 408 MRPC, 872 SST-2), so a difference of a point between two
plans is often noise. `metric_intervals` resamples the examples with replacement ``samples`` times and gives
the central ``level`` interval of each metric (the percentile bootstrap). `paired_difference` resamples the
same example indices for two runs' predictions on the same examples, so what the runs share cancels, and calls
the difference significant when its interval excludes zero. Every draw comes from a NumPy generator seeded
explicitly, so an interval is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qanalyze.errors import ConfigError
from qanalyze.metrics import compute_metrics

SAMPLES = 1000
"""Resamples per interval: the percentile interval's ends move by about 0.1 point between seeds at 1000."""

LEVEL = 0.95
"""Central probability of an interval."""


def _check(samples: int, level: float) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 10:
        raise ConfigError(f"bootstrap samples must be a whole number of at least 10, not {samples!r}")
    if not 0 < level < 1:
        raise ConfigError(f"bootstrap level must lie between 0 and 1, not {level!r}")


def _draws(count: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, count, size=(samples, count))


def _counts(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    tp = ((p == 1) & (y == 1)).sum(axis=1).astype(np.float64)
    tn = ((p == 0) & (y == 0)).sum(axis=1).astype(np.float64)
    fp = ((p == 1) & (y == 0)).sum(axis=1).astype(np.float64)
    fn = ((p == 0) & (y == 1)).sum(axis=1).astype(np.float64)
    return tp, tn, fp, fn


def _binary_f1(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    tp, _, fp, fn = _counts(p, y)
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def _binary_mcc(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    tp, tn, fp, fn = _counts(p, y)
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(tp), where=denominator > 0)


# The resamples of one metric at once, (samples, examples) -> (samples,): sklearn's f1 and mcc cost a
# millisecond a call, a second per interval. Binary labels only (tests hold them equal to `compute_metrics`);
# anything else goes through `compute_metrics` one resample at a time.
_VECTORIZED = {
    "accuracy": lambda p, y: (p == y).mean(axis=1),
    "f1": _binary_f1,
    "mcc": _binary_mcc,
}


def _resampled(name: str, predictions: np.ndarray, labels: np.ndarray, draws: np.ndarray) -> np.ndarray:
    binary = set(np.unique(labels)) <= {0, 1} and set(np.unique(predictions)) <= {0, 1}
    if name in _VECTORIZED and (name == "accuracy" or binary):
        return _VECTORIZED[name](predictions[draws], labels[draws])
    return np.array([compute_metrics([name], predictions[rows], labels[rows])[name] for rows in draws])


def metric_intervals(names: Sequence[str], predictions: np.ndarray, labels: np.ndarray, *, samples: int = SAMPLES,
                     level: float = LEVEL, seed: int = 0) -> dict[str, list[float]]:
    """``{metric: [low, high]}``: the percentile bootstrap interval of each metric over the examples."""
    _check(samples, level)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    draws = _draws(len(labels), samples, seed)
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name in names:
        found = _resampled(name, predictions, labels, draws)
        intervals[name] = [float(np.nanpercentile(found, tail)), float(np.nanpercentile(found, 100 - tail))]
    return intervals


@dataclass(frozen=True)
class PairedDifference:
    """Run A's metric minus run B's on the same examples, with the bootstrap interval of that difference and
    whether it excludes zero."""

    metric: str
    difference: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | bool | str]:
        """JSON-ready form."""
        return {"metric": self.metric, "difference": self.difference, "low": self.low, "high": self.high,
                "significant": self.significant}


def paired_difference(metric: str, predictions_a: np.ndarray, predictions_b: np.ndarray, labels: np.ndarray, *,
                      samples: int = SAMPLES, level: float = LEVEL, seed: int = 0) -> PairedDifference:
    """Metric of A minus metric of B, both scored on the same resampled examples each time."""
    _check(samples, level)
    a, b, labels = np.asarray(predictions_a), np.asarray(predictions_b), np.asarray(labels)
    if not len(a) == len(b) == len(labels):
        raise ConfigError(f"paired runs must predict the same examples: {len(a)}, {len(b)} and {len(labels)} labels")
    point = compute_metrics([metric], a, labels)[metric] - compute_metrics([metric], b, labels)[metric]
    draws = _draws(len(labels), samples, seed)
    found = _resampled(metric, a, labels, draws) - _resampled(metric, b, labels, draws)
    tail = (1 - level) / 2 * 100
    return PairedDifference(metric, float(point), float(np.nanpercentile(found, tail)),
                            float(np.nanpercentile(found, 100 - tail)))
