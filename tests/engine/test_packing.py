"""Dense bit packing of integer codes and the safetensors file that stores them."""

from __future__ import annotations

import math
import time

import pytest
import safetensors.torch
import torch

from qanalyze.engine import packing
from qanalyze.engine.packing import (
    METADATA_KEY,
    PackedTensor,
    code_range,
    load_packed,
    pack_bits,
    packed_nbytes,
    save_packed,
    unpack_bits,
)
from qanalyze.errors import ConfigError, RecordError

ALL_BITS = range(2, 17)


def _reference_pack(values: list[int], bits: int, signed: bool) -> bytes:
    # The format's definition, one bit at a time: code i fills stream bits [i*bits, (i+1)*bits),
    # least significant first; stream bit j is bit j % 8 of byte j // 8.
    offset = 1 << (bits - 1) if signed else 0
    out = bytearray(math.ceil(bits * len(values) / 8))
    for i, v in enumerate(values):
        for b in range(bits):
            if (v + offset) >> b & 1:
                j = i * bits + b
                out[j // 8] |= 1 << (j % 8)
    return bytes(out)


def _random_codes(bits: int, signed: bool, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    lo, hi = code_range(bits, signed=signed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64)
    flat = q.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = lo, hi  # the extremes of the range are always present
    return q


def test_known_4bit_example_pins_the_bit_order():
    # Offsets [0, 15, 8, 9]; the first code goes in the low nibble: 0x0 | 0xF << 4, 0x8 | 0x9 << 4.
    packed = pack_bits(torch.tensor([-8, 7, 0, 1], dtype=torch.int8), 4)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0xF0, 0x98]
    # 3-bit codes straddle bytes: 5 | 3 << 3 | 6 << 6 = 0b10_011_101, then the top bit of 6.
    assert pack_bits(torch.tensor([5, 3, 6]), 3, signed=False).tolist() == [0b10011101, 0b1]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_round_trip_is_exact_and_dense_for_every_width(bits, signed):
    for seed, shape in enumerate([(1,), (7,), (13, 5), (3, 4, 11)]):
        q = _random_codes(bits, signed, shape, seed=100 * bits + seed)
        packed = pack_bits(q, bits, signed=signed)
        assert packed.shape == (packed_nbytes(bits, q.numel()),) == (math.ceil(bits * q.numel() / 8),)
        assert bytes(packed.tolist()) == _reference_pack(q.view(-1).tolist(), bits, signed)
        back = unpack_bits(packed, bits, shape, signed=signed)
        assert back.shape == shape and torch.equal(back, q)
        expected = torch.int8 if (bits if signed else bits + 1) <= 8 else torch.int16
        assert back.dtype == (torch.int32 if (bits, signed) == (16, False) else expected)


def test_whole_range_round_trips_in_one_tensor():
    for bits in (2, 7, 8, 9, 16):
        for signed in (True, False):
            lo, hi = code_range(bits, signed=signed)
            q = torch.arange(lo, hi + 1)
            assert torch.equal(unpack_bits(pack_bits(q, bits, signed=signed), bits, q.shape, signed=signed), q)


@pytest.mark.parametrize("bits", [3, 8, 13])
def test_chunk_boundaries_line_up(bits, monkeypatch):
    # A tiny chunk makes every tensor span many chunks, including a short last one.
    q = _random_codes(bits, True, (123,), seed=bits)
    whole = pack_bits(q, bits)
    monkeypatch.setattr(packing, "_CHUNK", 16)
    assert torch.equal(pack_bits(q, bits), whole)
    assert torch.equal(unpack_bits(whole, bits, q.shape), q)


def test_a_layer_sized_weight_packs_fast():
    q = _random_codes(3, True, (1536, 384), seed=5)
    timings = []
    # Best of three: the check is about the method's cost, not about a busy machine's worst moment.
    for _ in range(3):
        start = time.perf_counter()
        packed = pack_bits(q, 3)
        back = unpack_bits(packed, 3, q.shape)
        timings.append(time.perf_counter() - start)
    assert packed.numel() == 3 * q.numel() // 8 and torch.equal(back, q)
    assert min(timings) < 1.0, f"packing and unpacking a 1536x384 3-bit weight took {min(timings):.2f} s"


def test_input_dtypes_and_layout_do_not_matter():
    q = _random_codes(5, True, (6, 9), seed=3)
    reference = pack_bits(q, 5)
    for dtype in (torch.int8, torch.int16, torch.int32):
        assert torch.equal(pack_bits(q.to(dtype), 5), reference)
    assert torch.equal(pack_bits(q.t().contiguous().t(), 5), reference)  # non-contiguous, same values
    unsigned = _random_codes(8, False, (10,), seed=4)
    assert torch.equal(pack_bits(unsigned.to(torch.uint8), 8, signed=False), pack_bits(unsigned, 8, signed=False))
    assert pack_bits(torch.zeros(0, 4, dtype=torch.int8), 3).numel() == 0


def test_out_of_range_codes_and_bad_bits_are_refused():
    with pytest.raises(ConfigError, match=r"\[-4, 3\]"):
        pack_bits(torch.tensor([0, 4]), 3)
    with pytest.raises(ConfigError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([-1, 0]), 3, signed=False)
    for bits in (1, 17, 0, True, 4.0):
        with pytest.raises(ConfigError, match="bits"):
            pack_bits(torch.tensor([0]), bits)
        with pytest.raises(ConfigError, match="bits"):
            packed_nbytes(bits, 4)
    with pytest.raises(ConfigError, match="integer tensor"):
        pack_bits(torch.tensor([0.0]), 4)
    with pytest.raises(ConfigError, match="shape"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, (-1,))


def test_packed_length_not_matching_the_shape_is_a_record_error():
    packed = pack_bits(torch.arange(-4, 4), 3)  # 8 codes -> 3 bytes
    with pytest.raises(RecordError, match="3 bytes"):
        unpack_bits(packed, 3, (9,))
    with pytest.raises(RecordError, match="uint8"):
        unpack_bits(packed.to(torch.int16), 3, (8,))
    with pytest.raises(RecordError, match="padding"):
        unpack_bits(torch.tensor([0xFF], dtype=torch.uint8), 3, (2,))


def _layer(seed: int, shape: tuple[int, int] = (8, 12), bits: int = 3) -> PackedTensor:
    g = torch.Generator().manual_seed(seed)
    q = _random_codes(bits, True, shape, seed=seed)
    scale = (torch.rand(shape[0], 1, generator=g) * 0.1 + 1e-3).to(torch.float16).to(torch.float32)
    return PackedTensor(q=q, scale=scale, bits=bits, meta={"group": shape[1], "scheme": "symmetric"})


def test_save_load_round_trip_keeps_codes_scales_meta_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(9)
    tensors = {
        "encoder.w": _layer(1),
        "encoder.v": PackedTensor(
            q=_random_codes(11, False, (5, 3), seed=2),
            scale=torch.tensor(0.5, dtype=torch.float16),
            bits=11,
            signed=False,
        ),
        "encoder.bias": torch.randn(8, generator=g),
        "embeddings": torch.randn(4, 6, generator=g, dtype=torch.float64),
    }
    path = tmp_path / "sub" / "model.safetensors"
    save_packed(path, tensors, metadata={"plan": "abc123", "mode": "int"})
    loaded, metadata = load_packed(path)

    assert metadata == {"plan": "abc123", "mode": "int"}
    assert set(loaded) == set(tensors)
    for name in ("encoder.w", "encoder.v"):
        want, got = tensors[name], loaded[name]
        assert isinstance(got, PackedTensor)
        assert torch.equal(got.q, want.q) and got.q.shape == want.q.shape
        assert got.scale.dtype == torch.float32 and torch.equal(got.scale, want.scale.to(torch.float32))
        assert (got.bits, got.signed, got.meta) == (want.bits, want.signed, want.meta)
    for name in ("encoder.bias", "embeddings"):
        assert loaded[name].dtype == tensors[name].dtype and torch.equal(loaded[name], tensors[name])
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]  # no .tmp left behind

    raw = safetensors.torch.load_file(str(path))
    assert raw["encoder.w.packed"].dtype == torch.uint8 and raw["encoder.w.scale"].dtype == torch.float16


