"""GPTQ against a plain float64 reference written here (the paper's sequential form with an explicit inverse
Hessian, no Cholesky, no blocks, no lazy updates), against RTN on the layer output, and its numerics:
dampening, dead columns, a Hessian that is not positive definite, bad settings."""

from __future__ import annotations

import warnings

import pytest
import torch

from qanalyze.errors import ConfigError
from qanalyze.ptq.gptq import GPTQConfig, HessianError, gptq_quantize
from qanalyze.ptq.rtn import rtn_quantize
from qanalyze.quant.columns import ColumnSpec, column_codes, group_params


def correlated_layer(seed: int, out: int = 16, columns: int = 64, tokens: int = 512):
    """A weight and inputs whose features are correlated (a random mixing) and of unequal scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, columns, generator=g, dtype=torch.float64)
    mixing = torch.randn(columns, columns, generator=g, dtype=torch.float64) * 0.4 + torch.eye(columns)
    scales = torch.rand(columns, generator=g, dtype=torch.float64) * 3 + 0.1
    x = (torch.randn(tokens, columns, generator=g, dtype=torch.float64) @ mixing) * scales
    return w, x, 2 * x.T @ x / tokens


def reference_gptq(w, h, spec, *, damp=0.01, act_order=False):
    """Frantar et al.'s sequential algorithm in its first form: quantize one column, spread its error with the
    current inverse Hessian of the columns left, then remove that column from the inverse. float64."""
    w, h = w.double().clone(), h.double().clone()
    columns = w.shape[1]
    width = columns if spec.group_size is None else spec.group_size
    for j in range(columns):
        if h[j, j] == 0:
            h[j, j] = 1
            w[:, j] = 0
    static = [group_params(w[:, s:s + width], spec) for s in range(0, columns, width)] if act_order else None
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(columns)
    h = h + damp * h.diagonal().mean() * torch.eye(columns, dtype=h.dtype)
    inverse = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    left = list(order.tolist())
    scale = zero = None
    for step, j in enumerate(order.tolist()):
        if static is not None:
            scale, zero = static[j // width]
        elif step % width == 0:
            scale, zero = group_params(w[:, j:j + width], spec)
        code = column_codes(w[:, j:j + 1], scale, zero, spec.bits)
        q = (code if zero is None else code - zero) * scale
        codes[:, j:j + 1] = code
        left.remove(j)
        err = (w[:, j:j + 1] - q) / inverse[j, j]
        w[:, left] -= err * inverse[j, left]
        w[:, j:j + 1] = q
        inverse = inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return codes


def output_error(w, quantized, x):
    return float(((x @ (w - quantized.dequantize().double()).T) ** 2).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("block_size", "columns"), [(128, 64), (24, 64), (24, 56)])
def test_blocked_gptq_gives_the_reference_codes(act_order, symmetric, block_size, columns):
    w, _, h = correlated_layer(3, out=6, columns=columns)
    # 56 columns: groups of 16, 16, 16 and a last one of 8
    spec = ColumnSpec(3, 16, symmetric, scale_format="exact", partial_last=True)
    expected = reference_gptq(w, h, spec, act_order=act_order)
    result = gptq_quantize(w, spec, h, GPTQConfig(block_size=block_size, act_order=act_order))
    assert torch.equal(result.quantized.q.double(), expected)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn(seed, act_order):
    w, x, h = correlated_layer(seed, out=32, columns=96)
    for spec in (ColumnSpec(3, 32, True), ColumnSpec(4, 32, False), ColumnSpec(2, None, False)):
        gptq = gptq_quantize(w.float(), spec, h, GPTQConfig(act_order=act_order)).quantized
        rtn = rtn_quantize(w.float(), spec)
        assert output_error(w, gptq, x) < output_error(w, rtn, x)
        assert gptq.scale.dtype == torch.float32 and gptq.q.shape == rtn.q.shape
        assert gptq.storage_bits == rtn.storage_bits


def test_gptq_loss_estimate_is_the_output_error():
    w, x, h = correlated_layer(5, out=16, columns=64)
    # GPTQ's running loss is 1/2 tr(dW H dW^T) with H = 2 X^T X / tokens: exact without dampening in float64
    result = gptq_quantize(w, ColumnSpec(4, 32, True), h, GPTQConfig(damp=0.0))
    assert result.loss == pytest.approx(output_error(w, result.quantized, x) / x.shape[0], rel=1e-9)
    # float32 (the Hessian's dtype sets the working precision) agrees to float32 accuracy
    single = gptq_quantize(w.float(), ColumnSpec(4, 32, True), h.float(), GPTQConfig(damp=0.0))
    assert single.loss == pytest.approx(result.loss, rel=1e-2)


def test_dampening_is_relative_to_mean_diagonal_and_a_diagonal_hessian_gives_rtn():
    w, _, h = correlated_layer(1)
    result = gptq_quantize(w, ColumnSpec(4, 32), h, GPTQConfig(damp=0.05))
    assert result.damp == pytest.approx(0.05 * float(h.diagonal().mean()))
    assert not result.damp_raised
    # uncorrelated inputs: nothing to compensate with, so GPTQ rounds to nearest
    diagonal = torch.diag(torch.linspace(1, 4, 64, dtype=torch.float64))
    spec = ColumnSpec(3, 16, False)
    assert torch.equal(gptq_quantize(w, spec, diagonal).quantized.q, rtn_quantize(w, spec).q)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_zeroed_as_the_paper_does(act_order):
    w, x, _ = correlated_layer(2, out=8, columns=64)
    x[:, [3, 40, 41]] = 0
    h = 2 * x.T @ x / x.shape[0]
    spec = ColumnSpec(3, 16, True, scale_format="exact")
    result = gptq_quantize(w, spec, h, GPTQConfig(act_order=act_order))
    assert result.dead_columns == 3
    assert torch.equal(result.quantized.dequantize()[:, [3, 40, 41]], torch.zeros(8, 3, dtype=torch.float64))
    assert torch.equal(result.quantized.q.double(), reference_gptq(w, h, spec, act_order=act_order))
    assert torch.equal(w[:, 3], correlated_layer(2, out=8, columns=64)[0][:, 3])  # the input is not modified


def test_a_singular_hessian_raises_the_dampening_once_then_names_the_layer():
    w, x, _ = correlated_layer(4, out=4, columns=32, tokens=8)
    singular = 2 * x.T @ x  # rank 8 < 32 columns, no dead column
    with pytest.warns(RuntimeWarning, match="layers.1.mlp: the layer Hessian is not positive definite"):
        result = gptq_quantize(w, ColumnSpec(4, 32), singular, GPTQConfig(damp=0.0), where="layers.1.mlp")
    assert result.damp_raised and result.damp > 0
    indefinite = torch.diag(torch.tensor([1.0] * 31 + [-1000.0], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(HessianError, match=r"^layers\.2\.o: the layer Hessian is not positive definite even"):
            gptq_quantize(w, ColumnSpec(4, 32), indefinite, where="layers.2.o")


def test_bad_settings_are_refused():
    for bad in (dict(damp=-0.1), dict(damp=float("nan")), dict(block_size=0), dict(act_order=1),
                dict(act_order=True, static_groups=False)):
        with pytest.raises(ConfigError):
            GPTQConfig(**bad)
    assert GPTQConfig(act_order=True).static and not GPTQConfig().static
    w, _, h = correlated_layer(0, columns=64)
    with pytest.raises(ConfigError, match="must be"):
        gptq_quantize(w, ColumnSpec(4, 32), h[:32, :32])
    with pytest.raises(ConfigError, match="group size 128 does not divide the 64 input columns of q_proj"):
        gptq_quantize(w, ColumnSpec(4, 128), h, where="q_proj")
