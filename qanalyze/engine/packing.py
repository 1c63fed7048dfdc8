"""Integer weights packed densely to their bit-width, and the safetensors file that holds them.

A trained quantized model is saved as integer codes plus scales, and its size on disk must match
the plan's prediction (``bits * n / 8`` bytes per tensor), so every width in 2..16 is packed as one
continuous little-endian bit stream: element ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``,
least significant bit first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Signed codes
are stored offset by ``2**(bits - 1)`` (offset binary), so 4-bit ``[-8, 7, 0, 1]`` packs to the bytes
``0xF0, 0x98``. The final byte is padded with zero bits.

File layout (one safetensors file): a `PackedTensor` named ``NAME`` becomes ``NAME.packed`` (1-D
uint8) and ``NAME.scale`` (float16, the scale's own shape); a plain tensor is stored as given. The
metadata key ``qanalyze.packing`` holds compact JSON::

    {"schema": "qanalyze/packed/v1",
     "tensors": {"NAME": {"shape": [..], "bits": 3, "signed": true, "meta": {..}}, ...}}

beside the caller's own metadata, which must be strings (a safetensors rule).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import safetensors
import safetensors.torch
import torch

from qanalyze.errors import ConfigError, RecordError
from qanalyze.quant.primitives import check_bits
from qanalyze.records import atomic_path

PACKED_SCHEMA = "qanalyze/packed/v1"
METADATA_KEY = "qanalyze.packing"
PACKED_SUFFIX = ".packed"
SCALE_SUFFIX = ".scale"
MIN_BITS = 2
MAX_BITS = 16

# Codes per vectorised step: a multiple of 8, so every chunk ends on a byte boundary and chunks pack
# independently; it bounds the int32 working copies to a few MiB whatever the tensor size.
_CHUNK = 1 << 20

# uint64 codes above 2**63 would wrap when widened to int64 and could pass the range check as
# small negatives, so that dtype is refused rather than widened.
_INT_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32})


def code_range(bits: int, *, signed: bool = True) -> tuple[int, int]:
    """The inclusive range ``(lo, hi)`` of ``bits``-bit codes, signed or unsigned."""
    check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def packed_nbytes(bits: int, numel: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy when packed: ``ceil(bits * numel / 8)``."""
    check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ConfigError(f"numel must be a non-negative integer, got {numel!r}")
    return (bits * numel + 7) // 8


def _unpacked_dtype(bits: int, signed: bool) -> torch.dtype:
    # The smallest signed dtype that holds the range: int8 feeds torch._int_mm directly, and the
    # unsigned 8- and 16-bit ranges (up to 255 and 65535) need one size up.
    value_bits = bits if signed else bits + 1
    if value_bits <= 8:
        return torch.int8
    if value_bits <= 16:
        return torch.int16
    return torch.int32


