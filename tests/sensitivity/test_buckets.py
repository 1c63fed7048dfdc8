"""Length buckets: the split, when it is refused, and that unpadded products are the padded batch's."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from qanalyze.errors import ConfigError
from qanalyze.sensitivity.buckets import LengthBuckets
from qanalyze.sensitivity.hvp import HVP, METHODS, default_loss

VOCAB = 40


def padded_batch(lengths: list[int], *, columns: int | None = None, seed: int = 0, regression: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    columns = columns or max(lengths)
    mask = (torch.arange(columns) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, VOCAB, (len(lengths), columns), generator=g) * mask
    labels = torch.rand(len(lengths), generator=g, dtype=torch.float64) if regression else \
        torch.randint(0, 2, (len(lengths),), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


LENGTHS = [3, 12, 4, 5, 11, 3, 6, 2, 12, 4]
# Two long sentences among short ones, as in an SST-2 batch: the default overhead splits it.
SKEWED = [30, 4, 3, 5, 2, 6, 4, 28, 3, 5, 2, 3, 4, 6, 5, 3]


def test_split_covers_each_example_once_at_its_group_length():
    buckets = LengthBuckets.of(padded_batch(LENGTHS, columns=16), overhead_tokens=8)
    assert buckets is not None and buckets.size == len(LENGTHS) and buckets.columns == 16
    members = [i for group in buckets.groups for i in group]
    assert sorted(members) == list(range(len(LENGTHS)))
    for group, length in zip(buckets.groups, buckets.lengths):
        assert length == max(LENGTHS[i] for i in group)
    assert list(buckets.lengths) == sorted(buckets.lengths, reverse=True)
    assert buckets.tokens < len(LENGTHS) * 16


@pytest.mark.parametrize("overhead", [0, 5, 20, 200])
def test_split_is_the_cheapest_contiguous_one(overhead):
    lengths = sorted(LENGTHS, reverse=True)
    n = len(lengths)

    def cost(cuts):
        bounds = [0, *cuts, n]
        return sum((stop - start) * lengths[start] + overhead for start, stop in itertools.pairwise(bounds))

    best = min(cost(cuts) for k in range(n) for cuts in itertools.combinations(range(1, n), k))
    buckets = LengthBuckets.of(padded_batch(LENGTHS, columns=13), overhead_tokens=overhead)
    found = buckets.tokens + overhead * len(buckets.groups) if buckets else n * 13 + overhead
    assert found == min(best, n * 13 + overhead)


def test_split_is_refused_where_it_could_change_the_loss_or_save_nothing():
    batch = padded_batch(LENGTHS)

    def split(changed: dict) -> LengthBuckets | None:
        return LengthBuckets.of(changed, overhead_tokens=4)

    assert split(batch) is not None
    assert LengthBuckets.of(batch) is None  # 10 x 12 rows: one more sub-batch costs more than it saves
    assert split({**batch, "attention_mask": batch["attention_mask"].flip(1)}) is None  # left padding
    assert split({k: v for k, v in batch.items() if k != "attention_mask"}) is None
    assert split({k: v for k, v in batch.items() if k != "labels"}) is None
    assert split({**batch, "labels": batch["input_ids"]}) is None  # token labels: not a mean over examples
    ignored = batch["labels"].clone()
    ignored[0] = -100
    assert split({**batch, "labels": ignored}) is None
    assert split({**batch, "extra": 3}) is None
    assert split(padded_batch([7] * 6)) is None  # no padding to drop
    assert split(padded_batch([*LENGTHS[:-1], 0], columns=12)) is None  # an example with no token


def tiny_models() -> dict[str, torch.nn.Module]:
    common = {"num_labels": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    configs = {
        "bert": (BertForSequenceClassification, BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, initializer_range=0.2, attn_implementation="eager", **common)),
        "distilbert": (DistilBertForSequenceClassification, DistilBertConfig(
            vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32,
            initializer_range=0.2, attn_implementation="eager", **common)),
        "gpt2": (GPT2ForSequenceClassification, GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, initializer_range=0.2,
            attn_implementation="eager", **common)),
        "llama": (LlamaForSequenceClassification, LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32, max_position_embeddings=32, initializer_range=0.2, attn_implementation="eager",
            **common)),
    }
    models = {}
    for name, (cls, config) in configs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models[name] = cls(config).to(torch.float64).eval()
    return models


MODELS = tiny_models()
# LLaMA's eager attention takes its softmax (and so its backward) in float32 whatever the model's dtype,
# and a float32 row sum rounds differently over 30 columns than over 6: there the two agree to float32
# rounding, carried through two derivatives.
RTOL = {"llama": 1e-5}


def assert_near(ours: list[torch.Tensor], reference: list[torch.Tensor], rtol: float) -> None:
    """Each tensor within `rtol` of the whole reference in norm (elementwise ratios blow up near zero, and
    some blocks, like the attention key bias's, are zero but for rounding)."""
    scale = float(torch.linalg.norm(torch.cat([b.reshape(-1) for b in reference])))
    for a, b in zip(ours, reference, strict=True):
        assert float(torch.linalg.norm(a - b)) <= rtol * scale


@pytest.mark.parametrize("name", list(MODELS))
def test_bucketed_loss_is_the_padded_batch_loss(name):
    model, batch = MODELS[name], padded_batch(LENGTHS)
    buckets = LengthBuckets.of(batch, overhead_tokens=4)
    assert len(buckets.groups) > 1
    with torch.no_grad():
        bucketed, whole = float(buckets.loss(default_loss)(model, batch)), float(default_loss(model, batch))
    assert bucketed == pytest.approx(whole, rel=RTOL.get(name, 1e-12))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_unpadded_products_and_gradient_are_the_padded_ones(name, method):
    model, batch = MODELS[name], padded_batch(SKEWED, seed=1)
    weights = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    padded = HVP.build(model, batch, weights, method=method, sparse_embeddings=True)
    unpadded = HVP.build(model, batch, weights, method=method, sparse_embeddings=True, unpad=True)
    assert unpadded.buckets is not None and padded.buckets is None
    rtol = RTOL.get(name, 1e-9)
    assert unpadded.loss == pytest.approx(padded.loss, rel=rtol)
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(s, generator=g, dtype=torch.float64) for s in padded.shapes]
    assert_near(unpadded(v), padded(v), rtol)
    assert_near(unpadded.gradient(), padded.gradient(), rtol)
    assert_near(unpadded.restricted([1, 2], v[1:3]), padded.restricted([1, 2], v[1:3]), rtol)


def test_unpadded_regression_products_are_the_padded_ones():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=1, initializer_range=0.2, attn_implementation="eager",
        )).to(torch.float64).eval()
    batch = padded_batch(SKEWED, regression=True)
    padded, unpadded = HVP.build(model, batch, model.bert), HVP.build(model, batch, model.bert, unpad=True)
    assert unpadded.buckets is not None
    v = [torch.randn(s, generator=torch.Generator().manual_seed(3), dtype=torch.float64) for s in padded.shapes]
    assert_near(unpadded(v), padded(v), 1e-9)


def test_unpad_with_a_custom_loss_is_a_named_error():
    model = MODELS["bert"]
    with pytest.raises(ConfigError, match="unpad"):
        HVP.build(model, padded_batch(LENGTHS), model.classifier, loss_fn=default_loss, unpad=True)
