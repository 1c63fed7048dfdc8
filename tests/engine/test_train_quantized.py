"""Quantized training runs on a tiny BERT with the real tokenizer and real SST-2 examples."""

import csv
import json
import math

import pytest
import torch

from qanalyze.data import encode, load_task
from qanalyze.engine.apply import quantized_weights
from qanalyze.engine.evaluate import evaluate, predict
from qanalyze.engine.quantized_checkpoint import EXTRA_FILE, PLAN_FILE, WEIGHTS_FILE, load_quantized_run
from qanalyze.engine.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train
from qanalyze.errors import ConfigError
from qanalyze.models import load_model
from qanalyze.plan.uniform import uniform_plan
from qanalyze.rundir import prepare_run_dir


@pytest.fixture(scope="module")
def sst2_small(glue_dir):
    return load_task("sst2", str(glue_dir), max_train_examples=64, max_eval_examples=32, seed=2)


def _config(**overrides):
    settings = dict(epochs=1, batch_size=16, lr=5e-4, max_length=32, save_every=2, seed=4, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def _predicted_bytes(plan):
    """The plan's storage model: packed codes, one float16 scale per group, float modules at 32 bits."""
    total = 0
    for name, spec in plan.modules.items():
        n = 1
        for size in plan.model["modules"][name]:
            n *= size
        total += 4 * n if spec.get("float") else -(-spec["weight_bits"] * n // 8) + 2 * spec["groups"]
    return total


def _stop_at_three(log):
    if log.step == 3:
        raise KeyboardInterrupt


def _losses(run):
    with open(run / "log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_uniform_16_bit_integer_training_follows_the_fp32_loss_curve(tmp_path, tiny_bert_dir, sst2_small):
    fp32 = load_model(str(tiny_bert_dir), num_labels=2)
    train(fp32, sst2_small, _config(epochs=2), prepare_run_dir(tmp_path / "fp32"))
    int16 = load_model(str(tiny_bert_dir), num_labels=2)
    plan = uniform_plan(int16.model, 16, kinds=("linear", "embedding", "layernorm"))
    train(int16, sst2_small, _config(epochs=2), prepare_run_dir(tmp_path / "int16"), plan=plan, mode="int",
          plan_source="uniform:16")
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "int16")
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3
    int4 = load_model(str(tiny_bert_dir), num_labels=2)
    train(int4, sst2_small, _config(epochs=2), prepare_run_dir(tmp_path / "int4"),
          plan=uniform_plan(int4.model, 4), mode="int")
    c = _losses(tmp_path / "int4")
    assert max(abs(x - y) for x, y in zip(a, c)) > max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize(("mode", "layout"),
                         [("int", "tensor"), ("qat", "tensor"), ("int", "channel"), ("qat", "channel")])
def test_quantized_run_saves_a_packed_checkpoint_that_reloads_exactly(tmp_path, tiny_bert_dir, sst2_small, mode,
                                                                      layout):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    plan = uniform_plan(loaded.model, 8, layout=layout)
    assert abs(_predicted_bytes(plan) - plan.totals["weight_bytes"]) <= len(plan.modules)
    plan.modules["bert.encoder.layer.0.attention.self.query"].update(weight_bits=3, group="8", groups=4)
    run = prepare_run_dir(tmp_path / mode)
    record = train(loaded, sst2_small, _config(), run, plan=plan, mode=mode, plan_source="uniform:8")
    raw = json.loads((run / "metrics.json").read_text())
    assert raw["mode"] == mode and raw["plan"] == "uniform:8"
    assert (run / PLAN_FILE).is_file() and (run / EXTRA_FILE).is_file()
    assert not (run / "model.safetensors").exists()  # the quantized checkpoint replaces the float model

    before = quantized_weights(loaded.model)
    model, tokenizer, _, _ = load_quantized_run(run)
    after = quantized_weights(model)
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name].q, after[name].q), name
        assert torch.equal(before[name].scale.float(), after[name].scale.float()), name
    # the file holds what the plan predicted: packed codes, 16-bit scales, float modules at 32 bits
    size = (run / WEIGHTS_FILE).stat().st_size
    assert abs(size - _predicted_bytes(plan)) / _predicted_bytes(plan) < 0.01
    encoded = encode(sst2_small.dev, tokenizer, max_length=32)
    loaded.model.eval()
    a, _ = predict(loaded.model, tokenizer, encoded)
    b, _ = predict(model, tokenizer, encoded)
    assert (a == b).all()
    assert record.metrics["accuracy"] == pytest.approx((b == encoded.labels.numpy()).mean())


