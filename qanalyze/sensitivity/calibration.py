"""Calibration batches of an analysis, by task kind (`CALIBRATION`).

Classification and regression: ``batches`` batches of ``batch_size`` training examples drawn by seed,
padded per batch, with their labels. Language modelling (``lm``): ``batches x batch_size`` token windows of
the training text drawn by seed, each window its own batch with itself as labels, so ``model(**batch).loss``
is the task's next-token cross-entropy over positions 1..L-1 (the loss its perplexity averages). A 512-token
window of a decoder is already a batch's worth of rows: every pass and Hessian product runs on one window,
which bounds memory by one window's activations (SmolLM2-135M: well under 8 GiB for 512 tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from qanalyze.data import TaskData, collate, encode
from qanalyze.errors import ConfigError

if TYPE_CHECKING:
    from qanalyze.sensitivity.analyze import AnalyzeConfig

Batch = dict[str, torch.Tensor]


def _draw(available: int, needed: int, seed: int) -> list[int]:
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:needed].tolist()


def example_batches(data: TaskData, tokenizer: Any, config: AnalyzeConfig) -> list[Batch]:
    """``config.batches`` batches of ``config.batch_size`` training examples, drawn by seed."""
    needed = config.batches * config.batch_size
    if len(data.train) < needed:
        raise ConfigError(f"--batches {config.batches} x --batch-size {config.batch_size} needs {needed} training "
                          f"examples; the data has {len(data.train)} (raise --max-train-examples or lower them)")
    order = _draw(len(data.train), needed, config.seed)
    encoded = encode([data.train[i] for i in order], tokenizer, max_length=config.max_length)
    return [collate(encoded, range(i * config.batch_size, (i + 1) * config.batch_size), tokenizer)
            for i in range(config.batches)]


def window_batches(data: TaskData, tokenizer: Any, config: AnalyzeConfig) -> list[Batch]:
    """``config.batches x config.batch_size`` windows of the training text, drawn by seed and kept in text
    order, one batch each: ``{"input_ids": (1, L), "labels": (1, L)}``."""
    from qanalyze.lm_data import encode_text

    windows = encode_text(data.train, tokenizer)
    needed = config.batches * config.batch_size
    if len(windows) < needed:
        raise ConfigError(f"--batches {config.batches} x --batch-size {config.batch_size} needs {needed} windows of "
                          f"{windows.seq_len} tokens; {windows.where} gives {len(windows)} (raise "
                          "--max-train-windows or lower them)")
    chosen = sorted(_draw(len(windows), needed, config.seed))
    return [{"input_ids": windows.input_ids[i:i + 1], "labels": windows.input_ids[i:i + 1]} for i in chosen]


CALIBRATION: dict[str, Callable[[TaskData, Any, AnalyzeConfig], list[Batch]]] = {
    "classification": example_batches,
    "lm": window_batches,
}
"""Task kind (`TaskSpec.kind`, `LMTaskSpec.kind`) -> the calibration batches of an analysis."""


def calibration_batches(data: TaskData, tokenizer: Any, config: AnalyzeConfig) -> list[Batch]:
    """The calibration batches of ``data`` for ``config``, by the task's kind (`CALIBRATION`)."""
    kind = getattr(data.task, "kind", "classification")
    if kind not in CALIBRATION:
        raise ConfigError(f"analysis has no calibration batches for tasks of kind {kind!r}; known: "
                          f"{', '.join(CALIBRATION)}")
    return CALIBRATION[kind](data, tokenizer, config)
