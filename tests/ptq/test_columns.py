"""Column-group quantization against a float64 reference written here group by group, the storage formula,
and the spec's validation."""

from __future__ import annotations

import pytest
import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.columns import (
    ColumnSpec,
    bits_per_weight,
    column_codes,
    dequantize_codes,
    parse_column_group,
    quantize_columns,
    storage_bits,
)
from qanalyze.quant.primitives import quantize_asymmetric, quantize_symmetric


def weight(out: int = 8, columns: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, columns, generator=torch.Generator().manual_seed(seed))


def reference(w: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    """Plain float64 loop over rows and groups, with exact scales (no float16 rounding)."""
    w = w.double()
    width = w.shape[1] if group is None else group
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], width):
            g = w[r, start:start + width]
            if symmetric:
                limit = 2 ** (bits - 1) - 1
                s = float(g.abs().max()) / limit or 1.0
                out[r, start:start + width] = torch.round(g / s).clamp(-limit, limit) * s
            else:
                levels = 2**bits - 1
                lo, hi = min(float(g.min()), 0.0), max(float(g.max()), 0.0)
                s = (hi - lo) / levels or 1.0
                z = min(max(round(-lo / s), 0), levels)
                out[r, start:start + width] = ((torch.round(g / s) + z).clamp(0, levels) - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference_and_primitives(bits, group, symmetric):
    w = weight().double()
    found = quantize_columns(w, ColumnSpec(bits, group, symmetric, scale_format="exact"))
    torch.testing.assert_close(found.dequantize(), reference(w, bits, group, symmetric), rtol=0, atol=1e-12)
    width = w.shape[1] if group is None else group
    rows = w.reshape(-1, width)
    primitive = (quantize_symmetric(rows, bits, rows_per_group=1) if symmetric
                 else quantize_asymmetric(rows, bits, rows_per_group=1))
    assert torch.equal(found.q.reshape(-1, width).long(), primitive.q.long())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_round_trip_exactly(symmetric, bits):
    w = weight(16, 256, seed=1)
    spec = ColumnSpec(bits, 64, symmetric)
    first = quantize_columns(w, spec)
    # a loader's weights, quantized again with the stored scales and zero points, give the same codes
    width = 64
    scale = first.scale.repeat_interleave(width, dim=1)
    zero = None if symmetric else first.zero_point.repeat_interleave(width, dim=1)
    assert torch.equal(column_codes(first.dequantize(), scale, zero, bits).to(first.q.dtype), first.q)
    assert (first.zero_point is None) == symmetric
    if symmetric:
        # symmetric codes are a fixed point from scratch too: each group's largest code is +-qmax
        again = quantize_columns(first.dequantize(), spec)
        assert torch.equal(first.q, again.q) and torch.equal(first.scale, again.scale)
    assert first.q.dtype == (torch.int16 if bits == 8 and not symmetric else torch.int8)
    # the codes lie in their range and dequantize by the formula
    low, high = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int(first.q.min()) >= low and int(first.q.max()) <= high
    torch.testing.assert_close(dequantize_codes(first.q, first.scale, first.zero_point, 64), first.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_shorter_last_group_when_asked(symmetric):
    w = weight(8, 160, seed=3).double()
    spec = ColumnSpec(3, 64, symmetric, scale_format="exact", partial_last=True)
    found = quantize_columns(w, spec)
    assert found.scale.shape == (8, 3) and spec.groups(160) == 3
    torch.testing.assert_close(found.dequantize(), reference(w, 3, 64, symmetric), rtol=0, atol=1e-12)
    assert found.storage_bits == 3 * 8 * 160 + (16 + (0 if symmetric else 3)) * 8 * 3
    with pytest.raises(ConfigError, match=r"does not divide the 160 input columns of x; group sizes that work: 32"):
        quantize_columns(w, ColumnSpec(3, 64, symmetric), where="x")


def test_float16_scales_are_stored_exactly_and_cover_the_range():
    w = weight(8, 128, seed=2) * 1e-3
    for symmetric in (True, False):
        found = quantize_columns(w, ColumnSpec(3, 32, symmetric))
        assert torch.equal(found.scale.half().float(), found.scale)
        exact = quantize_columns(w, ColumnSpec(3, 32, symmetric, scale_format="exact"))
        assert bool((found.scale >= exact.scale).all())
    zero = quantize_columns(torch.zeros(2, 64), ColumnSpec(4, 32, False))
    assert torch.equal(zero.dequantize(), torch.zeros(2, 64))


def test_storage_cost_formula():
    assert storage_bits(576, 1536, ColumnSpec(4, 128, True)) == 4 * 576 * 1536 + 16 * 576 * 12
    assert storage_bits(576, 1536, ColumnSpec(4, 128, False)) == 4 * 576 * 1536 + (16 + 4) * 576 * 12
    assert storage_bits(10, 64, ColumnSpec(3, None, False)) == 3 * 640 + (16 + 3) * 10
    assert bits_per_weight(64, 128, ColumnSpec(4, 128, False)) == pytest.approx(4 + 20 / 128)
    found = quantize_columns(weight(4, 64), ColumnSpec(2, 32, False))
    assert found.storage_bits == 2 * 256 + (16 + 2) * 8


def test_bad_specs_are_refused_in_one_line():
    for bad in (dict(bits=1), dict(bits=9), dict(bits=4, group_size=0), dict(bits=4, symmetric="yes"),
                dict(bits=4, scale_format="bf16"), dict(bits=True)):
        with pytest.raises(ConfigError):
            ColumnSpec(**bad)
    with pytest.raises(ConfigError, match=r"group size 128 does not divide the 96 input columns of "
                                          r"layers\.0\.q; group sizes that work: 32, row"):
        quantize_columns(weight(4, 96), ColumnSpec(4, 128), where="layers.0.q")
    assert [parse_column_group(v) for v in ("g128", "64", 32, "row", None)] == [128, 64, 32, None, None]
    with pytest.raises(ConfigError):
        parse_column_group("g0")


def test_partial_layout_names_parse_and_quantize_with_a_shorter_last_group():
    from qanalyze.quant.columns import column_group_name, parse_column_layout
    from qanalyze.quant.layouts import column_fits, column_groups_per_row, column_spec, parse_layout

    assert parse_column_layout("g128p") == (128, True) and parse_column_layout("g128") == (128, False)
    assert parse_column_layout("row") == (None, False) and column_group_name(128, True) == "g128p"
    assert parse_layout("g0128p") == "g128p"
    assert column_fits(3, "g128p", 576) and not column_fits(3, "g128", 576) and not column_fits(9, "g128p", 576)
    assert column_groups_per_row("g128p", 576) == 5 and column_groups_per_row("g128p", 512) == 4
    weight = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    spec = column_spec(3, "g128p")
    found = quantize_columns(weight, spec)
    assert spec.partial_last and found.scale.shape == (4, 5)
    assert storage_bits(4, 576, spec) == 3 * 4 * 576 + (16 + 3) * 4 * 5
    with pytest.raises(ConfigError, match="g128p with a shorter last group"):
        parse_column_layout("gp")
