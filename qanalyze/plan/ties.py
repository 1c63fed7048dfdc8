"""Which modules an inference engine fuses, per architecture: they must share bits and group layout.

vLLM, SGLang and llama.cpp run q/k/v of one attention as one GEMM and gate/up of one MLP as one, and
load all experts of one MoE layer alike; a plan that gives them different bits cannot be loaded (the
AutoRound-to-vLLM crash). So the planner ties them by default. Each rule is a `tie_groups` pattern: the
matched part of a module name is what differs between the members; the rest names the group.
"""

from __future__ import annotations

import re

_ATTENTION_QKV = r"self_attn\.(q_proj|k_proj|v_proj)$"
_MLP_GATE_UP = r"mlp\.(gate_proj|up_proj)$"
_LLAMA_LIKE = (_ATTENTION_QKV, _MLP_GATE_UP)

DEFAULT_TIES: dict[str, tuple[str, ...]] = {
    "bert": (r"attention\.self\.(query|key|value)$",),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3text": _LLAMA_LIKE,
    # every expert of one layer alike, and w1/w3 (gate/up) of one expert together
    "mixtral": (_ATTENTION_QKV, r"experts\.\d+\.(w1|w3)$", r"experts\.\d+\.w2$"),
    "qwen2moe": (*_LLAMA_LIKE, r"experts\.\d+\.(gate_proj|up_proj)$", r"experts\.\d+\.down_proj$"),
    # fused already: GPT-2's c_attn holds q/k/v, Phi-3's qkv_proj and gate_up_proj are single modules
    "gpt2": (),
    "phi3": (),
}
"""Tie rules by model family (the architecture class name's prefix, lower-cased)."""


def model_family(architecture: str | None) -> str | None:
    """``LlamaForCausalLM`` -> ``llama``, ``BertForSequenceClassification`` -> ``bert``, ``GPT2LMHeadModel``
    -> ``gpt2``; None for a name of no known shape."""
    found = re.match(r"([A-Za-z0-9]+?)(For[A-Z]|LMHead|Model$)", architecture or "")
    return found.group(1).lower() if found else None


def default_ties(architecture: str | None) -> tuple[str, ...]:
    """The tie rules of ``architecture``'s family; none for a family the table does not know."""
    return DEFAULT_TIES.get(model_family(architecture) or "", ())
