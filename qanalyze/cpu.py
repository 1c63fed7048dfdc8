"""What the CPU's math libraries will run: oneDNN's instruction-set cap, read from the environment.

torch answers "does this CPU have AVX512-BF16 / VNNI?" from the CPU itself; oneDNN, which runs torch's
bfloat16 and int8 GEMMs, also obeys ``ONEDNN_MAX_CPU_ISA`` (older name ``DNNL_MAX_CPU_ISA``). Under a cap
(set, for one, to run as an AVX2-only machine would) the answers differ, and qanalyze must follow oneDNN.
"""

from __future__ import annotations

import os

ONEDNN_ISA_WITHOUT_BFLOAT16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
"""Caps below AVX512_CORE_BF16: under such a cap oneDNN emulates bfloat16 even on a CPU that has the units."""

ONEDNN_ISA_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})
"""Caps that leave oneDNN no VNNI or AMX instruction: its int8 GEMM then sums pairs of u8 x s8 products in
16-bit lanes (``vpmaddubsw``), which saturate, so ``torch._int_mm`` is no longer exact (measured: a
2048 x 384 x 1536 product with a cap of AVX2 on a VNNI CPU differed from int64 in most entries)."""


def onednn_isa_cap() -> str | None:
    """The instruction-set cap oneDNN was given through the environment (upper case), or None."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip().upper()
        if value:
            return value
    return None


def onednn_int8_is_exact() -> bool:
    """False where oneDNN is capped below VNNI: its int8 GEMM may saturate (see `ONEDNN_ISA_WITHOUT_VNNI`)."""
    return onednn_isa_cap() not in ONEDNN_ISA_WITHOUT_VNNI
