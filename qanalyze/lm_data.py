"""Language-model text cut into token windows: the data a causal LM is scored and calibrated on.

A split's text is tokenized as a whole (no special tokens added, so the windows hold the text's own
tokens) and cut into non-overlapping windows of ``seq_len`` tokens; the last partial window is dropped.
A limit keeps a random subset of the windows, chosen by an explicit generator seeded with ``seed``
and kept in text order, the way `qanalyze.data` chooses example subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qanalyze.errors import ConfigError, DataError


@dataclass(frozen=True)
class LMText:
    """One split of language-model text and how it is cut: ``where`` names the file(s) or hub split
    for messages, ``seq_len`` the window length, ``limit`` the most windows kept (None: all), ``seed``
    the seed of that choice."""

    text: str
    where: str
    seq_len: int
    limit: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Windows:
    """Token windows of one split: ``input_ids`` is (windows, seq_len); ``text_tokens`` the token count of
    the whole text; ``indices`` the position of each kept window among all full windows."""

    input_ids: torch.Tensor
    text_tokens: int
    indices: tuple[int, ...]
    where: str

    def __len__(self) -> int:
        """Number of windows."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per window."""
        return int(self.input_ids.shape[1])

    @property
    def predicted_tokens(self) -> int:
        """Tokens whose next-token loss is scored: positions 1..L-1 of every window."""
        return len(self) * (self.seq_len - 1)


def check_seq_len(seq_len: Any) -> int:
    """``seq_len`` when it is a whole number of at least 2 (one token to predict from one before it)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be a whole number of at least 2, got {seq_len!r}")
    return seq_len


def tokenize_text(text: LMText, tokenizer: Any) -> list[int]:
    """The token ids of the whole text, without special tokens; DataError naming the source when empty."""
    if not text.text.strip():
        raise DataError(f"{text.where} holds no text (0 tokens)")
    # The whole text is one sequence far beyond the model's context; transformers' warning about that
    # length is about feeding it to a model at once, which windows never do.
    ids = tokenizer(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids)


def cut_windows(ids: list[int] | torch.Tensor, seq_len: int, *, limit: int | None = None, seed: int = 0,
                where: str = "text") -> Windows:
    """Non-overlapping windows of ``seq_len`` tokens of ``ids`` (the last partial one dropped), at most
    ``limit`` of them chosen by ``seed`` and kept in order. DataError when not one full window fits."""
    check_seq_len(seq_len)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"the window limit must be a whole number of at least 1, or None for all; got {limit!r}")
    tokens = torch.as_tensor(ids, dtype=torch.long).flatten()
    count = tokens.numel() // seq_len
    if count == 0:
        raise DataError(f"{where} has {tokens.numel()} tokens, fewer than one window of {seq_len} (--seq-len)")
    windows = tokens[: count * seq_len].view(count, seq_len)
    indices = torch.arange(count)
    if limit is not None and limit < count:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(count, generator=generator)[:limit].sort().values
        windows = windows[indices]
    return Windows(windows.clone(), int(tokens.numel()), tuple(indices.tolist()), where)


def encode_text(text: LMText, tokenizer: Any) -> Windows:
    """Tokenize ``text`` as a whole and cut it into its windows (see `cut_windows`)."""
    return cut_windows(tokenize_text(text, tokenizer), text.seq_len, limit=text.limit, seed=text.seed,
                       where=text.where)


def window_batches(windows: Windows, batch_size: int) -> list[torch.Tensor]:
    """``windows.input_ids`` in consecutive batches of at most ``batch_size`` windows."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
    return list(windows.input_ids.split(batch_size))
