"""llama.cpp's block bytes of a `GGMLQuantized` weight, for a GGUF file.

`pack_ggml` gives the ``uint8`` array ``(out, in / row_multiple * block_bytes)`` that ``gguf.GGUFWriter.add_tensor(
name, array, raw_dtype=GGMLQuantizationType.X)`` stores, for every type of `qanalyze.quant.ggml.GGML_TYPES`. Its
blocks dequantize (llama.cpp, ``gguf.quants.dequantize``) to exactly ``GGMLQuantized.dequantize()``: every code is
stored as it is, and every scale and bias is stored as the float16 (legacy types) or the float16 super-block
``d``/``dmin`` times the small integer sub-block scale (k-quants) it already is.

A k-quant's values hold only the products ``scale = d * sc`` and ``bias = -(dmin * m)``, so the packer recovers
``d`` and ``sc``: all sub-block scales of a super-block share ``d``, so the largest in magnitude is ``d`` times
the largest integer; the search tries each integer for it (the largest level first, which is what
`qanalyze.quant.ggml` gives) and keeps the first float16 ``d`` whose integer multiples reproduce every scale of
the super-block bit for bit. Values no (float16, integer) pair reproduces, codes outside the type's range, and
legacy scales that are not float16 raise ValueError: those blocks are not llama.cpp's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qanalyze.quant.ggml import GGMLQuantized

Packer = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], list[np.ndarray]]
"""``codes (n, row_multiple) int, scale and bias (n, scales per block) float32 -> byte fields of the blocks``."""


def _f16(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` (float32) as float16 bytes ``(n, 2 * k)``; ValueError when float16 does not hold them."""
    half = values.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), values):
        raise ValueError(f"{what} is not a float16 value, which the block stores")
    return np.ascontiguousarray(half).view(np.uint8).reshape(values.shape[0], -1)


def _unsigned(codes: np.ndarray, offset: int, bits: int, what: str) -> np.ndarray:
    """``codes + offset`` as uint8, checked to lie in ``0 .. 2**bits - 1``."""
    shifted = codes.astype(np.int32) + offset
    if shifted.min() < 0 or shifted.max() >= 1 << bits:
        raise ValueError(f"{what} codes {int(codes.min())}..{int(codes.max())} are outside the type's "
                         f"{-offset}..{(1 << bits) - 1 - offset}")
    return shifted.astype(np.uint8)


def _pairs(values: np.ndarray, groups: int, width: int) -> np.ndarray:
    """Nibbles ``values (n, groups * 2 * width)``: byte ``j`` of group ``g`` holds element ``j`` of the group's first
    half low and element ``j`` of its second half high."""
    parts = values.reshape(values.shape[0], groups, 2, width)
    return (parts[:, :, 0] | (parts[:, :, 1] << 4)).reshape(values.shape[0], -1)


def _planes(values: np.ndarray, groups: int, planes: int, width: int, bits: int) -> np.ndarray:
    """``bits``-wide fields: byte ``j`` of group ``g`` holds element ``p * width + j`` of the group at bit
    ``p * bits``, for ``planes`` planes."""
    parts = values.reshape(values.shape[0], groups, planes, width).astype(np.uint8)
    packed = np.zeros((values.shape[0], groups, width), dtype=np.uint8)
    for plane in range(planes):
        packed |= parts[:, :, plane] << (plane * bits)
    return packed.reshape(values.shape[0], -1)