def _check_codes(q: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Validate ``q`` against the range of ``bits``; return it flattened, in a dtype min/max work on."""
    if not isinstance(q, torch.Tensor) or q.dtype not in _INT_DTYPES:
        found = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise ConfigError(f"codes must be an integer tensor (int8..int64, uint8..uint32), got {found}")
    flat = q.detach().reshape(-1)
    if flat.dtype in (torch.uint16, torch.uint32):
        # min/max have no kernels for these dtypes; int64 holds every value exactly.
        flat = flat.to(torch.int64)
    lo, hi = code_range(bits, signed=signed)
    if flat.numel():
        found_lo, found_hi = (int(v) for v in torch.aminmax(flat))
        if found_lo < lo or found_hi > hi:
            kind = "signed" if signed else "unsigned"
            raise ConfigError(
                f"{bits}-bit {kind} codes must lie in [{lo}, {hi}]; found values in [{found_lo}, {found_hi}]"
            )
    return flat


def _pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative int32 codes below ``2**bits`` into ``ceil(bits * len(u) / 8)`` bytes."""
    n = u.numel()
    blocks = -(-n // 8)
    if blocks * 8 != n:
        u = torch.cat([u, u.new_zeros(blocks * 8 - n)])  # zero codes leave the padding bits zero
    u = u.view(blocks, 8)
    # Eight codes fill exactly `bits` bytes, and code k of every block starts at the same bit
    # (k * bits), so it touches the same <= 3 bytes of each block: 8 slots x <= 3 byte pieces of
    # whole-tensor operations, instead of one operation per bit of a bit stream (several times faster).
    out = torch.zeros(blocks, bits, dtype=torch.uint8)
    for k in range(8):
        byte, shift = divmod(k * bits, 8)
        value = u[:, k] << shift
        for j in range((bits + shift + 7) // 8):
            out[:, byte + j] |= ((value >> (8 * j)) & 0xFF).to(torch.uint8)
    return out.view(-1)[: packed_nbytes(bits, n)]


def _unpack_unsigned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `_pack_unsigned`: ``n`` int32 codes from ``ceil(bits * n / 8)`` bytes."""
    blocks = -(-n // 8)
    data = torch.zeros(blocks * bits, dtype=torch.int32)
    data[: packed.numel()] = packed
    data = data.view(blocks, bits)
    out = torch.empty(blocks, 8, dtype=torch.int32)
    mask = (1 << bits) - 1
    for k in range(8):
        byte, shift = divmod(k * bits, 8)
        value = data[:, byte].clone()
        for j in range(1, (bits + shift + 7) // 8):
            value |= data[:, byte + j] << (8 * j)
        out[:, k] = (value >> shift) & mask
    return out.view(-1)[:n]


def pack_bits(q: torch.Tensor, bits: int, *, signed: bool = True) -> torch.Tensor:
    """Pack integer codes densely into a 1-D uint8 tensor of ``ceil(bits * q.numel() / 8)`` bytes.

    ``q`` may have any shape (read in row-major order) and any integer dtype; its values must lie in
    ``[-(2**(bits-1)), 2**(bits-1) - 1]`` (``signed``) or ``[0, 2**bits - 1]``, else `ConfigError`.
    The bit order is described in the module docstring.
    """
    check_bits(bits)
    flat = _check_codes(q, bits, signed)
    n = flat.numel()
    out = torch.empty(packed_nbytes(bits, n), dtype=torch.uint8)
    offset = (1 << (bits - 1)) if signed else 0
    for start in range(0, n, _CHUNK):
        chunk = _pack_unsigned(flat[start : start + _CHUNK].to(torch.int32) + offset, bits)
        first = start * bits // 8
        out[first : first + chunk.numel()] = chunk
    return out


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ConfigError(f"shape must be a sequence of non-negative integers, got {shape!r}") from None
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ConfigError(f"shape must be a sequence of non-negative integers, got {shape!r}")
    return dims


def unpack_bits(packed: torch.Tensor, bits: int, shape: Sequence[int], *, signed: bool = True) -> torch.Tensor:
    """Inverse of `pack_bits`: the codes as a tensor of ``shape``.

    The dtype is the smallest signed one that holds the range: int8 for bits <= 8 (unsigned: <= 7),
    int16 up to 16 bits (unsigned: 15), int32 for unsigned 16 bits. A ``packed`` tensor that is not
    1-D uint8 of exactly ``ceil(bits * numel / 8)`` bytes with zero padding bits is a `RecordError`.
    """
    check_bits(bits)
    dims = _check_shape(shape)
    n = math.prod(dims)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        found = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise RecordError(f"packed data must be a 1-D uint8 tensor, got {found}")
    expected = packed_nbytes(bits, n)
    if packed.numel() != expected:
        raise RecordError(
            f"packed data has {packed.numel()} bytes; {n} codes of {bits} bits (shape {list(dims)}) need {expected}"
        )
    pad_bits = expected * 8 - bits * n
    if pad_bits and int(packed[-1]) >> (8 - pad_bits):
        # A dense writer always leaves the padding zero; set bits there mean the data is not ours.
        raise RecordError("packed data has non-zero padding bits in its last byte")
    out = torch.empty(n, dtype=_unpacked_dtype(bits, signed))
    offset = (1 << (bits - 1)) if signed else 0
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        first = start * bits // 8
        codes = _unpack_unsigned(packed[first : first + packed_nbytes(bits, count)], bits, count)
        out[start : start + count] = codes - offset
    return out.view(dims)


def _check_scale(scale: torch.Tensor, where: str) -> None:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        found = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ConfigError(f"{where}: scale must be a floating-point tensor, got {found}")
    # The engine rounds scales to float16 before quantizing; a scale that float16 cannot hold (or a
    # NaN) means the codes were made with a different scale than the file would record.
    if not torch.equal(scale.detach().to(torch.float16).to(scale.dtype), scale.detach()):
        raise ConfigError(f"{where}: scale is not exactly representable in float16 (round it before quantizing)")


@dataclass(frozen=True, eq=False)
class PackedTensor:
    """Integer codes with their scale, as stored in a packed file.

    ``q`` holds the codes (any integer dtype and shape, within the range of ``bits``/``signed``);
    ``scale`` is a floating-point tensor of any shape, stored as float16 and so required to be
    exactly representable there; ``meta`` is free per-tensor metadata for the engine (group size,
    scheme), string keys to string or integer values. Invalid fields are a `ConfigError`.
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    signed: bool = True
    meta: dict[str, str | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not isinstance(self.signed, bool):
            raise ConfigError(f"signed must be a bool, got {self.signed!r}")
        _check_codes(self.q, self.bits, self.signed)
        _check_scale(self.scale, "PackedTensor")
        if not isinstance(self.meta, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool) for k, v in self.meta.items()
        ):
            raise ConfigError(f"PackedTensor meta must map strings to strings or integers, got {self.meta!r}")
        # A private copy: the frozen record must not change when the caller's dict does.
        object.__setattr__(self, "meta", dict(self.meta))


def save_packed(
    path: str | os.PathLike[str],
    tensors: Mapping[str, PackedTensor | torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to one safetensors file at ``path``, atomically.

    Each `PackedTensor` ``NAME`` is stored as ``NAME.packed`` and ``NAME.scale``; plain tensors are
    stored as given. ``metadata`` (strings to strings) is kept beside the packing record, whose key
    ``qanalyze.packing`` it may not use. Name clashes and invalid values are a `ConfigError`.
    """
    user_meta = dict(metadata or {})
    if METADATA_KEY in user_meta:
        raise ConfigError(f"metadata key {METADATA_KEY!r} is reserved for the packing record")
    bad = [k for k, v in user_meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"safetensors metadata must map strings to strings; offending keys: {bad}")

    stored: dict[str, torch.Tensor] = {}
    record: dict[str, dict[str, Any]] = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in stored:
            raise ConfigError(f"tensor name {key!r} is used twice (a plain tensor clashes with a packed one's parts)")
        stored[key] = value

    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(value, PackedTensor):
            # Re-checked here: the dataclass is frozen but its tensors can still be changed in place.
            _check_scale(value.scale, name)
            put(name + PACKED_SUFFIX, pack_bits(value.q, value.bits, signed=value.signed))
            put(name + SCALE_SUFFIX, value.scale.detach().to(torch.float16).contiguous())
            record[name] = {
                "shape": list(value.q.shape),
                "bits": value.bits,
                "signed": value.signed,
                "meta": value.meta,
            }
        elif isinstance(value, torch.Tensor):
            # clone: safetensors refuses tensors that share memory (tied weights, views of one buffer).
            put(name, value.detach().contiguous().clone())
        else:
            raise ConfigError(f"{name}: expected a PackedTensor or a torch.Tensor, got {type(value).__name__}")

    # Compact JSON: the header counts toward the file size the plan predicts.
    packing = json.dumps({"schema": PACKED_SCHEMA, "tensors": record}, separators=(",", ":"))
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(stored, str(tmp), metadata={**user_meta, METADATA_KEY: packing})


def _read_record(raw: str | None, path: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        raise RecordError(f"{path} has no {METADATA_KEY!r} metadata: not a qanalyze packed file")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise RecordError(f"{path}: {METADATA_KEY!r} metadata is not valid JSON") from None
    if not isinstance(data, dict) or data.get("schema") != PACKED_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise RecordError(f"{path} has packing schema {found!r}, expected {PACKED_SCHEMA!r}")
    entries = data.get("tensors")
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise RecordError(f"{path}: packing record has no valid 'tensors' map")
    return entries


def _rebuild(name: str, entry: dict[str, Any], raw: dict[str, torch.Tensor], path: str) -> PackedTensor:
    where = f"{path}: packed tensor {name!r}"
    for suffix in (PACKED_SUFFIX, SCALE_SUFFIX):
        if name + suffix not in raw:
            raise RecordError(f"{where} lacks its {name + suffix!r} tensor")
    packed, scale = raw.pop(name + PACKED_SUFFIX), raw.pop(name + SCALE_SUFFIX)
    if scale.dtype != torch.float16:
        raise RecordError(f"{where} has a {scale.dtype} scale, expected float16")
    try:
        bits, signed, shape, meta = entry["bits"], entry["signed"], entry["shape"], entry.get("meta", {})
        q = unpack_bits(packed, bits, shape, signed=signed)
        return PackedTensor(q=q, scale=scale.to(torch.float32), bits=bits, signed=signed, meta=meta)
    except KeyError as exc:
        raise RecordError(f"{where}: packing record lacks {exc}") from None
    except (ConfigError, RecordError) as exc:
        raise RecordError(f"{where}: {exc}") from None


def load_packed(path: str | os.PathLike[str]) -> tuple[dict[str, PackedTensor | torch.Tensor], dict[str, str]]:
    """Read a file written by `save_packed`: ``(tensors, metadata)``.

    Packed tensors come back as `PackedTensor` with the same codes (in the compact dtype of
    `unpack_bits`) and the scale as float32; plain tensors as stored; ``metadata`` without the
    packing record. A missing, unreadable or inconsistent file is a `RecordError` naming it.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise RecordError(f"packed file not found: {where}")
    try:
        with safetensors.safe_open(where, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = f.keys()  # safe_open is not a Mapping: it has keys() but no iteration
            raw = {key: f.get_tensor(key) for key in names}
    except (safetensors.SafetensorError, OSError) as exc:
        raise RecordError(f"{where} is not a readable safetensors file ({exc})") from None
    entries = _read_record(metadata.pop(METADATA_KEY, None), where)
    out: dict[str, PackedTensor | torch.Tensor] = {}
    for name, entry in entries.items():
        out[name] = _rebuild(name, entry, raw, where)
    out.update(raw)  # what no packed entry claimed is a plain tensor
    return out, metadata
