"""The llama.cpp pre-tokenizer name of a tokenizer: only the shapes llama.cpp names exactly get one."""

from __future__ import annotations

import pytest

from qanalyze.export.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer_shape

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@pytest.mark.parametrize(("pre", "name"), [
    (BYTE_LEVEL, "gpt-2"),  # GPT-2's expression: what transformers builds from SmolLM2's GGUF
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}, "smollm"),
    ({**BYTE_LEVEL, "add_prefix_space": True}, None),  # a prefix space is another tokenization
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x"}}, BYTE_LEVEL]}, None),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, BYTE_LEVEL]}, None),
])
def test_pre_tokenizer_names_only_the_shapes_llama_cpp_names(pre, name):
    assert PRE_TOKENIZERS.get(pre_tokenizer_shape({"pre_tokenizer": pre})) == name
