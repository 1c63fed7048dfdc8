"""The block Hadamard transform against the dense matrix (float64), and the block-size choice."""

import math

import pytest
import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.hadamard import BLOCK_SIZES, block_errors, block_hadamard, choose_block, hadamard_matrix
from qanalyze.quant.primitives import quantize_symmetric


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sylvester(k):
    """The unnormalized Sylvester matrix by its entry formula: H[i, j] = (-1) ** popcount(i & j)."""
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(k)] for i in range(k)], dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 64, 1024])
def test_hadamard_matrix_is_orthonormal_symmetric_sylvester(k):
    h = hadamard_matrix(k, dtype=torch.float64)
    assert h.shape == (k, k) and h.dtype == torch.float64
    torch.testing.assert_close(h @ h.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(h, h.T)
    if k <= 64:
        torch.testing.assert_close(h, _sylvester(k) / math.sqrt(k), rtol=0, atol=1e-15)


def test_hadamard_matrix_recursion_and_dtype():
    h2, h4 = hadamard_matrix(2, dtype=torch.float64), hadamard_matrix(4, dtype=torch.float64)
    torch.testing.assert_close(h4, torch.cat((torch.cat((h2, h2), 1), torch.cat((h2, -h2), 1)), 0) / math.sqrt(2))
    assert hadamard_matrix(8).dtype == torch.float32


@pytest.mark.parametrize("k", [0, 3, 6, 2048, -4, 2.0, True])
def test_bad_block_sizes_are_refused(k):
    with pytest.raises(ConfigError, match="power of two"):
        hadamard_matrix(k)
    with pytest.raises(ConfigError, match="power of two"):
        block_hadamard(torch.zeros(4, 8), k)


@pytest.mark.parametrize(("shape", "k"), [((7, 64), 1), ((7, 64), 2), ((3, 5, 128), 8), ((1, 2, 3, 256), 64),
                                          ((5, 96), 32), ((2, 1024), 1024), ((11, 48), 16)])
def test_fast_transform_equals_dense_block_diagonal(shape, k):
    x = torch.randn(shape, generator=_gen(k), dtype=torch.float64)
    dense = torch.block_diag(*[hadamard_matrix(k, dtype=torch.float64)] * (shape[-1] // k))
    torch.testing.assert_close(block_hadamard(x, k), x @ dense, rtol=0, atol=1e-12)


def test_transform_is_its_own_inverse_and_keeps_norms():
    x = torch.randn(9, 3, 128, generator=_gen(1), dtype=torch.float64)
    for k in (2, 16, 128):
        y = block_hadamard(x, k)
        torch.testing.assert_close(block_hadamard(y, k), x, rtol=0, atol=1e-12)
        torch.testing.assert_close(y.norm(), x.norm(), rtol=1e-14, atol=0)


def test_transform_keeps_dtype_and_input():
    x = torch.randn(4, 32, generator=_gen(2))
    before = x.clone()
    assert block_hadamard(x, 8).dtype == torch.float32
    assert block_hadamard(x.half(), 8).dtype == torch.float16
    assert block_hadamard(x, 1) is x
    assert torch.equal(x, before)


def test_transform_is_differentiable():
    x = torch.randn(3, 16, generator=_gen(3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block_hadamard(t, 8), (x,))


def test_indivisible_last_dimension_names_the_sizes():
    with pytest.raises(ConfigError, match=r"block size 16 does not divide the last dimension \(40 features\)"):
        block_hadamard(torch.zeros(3, 40), 16)
    with pytest.raises(ConfigError, match="floating-point"):
        block_hadamard(torch.zeros(3, 8, dtype=torch.int32), 2)


def _explicit_error(t, k):
    """‖Q(TH)Hᵀ − T‖ with the inverse transform written out, in float64."""
    h = torch.block_diag(*[hadamard_matrix(k, dtype=torch.float64)] * (t.shape[-1] // k))
    transformed = t.double() @ h
    back = quantize_symmetric(transformed, 4).dequantize() @ h.T
    return float((back - t.double()).norm())


def test_block_errors_follow_the_definition():
    g = _gen(4)
    x, w = torch.randn(20, 48, generator=g), torch.randn(12, 48, generator=g)
    errors = block_errors(x, w)
    assert sorted(errors) == [1, 2, 4, 8, 16]  # the candidates dividing 48
    for k, value in errors.items():
        expected = _explicit_error(x, k) * _explicit_error(w, k)
        assert value == pytest.approx(expected, rel=1e-5)


def test_choose_block_spreads_outlier_channels():
    g = _gen(5)
    x = torch.randn(64, 128, generator=g)
    x[:, 3] *= 60.0  # one outlier feature, as in transformer activations
    w = torch.randn(32, 128, generator=g)
    w[:, 70] *= 40.0
    errors = block_errors(x, w)
    chosen = choose_block(x, w)
    assert chosen > 1 and errors[chosen] == min(errors.values())
    assert errors[chosen] < 0.5 * errors[1]


def test_choose_block_candidates():
    g = _gen(6)
    x, w = torch.randn(8, 24, generator=g), torch.randn(4, 24, generator=g)
    assert choose_block(x, w, candidates=(1,)) == 1
    assert choose_block(x, w, candidates=(16, 32, 8)) == 8  # only 8 divides 24
    assert set(BLOCK_SIZES) == {2**e for e in range(11)}
    with pytest.raises(ConfigError, match=r"no Hadamard block size among \(16, 32\) divides the 24 in-features"):
        choose_block(x, w, candidates=(16, 32))
    with pytest.raises(ConfigError, match="share their last dimension"):
        choose_block(x, torch.zeros(4, 16))
