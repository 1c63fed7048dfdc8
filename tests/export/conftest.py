"""Fixtures of the export tests: a tiny random LLaMA whose every linear layer packs into GPTQ's 32-code words
(hidden 64, two key/value heads of 16: 32 rows), its rtn runs, and perplexity on a few real WikiText windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from qanalyze import quantize
from qanalyze.data import encode, load_task
from qanalyze.engine.evaluate import evaluate
from qanalyze.models import load_model
from qanalyze.plan.uniform import column_uniform_plan


@pytest.fixture(scope="session")
def export_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The shared tiny LLaMA made twice as wide, with its tokenizer."""
    folder = tmp_path_factory.mktemp("export-llama")
    config = AutoConfig.from_pretrained(str(tiny_llama_dir))
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def export_lm_data(wikitext_sample_dir):
    return load_task("lm", str(wikitext_sample_dir), seq_len=32, max_eval_examples=4)


@pytest.fixture(scope="session")
def mixed_plan(export_llama_dir, tmp_path_factory) -> Path:
    """4-bit g32 asymmetric everywhere, but layer 1's MLP: down_proj 8-bit g64, up_proj 8-bit symmetric per
    row, gate_proj kept in float (every format stores it)."""
    plan = column_uniform_plan(load_model(str(export_llama_dir)).model, 4, 32)
    base = plan.modules["model.layers.1.mlp.down_proj"]
    plan.modules["model.layers.1.mlp.down_proj"] = {**base, "weight_bits": 8, "column_group": "g64"}
    plan.modules["model.layers.1.mlp.up_proj"] = {**base, "weight_bits": 8, "column_group": "row",
                                                 "scheme": "symmetric"}
    plan.modules["model.layers.1.mlp.gate_proj"] = {"float": True}
    plan.modules["model.layers.1.mlp.down_proj"].pop("groups", None)
    plan.modules["model.layers.1.mlp.up_proj"].pop("groups", None)
    path = tmp_path_factory.mktemp("plans") / "mixed.json"
    plan.save(path)
    return path


def _rtn_run(model_dir, data, plan, factory) -> Path:
    out = factory.mktemp("runs") / "rtn"
    quantize(str(model_dir), data, str(plan), out, method="rtn")
    return out


@pytest.fixture(scope="session")
def mixed_run(export_llama_dir, export_lm_data, mixed_plan, tmp_path_factory) -> Path:
    """An rtn run of `mixed_plan`."""
    return _rtn_run(export_llama_dir, export_lm_data, mixed_plan, tmp_path_factory)


@pytest.fixture(scope="session")
def sym_run(export_llama_dir, export_lm_data, tmp_path_factory) -> Path:
    """An rtn run of uniform:4:g32:sym (symmetric codes, no zero points)."""
    return _rtn_run(export_llama_dir, export_lm_data, "uniform:4:g32:sym", tmp_path_factory)


@pytest.fixture(scope="session")
def perplexity(export_lm_data):
    """Perplexity of a model on the dev windows, as qanalyze evaluates it."""
    def measure(model, tokenizer) -> float:
        windows = encode(export_lm_data.dev, tokenizer, max_length=128)
        return evaluate(model, tokenizer, windows, export_lm_data.task).metrics["perplexity"]
    return measure


@pytest.fixture
def plan_variant(mixed_plan, tmp_path):
    """`mixed_plan` with one module's entry changed, written to a new file."""
    def change(module: str, **entry) -> Path:
        plan = json.loads(mixed_plan.read_text())
        plan["modules"][module].update(entry)
        path = tmp_path / f"plan-{len(list(tmp_path.glob('plan-*')))}.json"
        path.write_text(json.dumps(plan))
        return path
    return change


@pytest.fixture(scope="session")
def asym_run(export_llama_dir, export_lm_data, tmp_path_factory) -> Path:
    """An rtn run of uniform:4:g64 (asymmetric codes with zero points)."""
    return _rtn_run(export_llama_dir, export_lm_data, "uniform:4:g64", tmp_path_factory)
