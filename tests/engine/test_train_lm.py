"""Training on the language-model task: a tiny LLaMA (grouped-query attention, RMSNorm, input and output
embeddings tied) trains in the plan-following methods, and its saved run reloads to the perplexity
training recorded: the tied tensor is planned once and quantized wherever it is used."""

from __future__ import annotations

import pytest

from qanalyze import load_task, verbs
from qanalyze.engine.apply import apply_plan, tied_output_embedding
from qanalyze.engine.train import TrainConfig
from qanalyze.errors import ConfigError
from qanalyze.methods import get_method
from qanalyze.models import inventory, load_model
from qanalyze.plan.uniform import uniform_plan


@pytest.fixture(scope="module")
def lm_data(wikitext_sample_dir):
    return load_task("lm", str(wikitext_sample_dir), seq_len=32, max_train_examples=8, max_eval_examples=3)


def test_the_tied_output_projection_is_found_and_norms_are_their_own_kind(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir)).model
    infos = inventory(model)
    embedding, output = tied_output_embedding(model, infos)
    assert (embedding.name, output.name, output.kind) == ("model.embed_tokens", "lm_head", "linear")
    assert "lm_head" not in {info.name for info in infos}  # one tensor, planned once
    assert {info.kind for info in infos if "norm" in info.name} == {"rmsnorm"}
    plan = uniform_plan(model, 8, kinds=get_method("int").module_kinds)
    assert all(plan.entry(info.name).quantized is False for info in infos if info.kind == "rmsnorm")
    plan.modules["model.norm"] = dict(plan.modules["model.layers.0.self_attn.q_proj"])
    with pytest.raises(ConfigError, match="no RMSNorm kernel"):
        apply_plan(model, plan, "int")


@pytest.mark.parametrize(("mode", "bits"), [("int", 8), ("int4", 4)])
def test_a_decoder_trains_on_lm_and_reloads_to_its_recorded_perplexity(tmp_path, tiny_llama_dir, lm_data, mode, bits):
    config = TrainConfig(max_steps=2, batch_size=4, eval_batch_size=4)
    record = verbs.train(str(tiny_llama_dir), lm_data, config, tmp_path / "run", mode=mode, plan=f"uniform:{bits}")
    assert record.task == "lm" and set(record.metrics) == {"perplexity"}
    reloaded = verbs.evaluate_run(str(tmp_path / "run"), max_eval_examples=3)
    assert reloaded.quantized
    assert reloaded.record.metrics["perplexity"] == pytest.approx(record.metrics["perplexity"], rel=1e-6)
