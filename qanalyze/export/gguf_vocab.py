"""A Hugging Face fast tokenizer as the ``tokenizer.ggml.*`` keys of a GGUF file, which llama.cpp tokenizes with.

Two kinds are written, read from the tokenizer's own ``tokenizer.json``:

- byte-level BPE (GPT-2, SmolLM2, LLaMA 3): ``tokenizer.ggml.model = "gpt2"``, the tokens by id (already in the
  byte-to-unicode alphabet llama.cpp expects), the merges ``"a b"`` in rank order;
- WordPiece (BERT's, the MiniLM tokenizer of the tests): ``"bert"``, llama.cpp's WPM tokenizer, whose tokens mark
  a word's start with ``▁`` instead of marking continuations with ``##`` (the special ``[X]`` tokens kept).

Added special tokens are ``CONTROL``, other added tokens ``USER_DEFINED``; a model whose embedding has more rows
than the tokenizer has tokens gets ``[PAD<id>]`` tokens of type ``UNUSED`` (llama.cpp needs one token per row).
``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer, the regular expressions that cut text into words before
the merges. llama.cpp's converter picks it by a hash of a tokenization that only it computes; here it is read from
the shape of the tokenizer's own pre-tokenizer where that shape is one llama.cpp names (`PRE_TOKENIZERS`: plain
byte-level, GPT-2's expression, is ``gpt-2``; single digits first, then byte-level, is ``smollm``). Any other
shape is written without a name, and llama.cpp then uses its default expressions, which split punctuation
differently (``Vocab.pre`` None; export.json records it). Other tokenizers (SentencePiece, Unigram) are refused
by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qanalyze.errors import ConfigError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
"""``gguf.TokenType`` values."""

SPECIAL_IDS = ("bos", "eos", "unk", "sep", "pad", "mask")
"""The special tokens GGUF records by id, as the tokenizer's ``<name>_token_id``."""


@dataclass
class GGUFVocab:
    """What the ``tokenizer.ggml.*`` keys hold."""

    model: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)
    pre: str | None = None
    """llama.cpp's name of the pre-tokenizer (`PRE_TOKENIZERS`), None where the shape is not one it names."""

    def write(self, writer: Any) -> None:
        """Add the keys to ``gguf.GGUFWriter`` ``writer``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for name, token_id in self.special.items():
            getattr(writer, f"add_{name}_token_id")(token_id)


def _wordpiece_token(token: str) -> str:
    """BERT's ``##piece`` as WPM's ``piece``, a word start ``word`` as ``▁word``; ``[SPECIAL]`` as it is."""
    if token.startswith("[") and token.endswith("]"):
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel",): "gpt-2",
    ("Digits:individual", "ByteLevel"): "smollm",
}
"""llama.cpp's pre-tokenizer name by the shape of a byte-level tokenizer's pre-tokenizer (`pre_tokenizer_shape`)."""


def _pre_tokenizer_parts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pre-tokenizers ``tokenizer.json`` applies, in order (a ``Sequence`` unpacked)."""
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_shape(spec: dict[str, Any]) -> tuple[str, ...]:
    """The parts of ``tokenizer.json``'s pre-tokenizer, in order: ``ByteLevel`` (only with GPT-2's expression,
    ``use_regex``, and no prefix space), ``Digits:individual``, or the part's type with a ``?`` (a shape no table
    entry matches)."""
    shape = []
    for part in _pre_tokenizer_parts(spec):
        kind = part.get("type", "?")
        if kind == "ByteLevel":
            plain = part.get("use_regex", True) and not part.get("add_prefix_space", False)
            shape.append("ByteLevel" if plain else "ByteLevel?")
        elif kind == "Digits":
            shape.append("Digits:individual" if part.get("individual_digits") else "Digits?")
        else:
            shape.append(f"{kind}?")
    return tuple(shape)


def _byte_level(spec: dict[str, Any]) -> bool:
    return any(part.get("type") == "ByteLevel" for part in _pre_tokenizer_parts(spec))


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of fast tokenizer ``tokenizer`` for an embedding of ``vocab_size`` rows; ConfigError
    naming a tokenizer kind llama.cpp's two supported here do not cover."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"llama-cpp needs a fast tokenizer (tokenizer.json), not {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    kind = spec["model"]["type"]
    if kind == "BPE" and _byte_level(spec):
        model = "gpt2"
    elif kind == "WordPiece":
        model = "bert"
    else:
        raise ConfigError(f"llama-cpp writes byte-level BPE and WordPiece tokenizers, not {kind} "
                          f"({type(tokenizer).__name__})")
    by_id = {token_id: token for token, token_id in backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(by_id)} tokens, more than the embedding's {vocab_size} rows")
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(UNUSED)
            continue
        entry = added.get(token_id)
        tokens.append(token if entry is not None or model == "gpt2" else _wordpiece_token(token))
        types.append(NORMAL if entry is None else CONTROL if entry.get("special") else USER_DEFINED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])]
    special = {name: int(token_id) for name in SPECIAL_IDS
               if (token_id := getattr(tokenizer, f"{name}_token_id", None)) is not None}
    pre = PRE_TOKENIZERS.get(pre_tokenizer_shape(spec)) if model == "gpt2" else None
    return GGUFVocab(model, tokens, types, merges if model == "gpt2" else [], special, pre)
