"""The post-training methods ``rtn`` and ``gptq`` as registry methods, through `qanalyze.quantize`: the plan's
column layouts reach every module, the packed run reloads to exactly the weights it evaluated, the causal LM's
KL is measured against the model it came from, GPTQ calibrates decoders and encoders, and what they cannot
run is refused by name before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from qanalyze import quantize
from qanalyze.data import encode, load_task
from qanalyze.engine.column_checkpoint import load_column_run
from qanalyze.errors import ConfigError, DataError
from qanalyze.methods import get_method
from qanalyze.models import load_model
from qanalyze.plan.uniform import column_uniform_plan, resolve_plan
from qanalyze.ptq.calibrate import draw_calibration
from qanalyze.quant.columns import ColumnSpec, quantize_columns, storage_bits
from qanalyze.records import RunRecord
from qanalyze.verbs import evaluate_run


@pytest.fixture(scope="module")
def lm_data(wikitext_sample_dir):
    return load_task("lm", str(wikitext_sample_dir), seq_len=32)


def test_rtn_and_gptq_are_quantize_methods_that_do_not_train():
    for name in ("rtn", "gptq"):
        method = get_method(name)
        assert method.command == "quantize" and not method.trains and method.module_kinds == ("linear",)
    assert get_method("int").command == "train"


def test_uniform_column_plan_costs_exactly_the_stored_codes(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir)).model
    plan = resolve_plan("uniform:3:g32:sym", model)
    entries = [e for e in plan.entries.values() if e.quantized]
    assert entries and all(e.column_group == "g32" and e.scheme == "symmetric" and e.weight_bits == 3 for e in entries)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert {e.name for e in entries} == set(linears)
    expected = sum(storage_bits(m.out_features, m.in_features, ColumnSpec(3, 32, True)) for m in linears.values())
    assert plan.totals["weight_bits_mean_all_scales"] == pytest.approx(
        expected / sum(m.weight.numel() for m in linears.values()))
    with pytest.raises(ConfigError, match=r"group size 128 does not divide the 32 input columns of model\.layers\.0"):
        column_uniform_plan(model, 4, 128)
    assert column_uniform_plan(model, 4, 128, partial_last=True).entries[
        "model.layers.0.mlp.down_proj"].column_group == "g128p"


def test_rtn_run_reloads_the_weights_it_evaluated_and_reports_kl(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    three = load_task("lm", str(wikitext_sample_dir), seq_len=32, max_eval_examples=3)  # evaluate keeps these
    record = quantize(str(tiny_llama_dir), three, "uniform:4:g32", tmp_path / "rtn", method="rtn")
    assert record.mode == "rtn" and {"perplexity", "kl", "top1_agreement"} <= set(record.metrics)
    assert record.metrics["kl"] > 0 and 0 < record.metrics["top1_agreement"] <= 1
    original = load_model(str(tiny_llama_dir)).model
    model, _, ptq, codes = load_column_run(tmp_path / "rtn")
    name = "model.layers.1.mlp.down_proj"
    weight = original.get_submodule(name).weight.detach()
    expected = quantize_columns(weight, ColumnSpec(4, 32, symmetric=False))
    assert torch.equal(codes[name].q, expected.q) and torch.equal(codes[name].zero_point, expected.zero_point)
    assert torch.equal(model.get_submodule(name).weight, expected.dequantize())
    # the tied output embedding is the float input embedding again, stored once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert ptq["method"] == "rtn" and ptq["modules"][name]["group_size"] == 32
    again = evaluate_run(str(tmp_path / "rtn"))
    assert again.quantized and again.record.examples == 3
    assert again.record.metrics == pytest.approx(record.metrics, rel=1e-6)


def test_gptq_calibrates_on_drawn_training_windows_and_records_its_settings(tmp_path, tiny_llama_dir,
                                                                                      lm_data):
    config = get_method("gptq").make_config({"calib_windows": 6})
    gptq = quantize(str(tiny_llama_dir), lm_data, "uniform:3:g32", tmp_path / "gptq", method_config=config)
    ptq = json.loads((tmp_path / "gptq" / "ptq.json").read_text())
    assert ptq["calibration_windows"] == 6 and ptq["config"]["damp"] == 0.01
    first = "model.layers.0.self_attn.q_proj"
    assert ptq["modules"][first]["output_error"] is not None
    assert RunRecord.load(tmp_path / "gptq" / "metrics.json").settings["mode_options"]["calib_windows"] == 6
    assert gptq.timings["prepare_seconds"] > 0 and gptq.mode == "gptq"


def test_draw_calibration_is_seeded_and_keeps_order(lm_data, minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    windows = encode(lm_data.train, tokenizer)
    drawn = draw_calibration(windows, 3, seed=1)
    assert len(drawn) == 3 and list(drawn.indices) == sorted(drawn.indices)
    assert drawn.indices == draw_calibration(windows, 3, seed=1).indices
    assert draw_calibration(windows, 10_000, seed=1) is windows


def test_gptq_runs_on_an_encoder_classifier(tmp_path, tiny_bert_dir, glue_dir):
    data = load_task("sst2", str(glue_dir), max_train_examples=16, max_eval_examples=16, seed=0)
    record = quantize(str(tiny_bert_dir), data, "uniform:4:g32", tmp_path / "bert", method="gptq")
    assert "accuracy" in record.metrics and "kl" not in record.metrics
    ptq = json.loads((tmp_path / "bert" / "ptq.json").read_text())
    assert ptq["calibration_windows"] == 16
    assert all(module["output_error"] is not None for module in ptq["modules"].values())
    again = evaluate_run(str(tmp_path / "bert"), max_train_examples=16, max_eval_examples=16, seed=0)
    assert again.record.metrics == pytest.approx(record.metrics)


def test_plans_the_methods_cannot_run_are_refused_by_name_and_leave_nothing(tmp_path, tiny_llama_dir, lm_data):
    model = load_model(str(tiny_llama_dir)).model
    plan = column_uniform_plan(model, 4, 32)
    plan.modules["model.embed_tokens"] = {"weight_bits": 4, "group": "channel", "column_group": "g32"}
    with pytest.raises(ConfigError, match=r"quantizes model\.embed_tokens, which is not a linear layer"):
        quantize(str(tiny_llama_dir), lm_data, plan, tmp_path / "a", method="rtn")
    row_groups = resolve_plan("uniform:4", model, kinds=("linear",))
    with pytest.raises(ConfigError, match="row groups 'tensor', not a column layout"):
        quantize(str(tiny_llama_dir), lm_data, row_groups, tmp_path / "b", method="rtn")
    with pytest.raises(ConfigError, match="is not a post-training quantizer"):
        quantize(str(tiny_llama_dir), lm_data, "uniform:4:g32", tmp_path / "c", method="int")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_interrupted_quantization_leaves_no_run_directory(tmp_path, tiny_llama_dir, lm_data, monkeypatch):
    from qanalyze.ptq import quantize as ptq_quantize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ptq_quantize, "rtn_quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(tiny_llama_dir), lm_data, "uniform:4:g32", tmp_path / "run", method="rtn")
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        quantize(str(tiny_llama_dir), lm_data, "uniform:4:g32", tmp_path / "empty", method="rtn")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_calibration_without_windows_is_refused(tiny_llama_dir):
    from qanalyze.lm_data import Windows

    empty = Windows(input_ids=torch.zeros((0, 8), dtype=torch.long), text_tokens=0, indices=(), where="x")
    with pytest.raises(DataError, match="at least one window"):
        draw_calibration(empty, 4, seed=0)