def test_ptq_dynamic_runs_no_step(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    record = train(loaded, sst2_small, _config(), prepare_run_dir(tmp_path / "ptq"),
                   plan=uniform_plan(loaded.model, 8), mode="ptq-dynamic")
    assert record.settings["total_steps"] == 0 and record.mode == "ptq-dynamic"


def test_resuming_with_another_plan_is_refused(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    run = prepare_run_dir(tmp_path / "run")

    with pytest.raises(TrainingInterrupted):
        train(loaded, sst2_small, _config(), run, plan=uniform_plan(loaded.model, 8), mode="int",
              on_step=_stop_at_three)
    again = load_model(str(tiny_bert_dir), num_labels=2)
    with pytest.raises(ConfigError, match="different plan"):
        train(again, sst2_small, _config(), run, resume=True, plan=uniform_plan(again.model, 6), mode="int")


def test_interrupted_integer_run_resumes_to_identical_weights(tmp_path, tiny_bert_dir, sst2_small):
    straight = load_model(str(tiny_bert_dir), num_labels=2)
    train(straight, sst2_small, _config(), prepare_run_dir(tmp_path / "a"), plan=uniform_plan(straight.model, 8),
          mode="int")
    interrupted = load_model(str(tiny_bert_dir), num_labels=2)
    run = prepare_run_dir(tmp_path / "b")

    with pytest.raises(TrainingInterrupted):
        train(interrupted, sst2_small, _config(), run, plan=uniform_plan(interrupted.model, 8), mode="int",
              on_step=_stop_at_three)
    resumed = load_model(str(tiny_bert_dir), num_labels=2)
    train(resumed, sst2_small, _config(), run, resume=True, plan=uniform_plan(resumed.model, 8), mode="int")
    a, b = quantized_weights(straight.model), quantized_weights(resumed.model)
    assert all(torch.equal(a[n].q, b[n].q) for n in a)
    assert _losses(tmp_path / "a") == _losses(run)


def test_overflow_in_integer_training_stops_with_the_step(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        train(loaded, sst2_small, _config(lr=1e30, max_grad_norm=1e30), prepare_run_dir(tmp_path / "x"),
              plan=uniform_plan(loaded.model, 8), mode="int")


def test_a_plan_needs_a_quantized_mode(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    with pytest.raises(ConfigError, match="needs a plan"):
        train(loaded, sst2_small, _config(), prepare_run_dir(tmp_path / "x"), mode="int")


@pytest.mark.parametrize("lss", [True, False])
def test_int4_mode_trains_and_reloads_its_packed_4_bit_weights(tmp_path, tiny_bert_dir, sst2_small, lss):
    from qanalyze.engine.int4 import Int4Embedding, Int4Linear
    from qanalyze.methods.int4 import Int4Config

    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    plan = uniform_plan(loaded.model, 4)
    run = prepare_run_dir(tmp_path / "int4")
    record = train(loaded, sst2_small, _config(), run, plan=plan, mode="int4",
                   method_config=Int4Config(lss=lss))
    assert record.mode == "int4" and record.settings["mode_options"]["lss"] == lss
    assert all(math.isfinite(loss) for loss in _losses(run))
    kinds = {type(m) for m in loaded.model.modules()}
    assert Int4Linear in kinds and Int4Embedding in kinds
    model, tokenizer, _, _ = load_quantized_run(run)
    encoded = encode(sst2_small.dev, tokenizer, max_length=32)
    assert evaluate(model, tokenizer, encoded, sst2_small.task).metrics == record.metrics