def test_file_size_matches_the_predicted_size(tmp_path):
    layer = _layer(2, shape=(384, 384), bits=3)
    bias = torch.zeros(384)
    path = tmp_path / "layer.safetensors"
    save_packed(path, {"layer.weight": layer, "layer.bias": bias}, metadata={"plan": "p"})
    predicted = 3 * 384 * 384 / 8 + 2 * 384 + 4 * 384
    assert abs(path.stat().st_size - predicted) / predicted < 0.01


def test_scales_float16_cannot_hold_are_refused(tmp_path):
    q = torch.zeros(2, 3, dtype=torch.int8)
    for bad in (torch.tensor([0.1, 0.2]), torch.tensor([1e5, 1.0]), torch.tensor([float("nan"), 1.0])):
        with pytest.raises(ConfigError, match="float16"):
            PackedTensor(q=q, scale=bad, bits=4)
    ok = PackedTensor(q=q, scale=torch.tensor([0.5, 0.25]), bits=4)
    ok.scale[0] = 0.1  # changed in place after construction: caught when saving
    with pytest.raises(ConfigError, match="float16"):
        save_packed(tmp_path / "m.safetensors", {"w": ok})
    assert list(tmp_path.iterdir()) == []


def test_invalid_packed_tensors_and_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\[-4, 3\]"):
        PackedTensor(q=torch.tensor([4]), scale=torch.tensor(1.0), bits=3)
    with pytest.raises(ConfigError, match="meta"):
        PackedTensor(q=torch.tensor([1]), scale=torch.tensor(1.0), bits=3, meta={"group": 1.5})
    with pytest.raises(ConfigError, match="used twice"):
        save_packed(tmp_path / "m.safetensors", {"w": _layer(1), "w.scale": torch.zeros(1)})
    with pytest.raises(ConfigError, match="reserved"):
        save_packed(tmp_path / "m.safetensors", {"w": _layer(1)}, metadata={METADATA_KEY: "x"})
    with pytest.raises(ConfigError, match="strings"):
        save_packed(tmp_path / "m.safetensors", {"w": _layer(1)}, metadata={"epochs": 3})
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_foreign_files_are_record_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(path, {"w": _layer(3), "b": torch.zeros(8)})
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()

    shortened = dict(tensors, **{"w.packed": tensors["w.packed"][:-1].clone()})
    safetensors.torch.save_file(shortened, str(tmp_path / "short.safetensors"), metadata=metadata)
    with pytest.raises(RecordError, match="'w'"):
        load_packed(tmp_path / "short.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(RecordError, match=r"truncated\.safetensors"):
        load_packed(truncated)

    safetensors.torch.save_file(tensors, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(RecordError, match="not a qanalyze packed file"):
        load_packed(tmp_path / "foreign.safetensors")

    missing = {k: v for k, v in tensors.items() if k != "w.scale"}
    safetensors.torch.save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(RecordError, match=r"w\.scale"):
        load_packed(tmp_path / "missing.safetensors")

    with pytest.raises(RecordError, match="not found"):
        load_packed(tmp_path / "absent.safetensors")