def split_scale(values: np.ndarray, low: int, high: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``values (n, k)`` (float32) as ``d * q``: float16 ``d`` per row ``(n, 1)`` and integers ``q`` in
    ``low .. high`` ``(n, k)`` with ``d * q`` (float32) equal to ``values`` bit for bit; ValueError otherwise."""
    d = np.zeros((values.shape[0], 1), dtype=np.float32)
    q = np.zeros(values.shape, dtype=np.int32)
    top = np.take_along_axis(values, np.abs(values).argmax(axis=1)[:, None], axis=1)
    open_rows = (top != 0).ravel()
    for level in sorted({v for m in range(max(-low, high), 0, -1) for v in (-m, m) if low <= v <= high},
                        key=lambda v: (-abs(v), v)):
        if not open_rows.any():
            break
        rows = np.flatnonzero(open_rows)
        candidate = (top[rows] / np.float32(level)).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            found = np.rint(values[rows] / candidate)
        ok = np.isfinite(found).all(axis=1) & (found >= low).all(axis=1) & (found <= high).all(axis=1)
        ok &= (candidate * np.where(np.isfinite(found), found, 0).astype(np.float32) == values[rows]).all(axis=1)
        d[rows[ok]], q[rows[ok]] = candidate[ok], found[ok].astype(np.int32)
        open_rows[rows[ok]] = False
    if open_rows.any():
        row = int(np.flatnonzero(open_rows)[0])
        raise ValueError(f"{what} of super-block {row} ({values[row].tolist()[:4]}...) are not a float16 times "
                         f"integers {low}..{high}, as the type stores them")
    return d, q


def _legacy(bits: int, offset: int) -> Packer:
    """Q4_0, Q4_1, Q5_0, Q5_1: ``d`` (and ``m``), the 5th bits of the 5-bit types, then the low nibbles."""

    def pack(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
        u = _unsigned(codes, offset, bits, f"Q{bits}")
        fields = [_f16(scale, "the scale")] + ([] if bias is None else [_f16(bias, "the minimum")])
        if bits == 5:
            fields.append(np.packbits((u >> 4) & 1, axis=1, bitorder="little"))
        return [*fields, _pairs(u & 0xF, 1, 16)]

    return pack


def _q8_0(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
    return [_f16(scale, "the scale"), _unsigned(codes, 128, 8, "Q8_0") ^ np.uint8(0x80)]


def _k_scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and minima: the low 6 bits of the first four of each in bytes
    0..7 (their top 2 bits holding the last four's high bits), the last four's low nibbles in bytes 8..11."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return np.concatenate([first, second, third], axis=1)


def _k_asymmetric(bits: int, scale_bits: int) -> Packer:
    """Q2_K (2, 4-bit scales: 16 blocks of 16), Q4_K and Q5_K (4 and 5, 6-bit scales: 8 blocks of 32)."""
    levels = (1 << scale_bits) - 1

    def pack(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
        assert bias is not None
        u = _unsigned(codes, 0, bits, f"Q{bits}_K")
        d, sc = split_scale(scale, 0, levels, f"Q{bits}_K scales")
        dmin, m = split_scale(-bias, 0, levels, f"Q{bits}_K minima")
        supers = [_f16(d, "d"), _f16(dmin, "dmin")]
        if bits == 2:
            return [(sc | (m << 4)).astype(np.uint8), _planes(u, 2, 4, 32, 2), *supers]
        fields = [*supers, _k_scales_6bit(sc, m)]
        if bits == 5:
            fields.append(_planes(u >> 4, 1, 8, 32, 1))
        return [*fields, _pairs(u & 0xF, 4, 32)]

    return pack


def _q3_k(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
    u = _unsigned(codes, 4, 3, "Q3_K")
    d, sc = split_scale(scale, -32, 31, "Q3_K scales")
    us = (sc + 32).astype(np.uint8)
    low = (us[:, :8] & 0xF) | ((us[:, 8:] & 0xF) << 4)
    high = _planes(us >> 4, 1, 4, 4, 2)
    # llama.cpp's high bit is set for the non-negative codes (0..3) and clear for -4..-1: that is u >> 2
    return [_planes(u >> 2, 1, 8, 32, 1), _planes(u & 3, 2, 4, 32, 2), low, high, _f16(d, "d")]


def _q6_k(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
    u = _unsigned(codes, 32, 6, "Q6_K")
    d, sc = split_scale(scale, -128, 127, "Q6_K scales")
    return [_pairs(u & 0xF, 2, 64), _planes(u >> 4, 2, 4, 32, 2), sc.astype(np.int8).view(np.uint8), _f16(d, "d")]


PACKERS: dict[str, Packer] = {
    "Q2_K": _k_asymmetric(2, 4), "Q3_K": _q3_k, "Q4_0": _legacy(4, 8), "Q4_1": _legacy(4, 0),
    "Q4_K": _k_asymmetric(4, 6), "Q5_0": _legacy(5, 16), "Q5_1": _legacy(5, 0), "Q5_K": _k_asymmetric(5, 6),
    "Q6_K": _q6_k, "Q8_0": _q8_0,
}
"""The block packer of every GGML type, by name."""


def pack_ggml(quantized: GGMLQuantized) -> np.ndarray:
    """The weight's llama.cpp blocks, ``uint8`` ``(out, in / row_multiple * block_bytes)`` in row order (the
    shape ``gguf`` expects with ``raw_dtype``); ValueError when a code, scale or bias is not what the type
    stores."""
    kind = quantized.type
    out_features, in_features = quantized.codes.shape
    count = out_features * in_features // kind.row_multiple
    codes = quantized.codes.detach().cpu().numpy().reshape(count, kind.row_multiple)
    scale = quantized.scale.detach().cpu().float().numpy().reshape(count, -1)
    bias = None if quantized.bias is None else quantized.bias.detach().cpu().float().numpy().reshape(count, -1)
    fields = PACKERS[kind.name](codes, scale, bias)
    blocks = np.concatenate([np.ascontiguousarray(field, dtype=np.uint8) for field in fields], axis=1)
    if blocks.shape[1] != kind.block_bytes:
        raise ValueError(f"{kind.name} blocks of {blocks.shape[1]} bytes, not {kind.block_bytes}")
    return blocks.reshape(out_features, -1)
