"""Distillation from the starting model: the loss against float64 formulas, the frozen teacher, and a run."""

import csv
import json
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from qanalyze.data import load_task
from qanalyze.engine.distill import Teacher, distillation_loss
from qanalyze.engine.train import TrainConfig, train
from qanalyze.errors import ConfigError
from qanalyze.models import load_model
from qanalyze.plan.uniform import uniform_plan
from qanalyze.rundir import prepare_run_dir


def test_classification_loss_is_t_squared_kl_of_softened_distributions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g,
                                                                                       dtype=torch.float64)
    for temperature in (1.0, 2.5):
        p = torch.softmax(teacher / temperature, dim=-1)
        q = torch.softmax(student / temperature, dim=-1)
        expected = temperature**2 * float((p * (p.log() - q.log())).sum(dim=-1).mean())
        assert float(distillation_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_regression_loss_is_mean_squared_error_and_shapes_must_match():
    student, teacher = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    assert float(distillation_loss(student, teacher, 3.0)) == pytest.approx((1 + 4) / 2)
    with pytest.raises(ConfigError, match="differ"):
        distillation_loss(torch.zeros(2, 2), torch.zeros(2, 3), 1.0)


def _classifier(architectures):
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2, architectures=architectures)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def test_teacher_is_a_frozen_copy_and_needs_a_trained_head():
    model = _classifier(["BertForSequenceClassification"])
    teacher = Teacher(model, 0.5, 1.0)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not torch.equal(teacher.model.classifier.weight, model.classifier.weight)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    ids = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}
    logits = teacher.model(input_ids=ids).logits
    task = torch.tensor(0.7)
    # The student's own logits equal the teacher's: only the task share remains.
    assert float(teacher.mix(task, logits, batch)) == pytest.approx(0.35, abs=1e-6)
    with pytest.raises(ConfigError, match="fine-tuned model"):
        Teacher(_classifier(None), 0.5, 1.0)


def test_distilled_quantized_run_records_its_setting_and_trains_on_the_mixture(tmp_path, tiny_bert_dir, glue_dir):
    data = load_task("sst2", str(glue_dir), max_train_examples=32, max_eval_examples=16, seed=2)
    losses = {}
    for alpha in (0.0, 1.0):
        loaded = load_model(str(tiny_bert_dir), num_labels=2)
        plan = uniform_plan(loaded.model, 8)
        run = prepare_run_dir(tmp_path / f"run-{alpha}")
        config = TrainConfig(epochs=1, batch_size=16, lr=5e-4, max_length=32, seed=4, device="cpu", distill=alpha)
        train(loaded, data, config, run, plan=plan, mode="qat")
        raw = json.loads((run / "metrics.json").read_text())
        assert raw["settings"].get("distill") == (alpha or None)
        with open(run / "log.csv") as handle:
            losses[alpha] = float(next(csv.DictReader(handle))["loss"])
    # The untrained tiny classifier is near 50/50: cross-entropy ~ ln 2, while its 8-bit copy's
    # distribution stays close to the teacher's, so the pure distillation loss is far smaller.
    assert losses[0.0] == pytest.approx(math.log(2), abs=0.1)
    assert 0 <= losses[1.0] < 0.05


@pytest.mark.parametrize("bad", [dict(distill=1.5), dict(distill=-0.1), dict(distill=0.5, distill_temperature=0)])
def test_bad_distillation_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="distill"):
        TrainConfig(**bad)
