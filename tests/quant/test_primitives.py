"""Quantization primitives against float64 references written here, group by group, in NumPy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.primitives import (
    BITS_RANGE,
    Quantized,
    dynamic_fixed_point,
    fake_quantize,
    module_weight_range,
    num_groups,
    parse_group,
    qmax,
    quantization_error,
    quantize_asymmetric,
    quantize_symmetric,
    round_nearest,
    round_stochastic,
    rows_per_group,
    uniform_noise,
    weight_errors,
)

ALL_BITS = list(range(2, 17))
ROWS = 32
# per tensor, per channel, groups of 4 rows, per head (head_dim 8), one group spanning every row
LAYOUTS = {"tensor": None, "channel": 1, "group4": 4, "head8": 8, "onegroup": ROWS}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def heavy_rows(*shape: int, seed: int = 0) -> torch.Tensor:
    """Rows with very different magnitudes, so a wrong group layout shows."""
    x = randn(*shape, seed=seed)
    return x * torch.logspace(-2, 2, shape[0], dtype=torch.float64).reshape(-1, *([1] * (len(shape) - 1)))


# ---------------------------------------------------------------------------------------------------------------------
# references: loop over groups in plain NumPy, float64 unless the input says otherwise


def _groups(n_rows: int, rows: int | None) -> list[slice]:
    rows = n_rows if rows is None else rows
    return [slice(start, start + rows) for start in range(0, n_rows, rows)]


def ref_symmetric(x: np.ndarray, bits: int, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    qm = x.dtype.type(2 ** (bits - 1) - 1)
    q = np.zeros_like(x)
    scales = []
    for rows_slice in _groups(x.shape[0], rows):
        block = x[rows_slice]
        amax = np.abs(block).max()
        s = amax / qm if amax > 0 else x.dtype.type(1)
        q[rows_slice] = np.clip(np.round(block / s), -qm, qm)
        scales.append(s)
    return q, np.array(scales, dtype=x.dtype)


def ref_asymmetric(x: np.ndarray, bits: int, rows: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    levels = x.dtype.type(2**bits - 1)
    q = np.zeros_like(x)
    scales, zero_points = [], []
    for rows_slice in _groups(x.shape[0], rows):
        block = x[rows_slice]
        lo, hi = min(block.min(), 0.0), max(block.max(), 0.0)
        s = x.dtype.type((hi - lo) / levels) if hi > lo else x.dtype.type(1)
        zp = np.clip(np.round(-lo / s), 0, levels)
        q[rows_slice] = np.clip(np.round(block / s) + zp, 0, levels)
        scales.append(s)
        zero_points.append(zp)
    return q, np.array(scales, dtype=x.dtype), np.array(zero_points)


def ref_dynamic_fixed_point(x: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    amax = float(np.abs(x).max())
    if amax == 0:
        return np.zeros_like(x), 1.0
    s = 2.0 ** (math.floor(math.log2(amax)) - (bits - 2))
    qm = 2 ** (bits - 1) - 1
    return np.clip(np.round(x / s), -qm, qm), s


def non_increasing(values: list[float]) -> bool:
    return all(later <= earlier for earlier, later in itertools.pairwise(values))


def flat_scales(quantized: Quantized) -> np.ndarray:
    return quantized.scale.reshape(-1).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# bits and group layout


def test_qmax_values_and_range():
    assert [qmax(b) for b in (2, 3, 4, 8, 16)] == [1, 3, 7, 127, 32767]
    assert list(BITS_RANGE) == ALL_BITS
    for bad in (1, 17, 0, -4, True, 8.0, "8"):
        with pytest.raises(ConfigError):
            qmax(bad)


def test_parse_group_normalises_and_rejects():
    assert [parse_group(g) for g in ("tensor", "channel", "head", 64, "64", "064")] == [
        "tensor", "channel", "head", "64", "64", "64"]
    for bad in ("Tensor", "rows", "", "0", "-4", "1.5", " 64", 0, -2, 2.0, True, None):
        with pytest.raises(ConfigError):
            parse_group(bad)


def test_rows_per_group_and_num_groups():
    assert rows_per_group(384, "tensor") == 384
    assert rows_per_group(384, "channel") == 1
    assert rows_per_group(384, "head", head_dim=32) == 32
    assert rows_per_group(384, 96) == 96
    assert rows_per_group(384, "128") == 128
    assert num_groups(384, "tensor") == 1
    assert num_groups(384, "channel") == 384
    assert num_groups(384, "head", head_dim=32) == 12
    assert num_groups(384, "96") == 4


@pytest.mark.parametrize(
    ("out_rows", "group", "head_dim"),
    [(384, "head", None), (384, "head", 100), (384, "head", 0), (384, 100, None), (384, "1000", None),
     (0, "tensor", None), (384, "row", None)],
)
def test_rows_per_group_errors(out_rows, group, head_dim):
    with pytest.raises(ConfigError):
        rows_per_group(out_rows, group, head_dim=head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# symmetric


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", ALL_BITS)
def test_symmetric_matches_reference_exactly(bits, layout):
    rows = LAYOUTS[layout]
    x = heavy_rows(ROWS, 24, seed=bits)
    quantized = quantize_symmetric(x, bits, rows_per_group=rows)
    q_ref, s_ref = ref_symmetric(x.numpy(), bits, rows)
    assert quantized.q.dtype == (torch.int8 if bits <= 8 else torch.int16)
    assert quantized.scale.dtype == torch.float64
    np.testing.assert_array_equal(quantized.q.numpy(), q_ref)
    np.testing.assert_array_equal(flat_scales(quantized), s_ref)
    assert quantized.bits == bits and quantized.rows_per_group == rows and quantized.zero_point is None
    # the dequantized values are exactly q * s of the reference
    expected = np.concatenate([q_ref[sl] * s for sl, s in zip(_groups(ROWS, rows), s_ref)])
    np.testing.assert_array_equal(quantized.dequantize().numpy(), expected)


@pytest.mark.parametrize("shape", [(32,), (32, 6), (32, 3, 5)])
@pytest.mark.parametrize("rows", [None, 1, 4, 8])
def test_symmetric_any_rank_and_scale_shape(shape, rows):
    x = randn(*shape, seed=3)
    quantized = quantize_symmetric(x, 5, rows_per_group=rows)
    q_ref, s_ref = ref_symmetric(x.numpy(), 5, rows)
    np.testing.assert_array_equal(quantized.q.numpy(), q_ref)
    np.testing.assert_array_equal(flat_scales(quantized), s_ref)
    if rows is None:
        assert quantized.scale.shape == ()
    else:
        assert quantized.scale.shape == (shape[0] // rows,) + (1,) * len(shape)
        # the documented convention: scale broadcasts against q viewed as (groups, rows_per_group, ...)
        grouped = quantized.q.reshape(shape[0] // rows, rows, *shape[1:]).double() * quantized.scale
        assert torch.equal(grouped.reshape(shape), quantized.dequantize())
    assert quantized.q.shape == x.shape


def test_non_contiguous_input():
    x = randn(24, ROWS, seed=5).t()  # a transposed view, as a weight often is
    for quantize in (quantize_symmetric, quantize_asymmetric):
        quantized, contiguous = quantize(x, 4, rows_per_group=4), quantize(x.contiguous(), 4, rows_per_group=4)
        assert torch.equal(quantized.q, contiguous.q) and torch.equal(quantized.scale, contiguous.scale)
    np.testing.assert_array_equal(quantize_symmetric(x, 6, rows_per_group=8).q.numpy(),
                                  ref_symmetric(x.contiguous().numpy(), 6, 8)[0])


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
def test_symmetric_float32_matches_float32_reference(bits):
    x = heavy_rows(ROWS, 24, seed=7).float()
    quantized = quantize_symmetric(x, bits, rows_per_group=4)
    q_ref, s_ref = ref_symmetric(x.numpy(), bits, 4)
    assert quantized.scale.dtype == torch.float32
    np.testing.assert_array_equal(quantized.q.numpy(), q_ref)
    np.testing.assert_array_equal(flat_scales(quantized), s_ref)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_symmetric_range_and_max_element(layout):
    rows = LAYOUTS[layout]
    x = heavy_rows(ROWS, 24, seed=11)
    for bits in ALL_BITS:
        for rounding, generator in (("nearest", None), ("stochastic", gen(bits))):
            q = quantize_symmetric(x, bits, rows_per_group=rows, rounding=rounding, generator=generator).q
            assert int(q.abs().max()) <= qmax(bits)
            for sl in _groups(ROWS, rows):
                block, q_block = x[sl], q[sl]
                where = block.abs().argmax()
                sign = 1 if block.reshape(-1)[where] > 0 else -1
                assert int(q_block.reshape(-1)[where]) == sign * qmax(bits)


def test_symmetric_zero_tensor_and_zero_group():
    zeros = torch.zeros(8, 5, dtype=torch.float64)
    for rows in (None, 1, 4):
        quantized = quantize_symmetric(zeros, 4, rows_per_group=rows)
        assert torch.all(quantized.scale == 1)
        assert torch.count_nonzero(quantized.q) == 0
        assert quantization_error(zeros, 4, rows_per_group=rows) == 0.0
    x = randn(8, 5, seed=1)
    x[4:] = 0
    quantized = quantize_symmetric(x, 4, rows_per_group=4)
    assert torch.isfinite(quantized.scale).all() and float(quantized.scale[1]) == 1.0
    assert torch.count_nonzero(quantized.dequantize()[4:]) == 0
    assert not torch.isnan(quantized.dequantize()).any()


# ---------------------------------------------------------------------------------------------------------------------
# asymmetric


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", ALL_BITS)
def test_asymmetric_matches_reference_exactly(bits, layout):
    rows = LAYOUTS[layout]
    # mixed sign with a positive shift, like pre-activation values
    x = heavy_rows(ROWS, 24, seed=100 + bits) + 0.5
    quantized = quantize_asymmetric(x, bits, rows_per_group=rows)
    q_ref, s_ref, zp_ref = ref_asymmetric(x.numpy(), bits, rows)
    assert quantized.q.dtype == (torch.int8 if bits <= 7 else torch.int16 if bits <= 15 else torch.int32)
    assert quantized.zero_point.dtype == quantized.q.dtype
    assert quantized.scale.dtype == torch.float64
    np.testing.assert_array_equal(quantized.q.numpy(), q_ref)
    np.testing.assert_array_equal(flat_scales(quantized), s_ref)
    np.testing.assert_array_equal(quantized.zero_point.reshape(-1).numpy(), zp_ref)
    assert int(quantized.q.min()) >= 0 and int(quantized.q.max()) <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_asymmetric_non_negative_min_maps_to_zero(bits):
    x = torch.rand(ROWS, 24, generator=gen(5), dtype=torch.float64) + 0.25
    x[3, 7] = 0.0  # the minimum is exactly zero
    quantized = quantize_asymmetric(x, bits)
    assert int(quantized.zero_point) == 0
    assert int(quantized.q[3, 7]) == 0 and float(quantized.dequantize()[3, 7]) == 0.0
    assert int(quantized.q.max()) == 2**bits - 1
    # zero stays exactly representable in a mixed-sign group too
    y = randn(ROWS, 24, seed=6)
    y[0, 0] = 0.0
    assert float(quantize_asymmetric(y, bits).dequantize()[0, 0]) == 0.0


def test_asymmetric_degenerate_range():
    x = torch.zeros(8, 3, dtype=torch.float64)
    x[4:] = 2.5  # a constant group: the range is widened to include zero, so [0, 2.5]
    quantized = quantize_asymmetric(x, 4, rows_per_group=4)
    assert torch.isfinite(quantized.scale).all() and float(quantized.scale[0]) == 1.0
    assert int(quantized.zero_point[0]) == 0
    assert torch.count_nonzero(quantized.dequantize()[:4]) == 0
    # the constant maps to the top code, so it comes back up to one rounding of (2.5 / 15) * 15
    assert torch.all(quantized.q[4:] == 15)
    torch.testing.assert_close(quantized.dequantize()[4:], x[4:], rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# dynamic fixed point


def _is_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


@pytest.mark.parametrize("bits", ALL_BITS)
def test_dynamic_fixed_point_matches_reference(bits):
    x = randn(ROWS, 24, seed=200 + bits) * 3.7
    quantized = dynamic_fixed_point(x, bits)
    q_ref, s_ref = ref_dynamic_fixed_point(x.numpy(), bits)
    assert quantized.scale.shape == () and quantized.rows_per_group is None and quantized.zero_point is None
    assert quantized.q.dtype == (torch.int8 if bits <= 8 else torch.int16)
    assert float(quantized.scale) == s_ref and _is_power_of_two(float(quantized.scale))
    np.testing.assert_array_equal(quantized.q.numpy(), q_ref)


@pytest.mark.parametrize("scale_by", [1e-30, 3e-3, 0.75, 1.0, 1.5, 2.0, 1e4, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_fixed_point_scale_and_range(scale_by, dtype):
    x = (randn(16, 9, seed=9) * scale_by).to(dtype)
    amax = float(x.abs().max())
    for bits in ALL_BITS:
        quantized = dynamic_fixed_point(x, bits)
        s = float(quantized.scale)
        assert quantized.scale.dtype == dtype and _is_power_of_two(s)
        # the paper's mapping: the largest element's mantissa fills the top half of the integer range ...
        top = int(quantized.q.abs().max())
        assert 2 ** (bits - 2) <= top <= qmax(bits)
        # ... and is clipped by at most one step
        assert abs(amax - top * s) <= s


def test_dynamic_fixed_point_zero_and_powers_of_two():
    zeros = torch.zeros(4, 4)
    quantized = dynamic_fixed_point(zeros, 8)
    assert float(quantized.scale) == 1.0 and torch.count_nonzero(quantized.q) == 0
    # max|x| exactly 2**k: floor(log2) = k, so it maps to 2**(bits-2) with no error
    x = torch.tensor([[4.0, -1.0], [0.5, 3.0]])
    quantized = dynamic_fixed_point(x, 8)
    assert float(quantized.scale) == 2.0**-4 and int(quantized.q[0, 0]) == 64
    assert torch.equal(quantized.dequantize(), x)


def test_dynamic_fixed_point_stochastic():
    x = randn(16, 8, seed=4)
    a = dynamic_fixed_point(x, 6, rounding="stochastic", generator=gen(1))
    b = dynamic_fixed_point(x, 6, rounding="stochastic", generator=gen(1))
    assert torch.equal(a.q, b.q)
    scaled = x / a.scale
    assert torch.all((a.q.double() == scaled.floor()) | (a.q.double() == scaled.ceil()))


# ---------------------------------------------------------------------------------------------------------------------
# rounding


def test_round_nearest_is_half_to_even():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51])
    assert round_nearest(x).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_noise_covers_the_16_bit_midpoints_evenly(dtype):
    u = uniform_noise((3, 87_381), gen(5), dtype=dtype)  # 262,143 draws: not a multiple of four per word
    assert u.shape == (3, 87_381) and u.dtype == dtype
    levels = u * 2**16 - 0.5
    assert torch.equal(levels, levels.round()) and levels.min() >= 0 and levels.max() <= 2**16 - 1
    # Each of the four 16-bit lanes of a word, and each lane's sign bit, is a fair draw.
    lanes = levels.reshape(-1)[: 4 * (u.numel() // 4)].reshape(-1, 4)
    assert torch.allclose(lanes.mean(0), torch.full((4,), (2**16 - 1) / 2, dtype=dtype), rtol=0.01)
    assert torch.allclose((lanes >= 2**15).double().mean(0), torch.full((4,), 0.5, dtype=torch.float64), atol=0.01)
    counts = torch.bincount(levels.reshape(-1).long() >> 8, minlength=256).double()  # 256 bins of 256 levels
    expected = u.numel() / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 350  # chi-square, 255 dof: p ~ 1e-4
    assert torch.equal(u, uniform_noise((3, 87_381), gen(5), dtype=dtype))
    assert not torch.equal(u, uniform_noise((3, 87_381), gen(6), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_stochastic_only_floor_or_ceil(dtype):
    x = torch.cat([randn(500, seed=2) * 50, torch.arange(-5.0, 6.0, dtype=torch.float64),
                   torch.tensor([1000.0, -1e-10, 1e-10, 2.0**22 + 0.5])]).to(dtype)
    generator = gen(3)
    for _ in range(200):
        r = round_stochastic(x, generator)
        assert r.dtype == dtype
        assert torch.all((r == x.floor()) | (r == x.ceil()))
    integers = torch.arange(-5.0, 6.0, dtype=dtype) * 1000
    assert all(torch.equal(round_stochastic(integers, generator), integers) for _ in range(200))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_round_stochastic_unbiased(dtype):
    # the probability of rounding up must equal the fractional part
    x = (torch.linspace(-3, 3, 61, dtype=torch.float64) + 0.1234).to(dtype)
    draws = torch.stack([round_stochastic(x, gen(seed)) for seed in range(4000)]).double()
    x = x.double()
    frac = x - x.floor()
    stderr = torch.sqrt(frac * (1 - frac) / draws.shape[0])
    assert torch.all((draws.mean(0) - x).abs() <= 4.5 * stderr + 1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_stochastic_quantization_unbiased(symmetric):
    x = heavy_rows(16, 4, seed=8)
    rows = 2
    quantize = quantize_symmetric if symmetric else quantize_asymmetric
    generator = gen(12345)
    n = 4000
    errors = torch.stack([quantize(x, 4, rows_per_group=rows, rounding="stochastic", generator=generator).dequantize()
                          - x for _ in range(n)])
    # the exact standard error per element: the error is s * (Bernoulli(frac) - frac)
    nearest = quantize(x, 4, rows_per_group=rows)
    scale = nearest.scale.expand(8, rows, 4).reshape(16, 4)
    offset = 0 if symmetric else nearest.zero_point.expand(8, rows, 4).reshape(16, 4).double()
    position = x / scale + offset
    # The asymmetric grid is anchored at an integer zero point, so the group's max (or min) can sit up to
    # half a step outside the codes and is clipped whatever the rounding: the unbiasedness claim is for
    # the elements inside the range.
    low_code, high_code = (-qmax(4), qmax(4)) if symmetric else (0, 2**4 - 1)
    inside = (position >= low_code) & (position <= high_code)
    assert torch.all((position.clamp(low_code, high_code) - position).abs() <= 0.5)
    assert inside.sum() >= 48  # at most one clipped end per group of 8 elements
    position, scale, errors = position[inside], scale[inside], errors[:, inside]
    frac = position - position.floor()
    stderr = scale * torch.sqrt(frac * (1 - frac) / n)
    mean = errors.mean(0)
    # 3 standard errors for the mean over every element; 4.5 per element, a union bound over the elements
    # (3 per element would fail by chance for about one seed in six)
    pooled = math.sqrt(float((stderr**2).sum())) / stderr.numel()
    assert abs(float(mean.mean())) <= 3 * pooled
    assert torch.all(mean.abs() <= 4.5 * stderr + 1e-12)
    # and every draw is the floor or the ceil of the exact position
    codes = torch.stack([quantize(x, 4, rows_per_group=rows, rounding="stochastic", generator=generator).q
                         for _ in range(50)]).double()[:, inside]
    assert torch.all((codes == position.floor()) | (codes == position.ceil()))


@pytest.mark.parametrize("quantize", [quantize_symmetric, quantize_asymmetric])
def test_stochastic_seeds(quantize):
    x = randn(ROWS, 24, seed=21)
    a = quantize(x, 4, rows_per_group=8, rounding="stochastic", generator=gen(7))
    b = quantize(x, 4, rows_per_group=8, rounding="stochastic", generator=gen(7))
    c = quantize(x, 4, rows_per_group=8, rounding="stochastic", generator=gen(8))
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    assert not torch.equal(a.q, c.q)
    assert torch.equal(round_stochastic(x, gen(7)), round_stochastic(x, gen(7)))
    assert not torch.equal(round_stochastic(x, gen(7)), round_stochastic(x, gen(8)))


# ---------------------------------------------------------------------------------------------------------------------
# purity, dtypes, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inputs_not_modified(dtype):
    x = randn(ROWS, 24, seed=31).to(dtype)
    before = x.clone()
    quantize_symmetric(x, 4, rows_per_group=4)
    quantize_symmetric(x, 4, rounding="stochastic", generator=gen())
    quantize_asymmetric(x, 4, rows_per_group=8, rounding="stochastic", generator=gen())
    fake_quantize(x, 3, symmetric=False)
    dynamic_fixed_point(x, 8, rounding="stochastic", generator=gen())
    round_stochastic(x, gen())
    round_nearest(x)
    quantization_error(x, 5, rows_per_group=1)
    weight_errors(x, [2, 8], ["tensor", "channel", "head"], head_dim=8)
    assert torch.equal(x, before)


def test_dtypes_of_scales_and_fake_quantize():
    x64 = randn(8, 4, seed=41)
    assert quantize_symmetric(x64, 8).scale.dtype == torch.float64
    assert quantize_asymmetric(x64, 8, rows_per_group=2).scale.dtype == torch.float64
    assert dynamic_fixed_point(x64, 8).scale.dtype == torch.float64
    assert fake_quantize(x64, 8).dtype == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = x64.to(dtype)
        assert quantize_symmetric(x, 8, rows_per_group=2).scale.dtype == torch.float32
        assert fake_quantize(x, 8).dtype == dtype


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_is_dequantize_of_quantize(symmetric):
    x = randn(ROWS, 24, seed=51)
    quantize = quantize_symmetric if symmetric else quantize_asymmetric
    expected = quantize(x, 5, rows_per_group=8).dequantize()
    assert torch.equal(fake_quantize(x, 5, symmetric=symmetric, rows_per_group=8), expected)
    assert quantization_error(x, 5, rows_per_group=8, symmetric=symmetric) == pytest.approx(
        float(((expected - x) ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_error_decreases_with_bits(layout, symmetric):
    x = randn(ROWS, 48, seed=61)
    errors = [quantization_error(x, b, rows_per_group=LAYOUTS[layout], symmetric=symmetric) for b in ALL_BITS]
    assert non_increasing(errors)
    assert errors[-1] < 1e-6 * errors[0]


def test_dynamic_fixed_point_error_decreases_with_bits():
    x = randn(ROWS, 48, seed=62)
    errors = [float(((dynamic_fixed_point(x, b).dequantize() - x) ** 2).sum()) for b in ALL_BITS]
    assert non_increasing(errors)


def test_weight_errors_keys_values_and_monotonicity():
    weight = heavy_rows(64, 48, seed=71).float()
    bits_list = [2, 3, 4, 6, 8, 16]
    groups = ["tensor", "channel", "head", 16, "016", "7", 5]
    result = weight_errors(weight, bits_list, groups, head_dim=8)
    assert list(result) == bits_list
    for bits in bits_list:
        assert list(result[bits]) == ["tensor", "channel", "head", "16"]  # 7 and 5 do not divide 64 rows
        for name, rows in (("tensor", 64), ("channel", 1), ("head", 8), ("16", 16)):
            assert result[bits][name] == quantization_error(weight, bits, rows_per_group=rows)
        # finer groups lose less on rows of very different magnitude
        row = result[bits]
        assert row["channel"] <= row["head"] <= row["16"] <= row["tensor"]
    for name in ("tensor", "channel", "head", "16"):
        values = [result[b][name] for b in bits_list]
        assert non_increasing(values)
    without_head = weight_errors(weight, [4], ["head", "channel"])
    assert without_head == {4: {"channel": result[4]["channel"]}}
    assert weight_errors(torch.zeros(4, 4), [2, 8], ["tensor", "channel"]) == {
        2: {"tensor": 0.0, "channel": 0.0}, 8: {"tensor": 0.0, "channel": 0.0}}


def test_weight_errors_of_a_parameter_returns_plain_floats():
    weight = torch.nn.Parameter(randn(8, 4, seed=72).float())
    result = weight_errors(weight, [4], ["channel"])
    assert isinstance(result[4]["channel"], float)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: quantize_symmetric(x, 1),
        lambda x: quantize_symmetric(x, 17),
        lambda x: quantize_asymmetric(x, 1),
        lambda x: quantize_asymmetric(x, 17),
        lambda x: dynamic_fixed_point(x, 1),
        lambda x: dynamic_fixed_point(x, 17),
        lambda x: fake_quantize(x, 17),
        lambda x: quantize_symmetric(x, 4, rows_per_group=5),
        lambda x: quantize_asymmetric(x, 4, rows_per_group=3),
        lambda x: quantize_symmetric(x, 4, rows_per_group=0),
        lambda x: quantize_symmetric(x, 4, rounding="stochastic"),
        lambda x: quantize_symmetric(x, 4, rounding="up"),
        lambda x: quantize_symmetric(x, 4, rounding="stochastic", generator=42),
        lambda x: dynamic_fixed_point(x, 4, rounding="stochastic"),
        lambda x: round_stochastic(x, None),
        lambda x: quantize_symmetric(x.long(), 4),
        lambda x: quantize_symmetric(x[:0], 4),
        lambda x: quantize_symmetric(x[0, 0], 4),
        lambda x: quantize_symmetric(torch.where(x > 1, torch.inf, x), 4),
        lambda x: quantize_asymmetric(torch.where(x > 1, torch.nan, x), 4),
        lambda x: dynamic_fixed_point(torch.where(x > 1, torch.inf, x), 4),
        lambda x: weight_errors(x, [1], ["tensor"]),
        lambda x: weight_errors(x, [4], ["rows"]),
        lambda x: weight_errors(x, [4], ["head"], head_dim=0),
    ],
)
def test_config_errors(call):
    with pytest.raises(ConfigError):
        call(randn(ROWS, 6, seed=81))


# ---------------------------------------------------------------------------------------------------------------------
# mse clipping


def _group_errors(x: torch.Tensor, bits: int, rows: int | None, clip: torch.Tensor) -> np.ndarray:
    """Per-group ||Q(x) - x||^2 in float64 for symmetric quantization clipped at ``clip``, group by group in NumPy."""
    values = x.double().numpy()
    ratios = clip.double().numpy().reshape(-1)
    chunks = [values] if rows is None else np.split(values, values.shape[0] // rows)
    limit = qmax(bits)
    errors = []
    for chunk, ratio in zip(chunks, ratios):
        step = ratio * np.abs(chunk).max() / limit
        errors.append(((np.clip(np.round(chunk / step), -limit, limit) * step - chunk) ** 2).sum())
    return np.asarray(errors)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["tensor", "channel", "group4"])
def test_mse_clip_beats_every_coarse_ratio_and_the_max_rule(bits, layout):
    from qanalyze.quant.primitives import CLIP_COARSE, mse_clip

    rows = LAYOUTS[layout]
    x = randn(ROWS, 48, seed=bits)
    if bits == 2:  # heavier tails (Laplace, by the inverse CDF), where clipping matters most
        u = torch.rand(ROWS, 48, generator=gen(bits), dtype=torch.float64) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    clip = mse_clip(x, bits, rows_per_group=rows)
    scale_shape = quantize_symmetric(x, bits, rows_per_group=rows).scale.shape
    assert clip.shape == scale_shape and bool(((clip > 0) & (clip <= 1)).all())
    best = _group_errors(x, bits, rows, clip)
    for ratio in CLIP_COARSE:
        coarse = torch.full(scale_shape, ratio, dtype=torch.float64)
        assert (best <= _group_errors(x, bits, rows, coarse) * (1 + 1e-9)).all()
    # quantize_symmetric with the ratios gives exactly those errors, and never more than the max rule
    clipped = quantize_symmetric(x, bits, rows_per_group=rows, clip=clip)
    assert quantization_error(x, bits, rows_per_group=rows, weight_range="mse") == pytest.approx(
        float(((clipped.dequantize().double() - x.double()) ** 2).sum()), rel=1e-6)
    assert best.sum() <= quantization_error(x, bits, rows_per_group=rows) * (1 + 1e-9)


def test_mse_clip_cuts_an_outlier_and_keeps_ratio_one_when_clipping_cannot_help():
    from qanalyze.quant.primitives import mse_clip

    x = randn(ROWS, 48, seed=5)
    x[3, 7] = 10.0  # one value far beyond the others (max 3.6 otherwise): per tensor, the best range cuts it
    assert float(mse_clip(x, 4)) < 0.4
    assert quantization_error(x, 4, weight_range="mse") < quantization_error(x, 4) / 3
    # values on the 2-bit grid {-1, 0, 1}: the max rule is exact, and ties keep the larger ratio
    exact = torch.tensor([[-1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    clip = mse_clip(exact, 2, rows_per_group=1)
    assert clip.reshape(-1).tolist() == [1.0, 1.0]  # the all-zero row gets 1 too
    assert torch.equal(quantize_symmetric(exact, 2, rows_per_group=1, clip=clip).dequantize(), exact)


@pytest.mark.parametrize("quantize", [quantize_symmetric, dynamic_fixed_point])
def test_clip_of_ones_changes_nothing_and_smaller_ratios_clip(quantize):
    x = randn(ROWS, 6, seed=11)
    plain = quantize(x, 5, rows_per_group=4)
    same = quantize(x, 5, rows_per_group=4, clip=torch.ones_like(plain.scale))
    assert torch.equal(plain.q, same.q) and torch.equal(plain.scale, same.scale)
    half = quantize(x, 5, rows_per_group=4, clip=torch.full_like(plain.scale, 0.5))
    assert bool((half.scale < plain.scale).all())
    assert int(half.q.abs().max()) == qmax(5)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: quantize_symmetric(x, 4, rows_per_group=4, clip=torch.ones(3)),
        lambda x: quantize_symmetric(x, 4, clip=torch.tensor(0.0)),
        lambda x: quantize_symmetric(x, 4, clip=torch.tensor(1.5)),
        lambda x: dynamic_fixed_point(x, 4, clip=torch.tensor(-0.5)),
        lambda x: quantization_error(x, 4, weight_range="percentile"),
        lambda x: quantization_error(x, 4, symmetric=False, weight_range="mse"),
        lambda x: weight_errors(x, [4], ["tensor"], weight_range="min"),
    ],
)
def test_clip_config_errors(call):
    with pytest.raises(ConfigError):
        call(randn(ROWS, 6, seed=82))


def test_weight_errors_with_mse_ranges_are_never_above_the_max_rule():
    w = randn(ROWS, 16, seed=83)
    plain = weight_errors(w, [2, 4, 8], ["tensor", "channel", "8"])
    clipped = weight_errors(w, [2, 4, 8], ["tensor", "channel", "8"], weight_range="mse")
    for bits, groups in plain.items():
        for group, error in groups.items():
            assert clipped[bits][group] <= error * (1 + 1e-9)
    assert clipped[2]["channel"] < plain[2]["channel"] * 0.6


@pytest.mark.parametrize("rule", ["max", "mse"])
def test_layer_norm_gains_keep_the_max_rule_other_weights_take_the_asked_one(rule):
    assert module_weight_range("layernorm", rule) == "max"
    assert module_weight_range("linear", rule) == rule
    assert module_weight_range("embedding", rule) == rule
