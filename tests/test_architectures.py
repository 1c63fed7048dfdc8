"""Every decoder family the tool claims, as a tiny random model built here: it loads as a causal LM, its
inventory holds its projections, norms and (one) embedding, the default tie rules find what its engines
fuse, and a quantization-aware step on the lm task runs with a finite loss."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from qanalyze.engine.apply import apply_plan, tied_output_embedding
from qanalyze.methods import get_method
from qanalyze.models import inventory, is_causal_lm, load_model
from qanalyze.plan.ties import default_ties
from qanalyze.plan.uniform import uniform_plan

SMALL = {"vocab_size": 30528,  # room for the special token some families add to the MiniLM vocabulary
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 8}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"head_dim": 8}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {"head_dim": 8}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0}),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_tiny_decoder_of_each_family_is_inventoried_tied_and_trains_quantized(family, tmp_path, minilm_dir):
    config_class, model_class, extra = FAMILIES[family]
    settings = {**SMALL, **extra} if family != "gpt2" else {"vocab_size": SMALL["vocab_size"], **extra}
    torch.manual_seed(0)
    model_class(config_class(**settings)).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    model = loaded.model
    assert is_causal_lm(model)
    infos = inventory(model)
    kinds = {info.kind for info in infos}
    assert {"linear", "embedding"} <= kinds and kinds & {"layernorm", "rmsnorm"}
    names = [info.name for info in infos]
    for rule in default_ties(type(model).__name__):
        assert sum(bool(re.search(rule, name)) for name in names) >= 2, rule  # each rule ties something here
    tie = tied_output_embedding(model, infos)
    if model.config.tie_word_embeddings:
        assert tie is not None and tie[1].name not in names  # one tensor, planned once
    plan = uniform_plan(model, 4, kinds=get_method("qat").module_kinds)
    apply_plan(model, plan, "qat")
    model.train()
    ids = loaded.tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building.",
                           return_tensors="pt")["input_ids"][:, :16]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
