"""The training loop on a tiny BERT with the real tokenizer and real SST-2 / STS-B examples."""

import csv
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from qanalyze.data import encode, load_task
from qanalyze.engine.evaluate import predict
from qanalyze.engine.train import TrainConfig, TrainingDiverged, TrainingInterrupted, adamw, train
from qanalyze.errors import ConfigError
from qanalyze.models import load_model
from qanalyze.records import RUN_SCHEMA
from qanalyze.rundir import checkpoint_dir, prepare_run_dir


@pytest.fixture(scope="module")
def sst2_small(glue_dir):
    return load_task("sst2", str(glue_dir), max_train_examples=96, max_eval_examples=48, seed=1)


def _config(**overrides):
    settings = dict(epochs=2, batch_size=16, lr=5e-4, max_length=32, save_every=4, seed=3, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_writes_a_complete_reloadable_run(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    run = prepare_run_dir(tmp_path / "run")
    record = train(loaded, sst2_small, _config(eval_every=5), run)

    raw = json.loads((run / "metrics.json").read_text())
    assert raw["schema"] == RUN_SCHEMA and raw["mode"] == "fp32" and raw["task"] == "sst2"
    assert 0.0 <= raw["metrics"]["accuracy"] <= 1.0
    assert raw["settings"]["total_steps"] == 12  # 96 examples / 16 per batch x 2 epochs
    assert raw["data"]["train_examples"] == 96
    assert raw["timings"]["step_seconds_median"] > 0
    with open(run / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert {int(r["epoch"]) for r in rows} == {0, 1}
    # warm-up then linear decay: the learning rate rises, peaks, and falls
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)
    with open(run / "evals.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [5, 10, 12]
    assert checkpoint_dir(run) is None  # a finished run keeps no optimizer state

    reloaded = AutoModelForSequenceClassification.from_pretrained(run, local_files_only=True)
    assert reloaded.config.id2label == {0: "0", 1: "1"}
    enc = encode(sst2_small.dev, loaded.tokenizer, max_length=32)
    before, _ = predict(loaded.model.cpu(), loaded.tokenizer, enc)
    after, _ = predict(reloaded, loaded.tokenizer, enc)
    assert (before == after).all()
    assert record.metrics["accuracy"] == pytest.approx((after == enc.labels.numpy()).mean())


def test_interrupted_run_resumes_to_identical_weights(tmp_path, tiny_bert_dir, sst2_small):
    torch.manual_seed(0)
    straight = load_model(str(tiny_bert_dir), num_labels=2)
    train(straight, sst2_small, _config(), prepare_run_dir(tmp_path / "a"))

    interrupted = load_model(str(tiny_bert_dir), num_labels=2)
    run = prepare_run_dir(tmp_path / "b")

    def stop_at_seven(log):
        if log.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="interrupted at step 7"):
        train(interrupted, sst2_small, _config(), run, on_step=stop_at_seven)
    state = json.loads((checkpoint_dir(run) / "state.json").read_text())
    assert state["step"] == 7
    assert not (run / "metrics.json").exists()

    resumed = load_model(str(tiny_bert_dir), num_labels=2)  # fresh weights: all state comes from the checkpoint
    record = train(resumed, sst2_small, _config(), run, resume=True)
    a, b = _weights(straight.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    with open(run / "log.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 13))
    assert record.settings["total_steps"] == 12


def test_resume_with_other_settings_is_refused(tmp_path, tiny_bert_dir, sst2_small):
    run = prepare_run_dir(tmp_path / "run")

    def stop(log):
        if log.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(load_model(str(tiny_bert_dir), num_labels=2), sst2_small, _config(), run, on_step=stop)
    with pytest.raises(ConfigError, match=r"different settings: lr 0.0005 -> 0.001"):
        train(load_model(str(tiny_bert_dir), num_labels=2), sst2_small, _config(lr=1e-3), run, resume=True)


def test_nan_loss_stops_with_the_step(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    with torch.no_grad():
        loaded.model.classifier.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="diverged at step 1"):
        train(loaded, sst2_small, _config(), prepare_run_dir(tmp_path / "run"))


def test_regression_task_trains_with_mse(tmp_path, glue_dir):
    data = load_task("stsb", str(glue_dir), max_train_examples=32, max_eval_examples=32, seed=0)
    loaded = load_model("minilm-l6", num_labels=1)  # the real pre-trained encoder, new regression head
    record = train(loaded, data, _config(epochs=1, max_steps=2, lr=1e-4), prepare_run_dir(tmp_path / "run"))
    assert loaded.model.config.problem_type == "regression"
    assert set(record.metrics) == {"pearson", "spearman"}
    assert -1.0 <= record.metrics["pearson"] <= 1.0


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=0.0), dict(warmup_ratio=1.0), dict(max_steps=0),
                                 dict(device="tpu")])
def test_config_validation_names_the_setting(bad):
    with pytest.raises(ConfigError):
        _config(**bad)


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_loop():
    def small_model(seed: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))

    fused, loop = small_model(0), small_model(0)
    fused_opt = adamw(fused, 1e-2, 0.1)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw(loop, 1e-2, 0.1).param_groups]
    loop_opt = torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    assert fused_opt.defaults["fused"] is True and [g["weight_decay"] for g in fused_opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in fused_opt.param_groups] == [2, 4]  # two matrices decayed; biases, gain not
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, optimizer in ((fused, fused_opt), (loop, loop_opt)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused.parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(fused.parameters()), next(small_model(0).parameters()))  # it did move
