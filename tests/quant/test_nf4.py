"""NF4: the code book against QLoRA's published table, exact dequantization, double quantization, validation."""

import pytest
import torch

from qanalyze.errors import ConfigError, NonFiniteError
from qanalyze.quant.nf4 import (
    DOUBLE_QUANT_BLOCK,
    NF4_CODE_BOOK,
    ZERO_CODE,
    derive_nf4_code_book,
    nf4_bits_per_weight,
    nf4_code_book,
    nf4_dequantize,
    nf4_quantize,
)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sqnr_db(reference, approximation):
    return (10 * torch.log10(reference.square().sum() / (reference - approximation).square().sum())).item()


def test_derived_code_book_matches_the_published_table():
    derived = derive_nf4_code_book()
    table = nf4_code_book(torch.float64)
    assert derived.shape == table.shape == (16,)
    # bitsandbytes rounds the offset to 0.9677083 and computes in float32: the gap is below 2e-7
    assert (derived - table).abs().max().item() < 1e-6
    assert NF4_CODE_BOOK[0] == -1.0 and NF4_CODE_BOOK[-1] == 1.0 and NF4_CODE_BOOK[ZERO_CODE] == 0.0
    assert torch.all(table[1:] > table[:-1])
    # asymmetric: 8 positive values, 7 negative
    assert int((table > 0).sum()) == 8 and int((table < 0).sum()) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_value_is_its_code_times_its_block_absmax(dtype):
    w = _randn(8, 48, dtype=dtype)
    q = nf4_quantize(w, block_size=64)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15
    blocks = w.reshape(-1, 64)
    assert q.absmax.dtype == dtype and torch.equal(q.absmax, blocks.abs().amax(dim=1))
    expected = nf4_code_book(dtype)[q.codes.long()].reshape(-1, 64) * q.absmax.unsqueeze(1)
    assert torch.equal(nf4_dequantize(q), expected.reshape(w.shape))
    assert nf4_dequantize(q).dtype == dtype


def test_codes_are_the_nearest_code_book_entries():
    w = _randn(4, 64, seed=1, dtype=torch.float64)
    q = nf4_quantize(w, block_size=32)
    normalised = w.reshape(-1, 32) / q.absmax.unsqueeze(1)
    distances = (normalised.unsqueeze(-1) - nf4_code_book(torch.float64)).abs()
    chosen = distances.gather(-1, q.codes.long().reshape(-1, 32, 1)).squeeze(-1)
    assert torch.equal(chosen, distances.amin(-1))


def test_a_value_halfway_between_two_entries_takes_the_lower_code():
    book = nf4_code_book(torch.float64)
    midpoint = (book[9] + book[10]) / 2
    q = nf4_quantize(torch.tensor([1.0, midpoint, 0.0, 0.0], dtype=torch.float64), block_size=4)
    assert q.codes.tolist() == [15, 9, ZERO_CODE, ZERO_CODE]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_code_book_points_round_trip_exactly(dtype):
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (6, 64), generator=generator)
    codes[:, 0] = torch.tensor([0, 15, 0, 15, 0, 15])  # every block holds ±1, so its absmax is its scale
    scales = torch.rand(6, 1, generator=generator, dtype=dtype) * 3 + 0.1  # not powers of two
    w = nf4_code_book(dtype)[codes] * scales
    q = nf4_quantize(w, block_size=64)
    assert torch.equal(q.codes.long(), codes)
    assert torch.equal(nf4_dequantize(q), w)


def test_a_zero_block_stays_exactly_zero():
    w = torch.cat([torch.zeros(64), _randn(64)])
    q = nf4_quantize(w)
    assert q.absmax[0] == 0 and bool((q.codes[:64] == ZERO_CODE).all())
    assert bool((nf4_dequantize(q)[:64] == 0).all())


def test_input_is_not_modified():
    w = _randn(4, 64, seed=3)
    before = w.clone()
    nf4_quantize(w, double_quant=True)
    assert torch.equal(w, before)


def test_nf4_error_on_normal_weights():
    w = _randn(256, 256, seed=4)
    # 4-bit normal float on normal data: about 20.7 dB
    assert _sqnr_db(w, nf4_quantize(w).dequantize()) > 20


@pytest.mark.parametrize("blocks", [1024, 5 * 64 + 3])
def test_double_quantization_error_is_small(blocks):
    w = _randn(blocks, 64, seed=5)
    plain, double = nf4_quantize(w), nf4_quantize(w, double_quant=True)
    assert double.double_quant and not plain.double_quant and double.absmax is None
    assert torch.equal(double.codes, plain.codes)  # codes are chosen with the exact absmax, as in QLoRA
    assert double.absmax_codes.dtype == torch.int8 and double.absmax_codes.shape == (blocks,)
    assert double.absmax_scale.shape == (-(-blocks // DOUBLE_QUANT_BLOCK),)
    assert torch.allclose(double.absmax_offset, plain.absmax.mean())
    relative = ((double.scales() - plain.absmax).abs() / plain.absmax).max().item()
    assert relative < 0.01
    assert _sqnr_db(w, double.dequantize()) > _sqnr_db(w, plain.dequantize()) - 0.05


def test_bits_per_weight_are_qlora_figures():
    assert nf4_bits_per_weight() == 4.5
    assert abs(nf4_bits_per_weight(double_quant=True) - 4.127) < 1e-3


def test_element_count_must_be_a_multiple_of_the_block_size():
    with pytest.raises(ConfigError, match="100 is not a multiple of 64"):
        nf4_quantize(torch.ones(10, 10))
    for bad in (0, -64, True, 64.0):
        with pytest.raises(ConfigError, match="block_size"):
            nf4_quantize(torch.ones(64), block_size=bad)


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="floating-point"):
        nf4_quantize(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ConfigError, match="non-empty"):
        nf4_quantize(torch.ones(0))
    with pytest.raises(ConfigError, match="double_quant"):
        nf4_quantize(torch.ones(64), double_quant=1)
    w = torch.ones(128)
    w[70] = float("nan")
    with pytest.raises(NonFiniteError):
        nf4_quantize(w)
