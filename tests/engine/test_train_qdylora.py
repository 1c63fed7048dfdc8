"""qdylora through the training loop: a frozen quantized base, adapters trained with a rank drawn per
step, metrics at every rank from the one run, and a run directory that reloads to the same numbers."""

import json

import pytest
import torch

from qanalyze.data import encode, load_task
from qanalyze.engine.evaluate import evaluate
from qanalyze.engine.lora import set_rank
from qanalyze.engine.lora_checkpoint import is_qdylora_run, load_qdylora_run
from qanalyze.engine.train import TrainConfig, train
from qanalyze.errors import ConfigError
from qanalyze.methods.qdylora import QDyLoRAConfig
from qanalyze.models import load_model
from qanalyze.plan.uniform import uniform_plan
from qanalyze.rundir import prepare_run_dir


@pytest.fixture(scope="module")
def sst2_small(glue_dir):
    return load_task("sst2", str(glue_dir), max_train_examples=64, max_eval_examples=32, seed=2)


CONFIG = TrainConfig(epochs=2, batch_size=16, lr=5e-3, max_length=32, save_every=100, seed=4, device="cpu")


def test_qdylora_trains_adapters_only_and_reports_every_rank(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    plan = uniform_plan(loaded.model, 4)
    run = prepare_run_dir(tmp_path / "run")
    record = train(loaded, sst2_small, CONFIG, run, plan=plan, mode="qdylora",
                   method_config=QDyLoRAConfig(rank=4, eval_ranks=(1, 2, 4, 8)))
    assert record.mode == "qdylora" and set(record.rank_metrics) == {"1", "2", "4"}
    assert record.metrics == record.rank_metrics["4"]
    assert record.settings["lora"]["rank"] == 4 and is_qdylora_run(run)
    state = loaded.model.state_dict()
    query = "bert.encoder.layer.0.attention.self.query"
    # the base is the plan's 4-bit weight, frozen: quantized once, never trained
    assert not torch.equal(state[f"{query}.weight"], original[f"{query}.weight"])
    assert torch.unique(state[f"{query}.weight"]).numel() <= 16
    assert torch.equal(state[f"{query}.bias"], original[f"{query}.bias"])
    assert torch.count_nonzero(state[f"{query}.lora_B"]) > 0  # B starts at zero: the adapters learned
    assert not torch.equal(state["classifier.weight"], original["classifier.weight"])
    # the run reloads to the same metrics at any rank, without retraining
    model, tokenizer, built = load_qdylora_run(run)
    encoded = encode(sst2_small.dev, tokenizer, max_length=32)
    for rank in ("1", "4"):
        set_rank(built, int(rank))
        assert evaluate(model, tokenizer, encoded, sst2_small.task).metrics == record.rank_metrics[rank]
    assert json.loads((run / "lora.json").read_text())["rank"] == 4


def test_qdylora_with_an_nf4_base_needs_no_plan(tmp_path, tiny_bert_dir, sst2_small):
    loaded = load_model(str(tiny_bert_dir), num_labels=2)
    config = TrainConfig(max_steps=2, batch_size=16, max_length=32, seed=0, device="cpu")
    record = train(loaded, sst2_small, config, prepare_run_dir(tmp_path / "nf4"), mode="qdylora",
                   method_config=QDyLoRAConfig(rank=2, base="nf4", eval_ranks=(1, 2)))
    assert set(record.rank_metrics) == {"1", "2"}
    with pytest.raises(ConfigError, match="needs a plan"):
        train(load_model(str(tiny_bert_dir), num_labels=2), sst2_small, config,
              prepare_run_dir(tmp_path / "none"), mode="qdylora", method_config=QDyLoRAConfig(rank=2))
