"""Metrics against hand-computed values and known facts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qanalyze.errors import ConfigError
from qanalyze.metrics import METRICS, compute_metrics, register_metric

PRED = np.array([1, 0, 1, 1, 0, 1])
GOLD = np.array([1, 0, 0, 1, 1, 1])
# TP = 3 (indices 0, 3, 5), TN = 1 (1), FP = 1 (2), FN = 1 (4)


def test_registry_holds_the_glue_metrics():
    assert {"accuracy", "f1", "mcc", "pearson", "spearman"} <= set(METRICS)


def test_accuracy_by_hand():
    assert compute_metrics(["accuracy"], PRED, GOLD) == {"accuracy": pytest.approx(4 / 6)}


def test_f1_by_hand():
    precision, recall = 3 / 4, 3 / 4
    assert compute_metrics(["f1"], PRED, GOLD)["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_f1_positive_class_is_one():
    # every positive wrong, every negative right: F1 of class 1 is 0, of class 0 it would be 2/3
    assert compute_metrics(["f1"], np.array([0, 0, 0]), np.array([1, 0, 0]))["f1"] == 0.0


def test_mcc_by_hand():
    tp, tn, fp, fn = 3, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(["mcc"], PRED, GOLD)["mcc"] == pytest.approx(expected)


def test_mcc_of_constant_predictions_is_zero():
    assert compute_metrics(["mcc"], np.ones(6, dtype=int), GOLD)["mcc"] == 0.0


def test_perfect_predictions_score_one():
    labels = np.array([0, 1, 1, 0, 1])
    scores = compute_metrics(["accuracy", "f1", "mcc"], labels.copy(), labels)
    assert scores == {"accuracy": 1.0, "f1": 1.0, "mcc": 1.0}
    values = np.array([0.0, 1.5, 2.25, 4.0, 5.0])
    assert compute_metrics(["pearson", "spearman"], values * 2 + 1, values) == {
        "pearson": pytest.approx(1.0),
        "spearman": pytest.approx(1.0),
    }


def test_pearson_and_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 4.0])
    # pearson: deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): 4 / 5
    # spearman equals pearson here because both are already ranks
    scores = compute_metrics(["pearson", "spearman"], x, y)
    assert scores["pearson"] == pytest.approx(0.8)
    assert scores["spearman"] == pytest.approx(0.8)


def test_spearman_is_rank_based():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert compute_metrics(["spearman"], x**3, x)["spearman"] == pytest.approx(1.0)
    assert compute_metrics(["pearson"], x**3, x)["pearson"] < 1.0


def test_correlation_of_constant_predictions_is_zero_not_nan():
    scores = compute_metrics(["pearson", "spearman"], np.full(4, 2.5), np.array([0.0, 1.0, 2.0, 3.0]))
    assert scores == {"pearson": 0.0, "spearman": 0.0}


def test_results_are_python_floats_in_order():
    scores = compute_metrics(["mcc", "accuracy"], PRED, GOLD)
    assert list(scores) == ["mcc", "accuracy"]
    assert all(type(v) is float for v in scores.values())


def test_unknown_metric_lists_known_names():
    with pytest.raises(ConfigError, match=r"unknown metric 'bleu'; known metrics: accuracy, f1, mcc"):
        compute_metrics(["accuracy", "bleu"], PRED, GOLD)


def test_shape_mismatch_is_a_bug_not_user_input():
    with pytest.raises(ValueError, match="5 predictions for 6 labels"):
        compute_metrics(["accuracy"], PRED[:5], GOLD)
    with pytest.raises(ValueError, match="1-D"):
        compute_metrics(["accuracy"], np.zeros((6, 2)), GOLD)
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(["accuracy"], np.array([]), np.array([]))


def test_register_metric():
    def error_rate(predictions: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(predictions != labels))

    register_metric("test_error_rate", error_rate)
    try:
        register_metric("test_error_rate", error_rate)  # same function again: fine
        assert compute_metrics(["test_error_rate"], PRED, GOLD) == {"test_error_rate": pytest.approx(2 / 6)}
        with pytest.raises(ConfigError, match="already registered"):
            register_metric("test_error_rate", lambda p, y: 0.0)
        with pytest.raises(ConfigError, match="callable"):
            register_metric("other", 3)
    finally:
        METRICS.pop("test_error_rate", None)


def test_next_token_nll_is_exact_for_a_large_vocabulary():
    import torch

    from qanalyze.metrics import next_token_nll, perplexity

    generator = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(2, 40, 49152, generator=generator)
    ids = torch.randint(0, 49152, (2, 40), generator=generator)
    expected = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    got = next_token_nll(logits, ids)
    assert got.shape == (2, 39)
    assert float((got.double() - expected).abs().max()) < 1e-5 * float(expected.abs().max())
    assert perplexity(float(got.double().sum()), got.numel()) == pytest.approx(float(expected.mean().exp()), rel=1e-6)


def test_kl_and_agreement_of_identical_logits():
    import torch

    from qanalyze.metrics import next_token_kl, top1_agreement

    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1))
    assert float(next_token_kl(logits, logits).abs().max()) < 1e-6
    assert bool(top1_agreement(logits, logits).all())
