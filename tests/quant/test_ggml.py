"""llama.cpp's weight types: the legacy ones give the ``gguf`` package's own codes bit for bit, every type costs
its exact bytes, the k-quants' values lie on their two-level grid, and a row that is no whole number of blocks is
refused or falls back as llama.cpp does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from qanalyze.errors import ConfigError
from qanalyze.quant.ggml import GGML_TYPES, get_ggml_type, ggml_fallback, is_ggml_layout, quantize_ggml
from qanalyze.quant.layouts import column_fits, column_storage_bits, layout_symmetric, parse_layout, quantize_layout

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _weight(rows: int = 8, columns: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    weight[0, :32] = 0  # an all-zero block: scale 0
    weight[1, :32] = torch.linspace(-1, 1, 32)  # exact halves and a tie for the largest magnitude
    weight[2, 32:64] = 0.25
    return weight


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_dequantize_exactly_as_the_gguf_package_quantizes(name):
    kind = GGML_TYPES[name]
    weight = _weight()
    ours = quantize_ggml(weight, kind).dequantize()
    theirs = quants.dequantize(quants.quantize(weight.numpy(), kind.ggml), kind.ggml)
    assert np.array_equal(ours.numpy(), theirs)


def test_every_type_costs_its_bytes_per_block():
    expected = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q5_0": 5.5, "Q5_1": 6.0,
                "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5}
    assert {name: kind.bits_per_weight for name, kind in GGML_TYPES.items()} == expected
    for name, kind in GGML_TYPES.items():
        found = quantize_ggml(_weight(), kind)
        assert found.storage_bits == column_storage_bits(kind.bits, name, 8, 512) == expected[name] * 8 * 512


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_k_quant_blocks_take_integer_multiples_of_a_float16_super_scale(name):
    kind = GGML_TYPES[name]
    found = quantize_ggml(_weight(seed=1), kind)
    levels = 15 if name == "Q2_K" else 63
    per_super = 256 // kind.block
    scale = found.scale.reshape(-1, per_super)
    d = scale.amax(dim=1, keepdim=True) / scale.div(scale.amax(dim=1, keepdim=True)).mul(levels).round().amax(
        dim=1, keepdim=True).clamp(min=1)
    multiples = scale / d
    assert torch.allclose(multiples, multiples.round(), atol=1e-3) and multiples.max() <= levels
    assert int(found.codes.min()) >= 0 and int(found.codes.max()) <= 2**kind.bits - 1
    assert bool((found.bias <= 0).all())  # the minimum of a block is at most 0: -dmin * m


def test_errors_fall_as_the_types_get_larger():
    weight = _weight(rows=16, seed=2)
    error = {name: float((quantize_ggml(weight, kind).dequantize() - weight).square().sum())
             for name, kind in GGML_TYPES.items()}
    assert error["Q2_K"] > error["Q3_K"] > error["Q4_K"] > error["Q5_K"] > error["Q6_K"] > error["Q8_0"]
    assert error["Q4_0"] > error["Q4_K"] and error["Q5_0"] > error["Q5_K"]
    symmetric = quantize_ggml(weight, GGML_TYPES["Q3_K"])
    assert symmetric.bias is None and int(symmetric.codes.min()) >= -4 and int(symmetric.codes.max()) <= 3


def test_rows_must_be_whole_blocks_and_llama_cpp_fallbacks_are_followed():
    q4k = get_ggml_type("q4_k")
    with pytest.raises(ConfigError, match=r"Q4_K stores rows in blocks of 256 columns; proj has 576"):
        quantize_ggml(torch.zeros(4, 576), q4k, where="proj")
    assert ggml_fallback(q4k, 576).name == "Q5_0" and ggml_fallback(q4k, 512) is q4k
    assert ggml_fallback(GGML_TYPES["Q3_K"], 576).name == "Q4_0"
    assert ggml_fallback(GGML_TYPES["Q4_0"], 100) is None
    assert not column_fits(4, "Q4_K", 576) and column_fits(4, "Q4_K", 1536) and not column_fits(3, "Q4_K", 1536)


def test_layout_names_and_the_shared_quantizer():
    assert is_ggml_layout("q6_k") and not is_ggml_layout("g128") and parse_layout("q6_k") == "Q6_K"
    assert layout_symmetric("Q3_K") and not layout_symmetric("Q4_K") and not layout_symmetric("g128")
    weight = _weight()
    assert torch.equal(quantize_layout(weight, 4, "Q4_K").dequantize(),
                       quantize_ggml(weight, GGML_TYPES["Q4_K"]).dequantize())
    with pytest.raises(ConfigError, match="Q4_K stores 4-bit codes, not 3"):
        quantize_layout(weight, 3, "Q4_K")
