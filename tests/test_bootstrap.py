"""Bootstrap intervals and the paired test: vectorized resamples equal the reference metrics one resample at a
time, intervals bracket the point value, and the paired difference of a run with itself is exactly zero."""

from __future__ import annotations

import numpy as np
import pytest

from qanalyze.bootstrap import _draws, _resampled, metric_intervals, paired_difference
from qanalyze.errors import ConfigError
from qanalyze.metrics import compute_metrics


@pytest.fixture
def binary():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    predictions = np.where(rng.random(300) < 0.8, labels, 1 - labels)
    return predictions, labels


@pytest.mark.parametrize("metric", ["accuracy", "f1", "mcc"])
def test_vectorized_resamples_equal_the_reference_metric(binary, metric):
    predictions, labels = binary
    draws = _draws(len(labels), 50, seed=1)
    fast = _resampled(metric, predictions, labels, draws)
    slow = [compute_metrics([metric], predictions[rows], labels[rows])[metric] for rows in draws]
    assert fast == pytest.approx(slow, abs=1e-12)


def test_intervals_bracket_the_value_and_are_seeded(binary):
    predictions, labels = binary
    found = metric_intervals(["accuracy", "f1"], predictions, labels, seed=0)
    value = compute_metrics(["accuracy"], predictions, labels)["accuracy"]
    assert found["accuracy"][0] < value < found["accuracy"][1]
    assert found == metric_intervals(["accuracy", "f1"], predictions, labels, seed=0)
    assert found != metric_intervals(["accuracy", "f1"], predictions, labels, seed=1)


def test_paired_difference(binary):
    predictions, labels = binary
    same = paired_difference("accuracy", predictions, predictions, labels)
    assert (same.difference, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    perfect = paired_difference("accuracy", labels, predictions, labels)
    assert perfect.significant and perfect.low > 0 and perfect.difference == pytest.approx(0.2, abs=0.05)
    with pytest.raises(ConfigError, match="same examples"):
        paired_difference("accuracy", predictions[:-1], predictions, labels)
    with pytest.raises(ConfigError, match="at least 10"):
        metric_intervals(["accuracy"], predictions, labels, samples=3)
