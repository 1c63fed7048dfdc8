"""Plans of llama.cpp's weight types end to end: ``uniform:Q4_K`` follows llama.cpp's fallbacks, ``rtn`` stores
and reloads exactly the GGML values it evaluated, ``qat`` trains column plans (GGML types and column groups) and
saves them as the PTQ methods do, and what cannot run them is refused by name."""

from __future__ import annotations

import pytest
import torch

from qanalyze import quantize
from qanalyze.data import load_task
from qanalyze.engine.apply import validate_plan
from qanalyze.engine.column_checkpoint import load_column_run
from qanalyze.engine.train import TrainConfig
from qanalyze.errors import ConfigError
from qanalyze.models import load_model
from qanalyze.plan.uniform import resolve_plan
from qanalyze.quant.ggml import GGML_TYPES, quantize_ggml
from qanalyze.quant.layouts import quantize_layout
from qanalyze.verbs import evaluate_run, train

DOWN = "model.layers.0.mlp.down_proj"
GATE = "model.layers.0.mlp.gate_proj"


@pytest.fixture(scope="module")
def lm_data(wikitext_sample_dir):
    return load_task("lm", str(wikitext_sample_dir), seq_len=32, max_train_examples=8, max_eval_examples=3)


def test_uniform_ggml_plan_falls_back_where_llama_cpp_does(tiny_wide_llama_dir):
    model = load_model(str(tiny_wide_llama_dir)).model
    plan = resolve_plan("uniform:Q4_K", model)
    layouts = {name: entry.column_group for name, entry in plan.entries.items() if entry.quantized}
    assert layouts[GATE] == "Q4_K" and layouts[DOWN] == "Q5_0"  # 320 columns: no whole 256-column super-block
    assert plan.settings["fallbacks"] == {DOWN: "Q5_0"}
    assert plan.entries[DOWN].weight_bits == 5 and plan.entries[DOWN].scheme == "symmetric"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    expected = sum(GGML_TYPES[layouts[n]].storage_bits(m.out_features, m.in_features) for n, m in linears.items())
    assert plan.totals["weight_bits_mean_all_scales"] == pytest.approx(
        expected / sum(m.weight.numel() for m in linears.values()))
    with pytest.raises(ConfigError, match=r"uniform:TYPE for a llama\.cpp type"):
        resolve_plan("uniform:Q7_K", model)


def test_rtn_stores_the_ggml_values_it_evaluated(tmp_path, tiny_wide_llama_dir, lm_data):
    record = quantize(str(tiny_wide_llama_dir), lm_data, "uniform:Q3_K", tmp_path / "rtn", method="rtn")
    assert record.metrics["kl"] > 0
    original = load_model(str(tiny_wide_llama_dir)).model
    model, _, ptq, codes = load_column_run(tmp_path / "rtn")
    expected = quantize_ggml(original.get_submodule(GATE).weight.detach(), GGML_TYPES["Q3_K"])
    assert torch.equal(codes[GATE].codes, expected.codes) and torch.equal(codes[GATE].scale, expected.scale)
    assert torch.equal(model.get_submodule(GATE).weight, expected.dequantize())
    assert codes[DOWN].type.name == "Q4_0" and ptq["modules"][GATE]["ggml_type"] == "Q3_K"
    assert evaluate_run(str(tmp_path / "rtn")).record.metrics == pytest.approx(record.metrics, rel=1e-6)


def test_gptq_refuses_ggml_types_by_name(tmp_path, tiny_wide_llama_dir, lm_data):
    with pytest.raises(ConfigError, match=r"gptq runs column groups .* not GGML type Q4_K"):
        quantize(str(tiny_wide_llama_dir), lm_data, "uniform:Q4_K", tmp_path / "gptq", method="gptq")
    assert not (tmp_path / "gptq").exists()


@pytest.mark.parametrize("plan", ["uniform:Q4_K", "uniform:3:g64"])
def test_qat_trains_a_column_plan_and_saves_it_as_ptq_runs_are_saved(tmp_path, tiny_wide_llama_dir, lm_data, plan):
    config = TrainConfig(max_steps=2, batch_size=4, max_length=32, lr=1e-3, seed=0, device="cpu")
    record = train(str(tiny_wide_llama_dir), lm_data, config, tmp_path / "qat", mode="qat", plan=plan)
    assert {"perplexity", "kl", "top1_agreement"} <= set(record.metrics)
    model, _, ptq, codes = load_column_run(tmp_path / "qat")
    assert ptq["method"] == "qat" and ptq["trained"]
    original = load_model(str(tiny_wide_llama_dir)).model.get_submodule(GATE).weight
    trained = model.get_submodule(GATE).weight
    layout = "Q4_K" if plan == "uniform:Q4_K" else "g64"
    assert not torch.equal(trained, quantize_layout(original, 4 if layout == "Q4_K" else 3, layout).dequantize())
    # what the run stores are the trained weights' own codes, and evaluate rebuilds exactly those
    assert torch.equal(trained, codes[GATE].dequantize())
    assert evaluate_run(str(tmp_path / "qat")).record.metrics == pytest.approx(record.metrics, rel=1e-5)


def test_modes_without_column_layouts_refuse_them(tiny_wide_llama_dir):
    model = load_model(str(tiny_wide_llama_dir)).model
    plan = resolve_plan("uniform:Q4_K", model)
    with pytest.raises(ConfigError, match=r"mode int cannot run .* in column groups \(Q4_K\)"):
        validate_plan(model, plan, "int")
    assert validate_plan(model, plan, "qat")[GATE].column_group == "Q4_K"
