"""Evaluation of causal language models on token windows: perplexity, and KL divergence and top-1
agreement against a reference model (the unquantized one) on the same windows."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qanalyze.errors import ModelFormatError
from qanalyze.lm_data import Windows, window_batches
from qanalyze.metrics import next_token_kl, next_token_nll, perplexity, top1_agreement
from qanalyze.models import check_max_length, is_causal_lm

# One batch's logits are windows x L x vocabulary floats (100 MB per 512-token window of a 49k
# vocabulary), so batches are cut to this many logit bytes whatever the batch size asked: the
# windows are scored independently, so only memory changes.
_LOGIT_BYTES = 256 << 20


@dataclass(frozen=True)
class LMComparison:
    """A model against a reference on the same windows: mean KL(p_ref ‖ p) in nats and the top-1
    agreement rate over ``tokens`` predicted positions, and the model's own mean NLL on them (from the
    same logits, so perplexity and KL cost one pass of each model)."""

    kl: float
    top1_agreement: float
    tokens: int
    seconds: float
    nll: float = float("nan")

    @property
    def perplexity(self) -> float:
        """The model's perplexity on the windows: ``exp(nll)``."""
        return math.exp(self.nll)

    def to_dict(self) -> dict[str, float]:
        """Flat form for records: ``kl`` and ``top1_agreement``."""
        return {"kl": self.kl, "top1_agreement": self.top1_agreement}


def check_lm(model: torch.nn.Module, windows: Windows) -> None:
    """ModelFormatError unless ``model`` is a causal LM with its head; ConfigError when the windows are
    longer than its context (``--seq-len`` with the limit)."""
    if not is_causal_lm(model):
        architectures = getattr(getattr(model, "config", None), "architectures", None) or []
        what = type(model).__name__
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            what += " with a sequence-classification head"
        raise ModelFormatError(f"task lm needs a causal language model with its LM head; this model is a {what}")
    check_max_length(model, windows.seq_len, flag="--seq-len")


def _batch_size(model: torch.nn.Module, windows: Windows, asked: int) -> int:
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, min(asked, _LOGIT_BYTES // (4 * windows.seq_len * vocab)))


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logits(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    device = next(model.parameters()).device
    for batch in batches:
        # entered and left per batch: a grad mode held across the yield would stay on in the caller, and
        # for good if the caller stops iterating early
        with torch.inference_mode():
            logits = model(input_ids=batch.to(device)).logits
        yield logits


def evaluate_lm(model: torch.nn.Module, windows: Windows, *, batch_size: int = 8) -> tuple[float, float, float]:
    """Perplexity of ``model`` on ``windows``, with the mean NLL and the seconds it took.

    The NLL of every predicted token (positions 1..L-1 of each window) is summed in float64 and
    divided by their count: the token-weighted mean of ``model(input_ids=w, labels=w).loss``.
    """
    start = time.perf_counter()
    check_lm(model, windows)
    batches = window_batches(windows, _batch_size(model, windows, batch_size))
    total = 0.0
    with _eval_mode(model):
        for batch, logits in zip(batches, _logits(model, batches)):
            total += float(next_token_nll(logits, batch.to(logits.device)).double().sum())
    tokens = windows.predicted_tokens
    return perplexity(total, tokens), total / tokens, time.perf_counter() - start


def reference_logits(model: torch.nn.Module, windows: Windows, *, batch_size: int = 8) -> list[torch.Tensor]:
    """The reference model's logits of every scored position, one (L-1, vocab) float32 CPU tensor per
    window, for `compare_lm` (4·(L-1)·vocab bytes a window: 100 MB for SmolLM2 at 512 tokens)."""
    check_lm(model, windows)
    batches = window_batches(windows, _batch_size(model, windows, batch_size))
    with _eval_mode(model):
        return [row[:-1].float().cpu() for logits in _logits(model, batches) for row in logits]


def compare_lm(model: torch.nn.Module, windows: Windows, reference: torch.nn.Module | Sequence[torch.Tensor], *,
               batch_size: int = 8) -> LMComparison:
    """Mean KL(p_ref ‖ p_model) of the next-token distributions and top-1 agreement over the scored
    positions of ``windows``; ``reference`` is the reference model (run batch by batch beside
    ``model``, nothing kept) or its logits from `reference_logits`."""
    start = time.perf_counter()
    check_lm(model, windows)
    batches = window_batches(windows, _batch_size(model, windows, batch_size))
    if isinstance(reference, torch.nn.Module):
        check_lm(reference, windows)
        ref_batches: Iterator[torch.Tensor] = (logits[:, :-1] for logits in _logits(reference, batches))
    else:
        if len(reference) != len(windows):
            raise ValueError(f"{len(reference)} reference logits for {len(windows)} windows")
        sizes = [len(batch) for batch in batches]
        ref_batches = iter(torch.stack(list(part)) for part in _split(reference, sizes))
    kl_sum, nll_sum, agree = 0.0, 0.0, 0
    reference_model = reference if isinstance(reference, torch.nn.Module) else model
    with _eval_mode(model), _eval_mode(reference_model):
        for batch, logits, ref in zip(batches, _logits(model, batches), ref_batches):
            ref = ref.to(logits.device)
            kl_sum += float(next_token_kl(ref, logits[:, :-1]).double().sum())
            nll_sum += float(next_token_nll(logits, batch.to(logits.device)).double().sum())
            agree += int(top1_agreement(ref, logits[:, :-1]).sum())
    tokens = windows.predicted_tokens
    return LMComparison(kl=kl_sum / tokens, top1_agreement=agree / tokens, tokens=tokens,
                        seconds=time.perf_counter() - start, nll=nll_sum / tokens)


def _split(items: Sequence[torch.Tensor], sizes: Sequence[int]) -> Iterator[Sequence[torch.Tensor]]:
    start = 0
    for size in sizes:
        yield items[start : start + size]
        start += size
