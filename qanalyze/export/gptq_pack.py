"""The GPTQ packed layout (AutoGPTQ, GPTQModel, vLLM, transformers): integer codes in int32 words.

Along the packed axis every 32 codes fill exactly ``bits`` words as one little-endian bit stream: code ``i``
occupies stream bits ``[i * bits, (i + 1) * bits)``, stream bit ``j`` is bit ``j % 32`` of word ``j // 32``.
For 2, 4 and 8 bits that is ``32 / bits`` codes per word, code ``k`` at bit ``k * bits``; 3-bit codes straddle
words (codes 10 and 21 of each 32 cross a boundary), GPTQ's own 3-bit layout.

- ``qweight`` ``(in * bits / 32, out)``: the unsigned codes ``(in, out)``, packed along the input columns;
- ``qzeros`` ``(groups, out * bits / 32)``: the zero points ``(groups, out)``, packed along the output rows.
  The original format (``checkpoint_format: "gptq"``, v1) stores ``z − 1`` and loaders add 1 back, so a
  zero point of 0 does not fit it; ``gptq_v2`` stores ``z``;
- ``scales`` ``(groups, out)`` float16; ``g_idx`` ``(in,)`` int32, the group of each input column.

A loader computes ``W[:, i] = scales[g_idx[i]] · (q[i] − z[g_idx[i]])``.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 32
"""Bits of one packed word (``pack_dtype: int32``)."""


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``codes`` ``(n, m)`` (``n`` a multiple of 32) along axis 0 into int32 ``(n * bits / 32, m)``."""
    rows, columns = codes.shape
    if rows % WORD_BITS:
        raise ValueError(f"GPTQ packs codes 32 at a time; {rows} is not a multiple of 32")
    blocks = codes.reshape(rows // WORD_BITS, WORD_BITS, columns).astype(np.uint64)
    words = np.zeros((rows // WORD_BITS, bits, columns), dtype=np.uint64)
    for k in range(WORD_BITS):
        start = k * bits
        word, offset = divmod(start, WORD_BITS)
        words[:, word] |= (blocks[:, k] << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        if offset + bits > WORD_BITS:  # the high bits spill into the next word (3-bit codes 10 and 21)
            words[:, word + 1] |= blocks[:, k] >> np.uint64(WORD_BITS - offset)
    return words.astype(np.uint32).view(np.int32).reshape(rows // WORD_BITS * bits, columns)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack_rows`: int32 ``(n * bits / 32, m)`` -> unsigned codes ``(n, m)`` (int64)."""
    count, columns = words.shape
    blocks = words.view(np.uint32).astype(np.uint64).reshape(count // bits, bits, columns)
    codes = np.zeros((count // bits, WORD_BITS, columns), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for k in range(WORD_BITS):
        word, offset = divmod(k * bits, WORD_BITS)
        value = blocks[:, word] >> np.uint64(offset)
        if offset + bits > WORD_BITS:
            value |= blocks[:, word + 1] << np.uint64(WORD_BITS - offset)
        codes[:, k] = value & mask
    return codes.reshape(count // bits * WORD_BITS, columns).astype(np.int64)


def group_index(columns: int, group_size: int | None) -> np.ndarray:
    """``g_idx``: the group of each input column (all 0 per row), int32."""
    return (np.arange(columns) // (group_size or columns)).astype(np.int32)
