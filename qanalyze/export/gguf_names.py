"""Hugging Face parameter names of a LLaMA-family decoder as llama.cpp's GGUF tensor names
(``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``), the names ``llama-quantize`` and GGUF files use.

Only the decoders whose tensors llama.cpp's ``llama`` architecture holds are mapped (LLaMA, Mistral-style and
SmolLM2 checkpoints: `LLAMA_MODEL_TYPES`); another architecture, or a module the table does not know, is refused
by name rather than given a guessed name.
"""

from __future__ import annotations

import re

from qanalyze.errors import ConfigError

LLAMA_MODEL_TYPES = frozenset({"llama", "mistral"})
"""Hugging Face ``model_type`` values whose modules map onto llama.cpp's ``llama`` architecture."""

TOP_LEVEL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
"""Modules outside the decoder layers."""

IN_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
"""Modules of decoder layer N, as ``blk.N.<name>``."""

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def check_architecture(model_type: str | None) -> None:
    """ConfigError naming ``model_type`` unless llama.cpp's ``llama`` architecture holds it."""
    if model_type not in LLAMA_MODEL_TYPES:
        raise ConfigError(f"llama-cpp exports LLaMA-family decoders ({', '.join(sorted(LLAMA_MODEL_TYPES))}), "
                          f"not model_type {model_type!r}")


def gguf_module_name(name: str) -> str:
    """The GGUF name of Hugging Face module ``name`` (no ``.weight``); ConfigError naming an unknown one."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    match = _LAYER.fullmatch(name)
    if match and match.group(2) in IN_LAYER:
        return f"blk.{match.group(1)}.{IN_LAYER[match.group(2)]}"
    raise ConfigError(f"llama-cpp has no GGUF tensor name for module {name} (it maps the modules of LLaMA-family "
                      "decoders)")


def gguf_tensor_name(key: str) -> str:
    """The GGUF name of state-dict key ``key`` (``model.norm.weight`` -> ``output_norm.weight``)."""
    module, _, parameter = key.rpartition(".")
    return f"{gguf_module_name(module)}.{parameter}"
