"""llama.cpp's block bytes: every GGML type's packed blocks, read back by the ``gguf`` package's own dequantizer,
give exactly the values qanalyze evaluated (all-zero rows and negative-only blocks included), and values that are
not llama.cpp's are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from qanalyze.quant.ggml import GGML_TYPES, quantize_ggml
from qanalyze.quant.ggml_pack import pack_ggml, split_scale


def _weight(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 512, generator=generator) * 0.05
    weight[0] = 0  # an all-zero row: every scale 0
    weight[1, :256] = -weight[1, :256].abs() - 0.01  # a negative-only super-block
    weight[2, 32:48] = -0.3  # a constant negative block
    weight[3, :16] = torch.linspace(-1, 1, 16)
    return weight


@pytest.mark.parametrize("name", sorted(GGML_TYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_blocks_dequantize_bit_exactly(name, seed):
    kind = GGML_TYPES[name]
    quantized = quantize_ggml(_weight(seed), kind)
    packed = pack_ggml(quantized)
    block, size = GGML_QUANT_SIZES[kind.ggml]
    assert packed.dtype == np.uint8 and packed.shape == (6, 512 // block * size)
    theirs = quants.dequantize(packed, kind.ggml)
    assert theirs.shape == (6, 512)
    assert torch.equal(torch.from_numpy(theirs), quantized.dequantize())


def test_values_llama_cpp_cannot_store_are_refused():
    quantized = quantize_ggml(_weight(0), GGML_TYPES["Q4_K"])
    nudged = quantized.scale.clone()
    nudged[4, 3] = torch.nextafter(nudged[4, 3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="Q4_K scales of super-block 8"):
        pack_ggml(dataclasses.replace(quantized, scale=nudged))
    legacy = quantize_ggml(_weight(0), GGML_TYPES["Q4_0"])
    codes = legacy.codes.clone()
    codes[3, 0] = -9
    with pytest.raises(ValueError, match=r"Q4 codes -9\.\.7 are outside the type's -8\.\.7"):
        pack_ggml(dataclasses.replace(legacy, codes=codes))
    with pytest.raises(ValueError, match="not a float16 value"):
        pack_ggml(dataclasses.replace(legacy, scale=legacy.scale + 1e-6))


def test_split_scale_finds_a_top_level_below_the_largest():
    values = np.array([[3 * 0.5, 2 * 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    d, q = split_scale(values, 0, 63, "scales")
    assert np.array_equal(d * q, values) and q.min() >= 0 and q.max() <= 63
    assert d[1, 0] == 0 and not q[1].any()
