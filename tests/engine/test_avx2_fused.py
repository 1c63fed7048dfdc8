"""The AVX2 library's fused ops around the products (issue 26's third way): one-pass quantization and the rescale in
the GEMM's epilogue give the very values of the torch ops they replace, on odd shapes, and the integer Functions
give bit-identical outputs and gradients with and without them."""

from __future__ import annotations

import pytest
import torch

from qanalyze.engine import avx2_gemm, kernels
from qanalyze.engine.functions import (
    IntEmbeddingFunction,
    IntLayerNormFunction,
    IntLinearFunction,
    TensorSpec,
    draw_noise,
    fused_quantized,
    get_quantizer,
    integer_codes,
    tensor_scale,
)
from qanalyze.engine.kernels import fused_codes, int_mm_scaled, reference_mm

needs_kernel = pytest.mark.skipif(avx2_gemm.avx2_int8_mm_op() is None, reason="no AVX2 kernel on this machine")

# odd sizes: below one 8-wide vector, vector plus tail, the kernel's block edges (64 rows, 512 k, 16 columns)
SHAPES = ((1, 1, 1), (3, 5, 7), (9, 17, 13), (67, 151, 91), (65, 513, 17), (131, 1025, 33))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("quantizer", ["dfp", "symmetric"])
def test_fused_codes_equal_integer_codes(bits, quantizer):
    """Nearest and stochastic rounding, one scale or one per row, int8 and int16 codes, odd sizes and a
    transposed input: the same codes, and the same generator state after the draw."""
    for rows, cols in ((1, 1), (3, 7), (5, 9), (67, 151), (33, 1025)):
        x = torch.randn(rows, cols, generator=_gen(rows * cols + bits)) * 5
        x[0, 0] = 0.5 * float(tensor_scale(x, bits, quantizer))  # a tie: ties go to even
        for view in (x, x.t().contiguous().t()):
            scale = tensor_scale(view, bits, quantizer).float().reshape(())
            assert torch.equal(fused_codes(view, scale, bits), integer_codes(view, scale, bits))
            row_scale = (view.abs().amax(1, keepdim=True) / 3).float()
            assert torch.equal(fused_codes(view, row_scale, bits), integer_codes(view, row_scale, bits))
            torch_draws, fused_draws = _gen(bits), _gen(bits)
            noise = draw_noise(view.shape, torch_draws, view.device)
            levels = draw_noise(view.shape, fused_draws, view.device, levels=True)
            assert levels.dtype == torch.int16 and torch.equal(torch_draws.get_state(), fused_draws.get_state())
            got = integer_codes(view, scale, bits, levels, fused=True)
            assert got.dtype == (torch.int8 if bits <= 8 else torch.int16)
            assert torch.equal(got, integer_codes(view, scale, bits, noise))


@needs_kernel
@pytest.mark.parametrize("quantizer", ["dfp", "symmetric"])
def test_fused_quantized_equals_the_quantizer(quantizer):
    quantize = get_quantizer(quantizer)
    x = torch.randn(37, 45, generator=_gen(3))
    x[4] = 0  # an all-zero row: scale 1
    for per_row in (False, True):
        want = quantize(x, 8, 1 if per_row else None, "nearest", None)
        got = fused_quantized(x, 8, quantizer, per_row=per_row)
        assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
        assert got.rows_per_group == want.rows_per_group
    want = quantize(x, 8, None, "stochastic", _gen(9))
    got = fused_quantized(x, 8, quantizer, per_row=False, levels=draw_noise(x.shape, _gen(9), x.device, levels=True))
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)


@needs_kernel
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_int_mm_scaled_equals_the_torch_ops(m, k, n):
    """The epilogue's float32(acc) * (row * col) + bias against int_mm(...).to(float32).mul_(...).add_(...):
    bit-identical for each combination of scales (a 0-d one too), K over several 512 blocks, both layouts."""
    g = _gen(m * 1000 + k + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).t()
    row, col, bias = torch.rand(m, 1, generator=g), torch.rand(n, generator=g) * 1e-3, torch.randn(n, generator=g)
    exact = reference_mm(a, b).to(torch.float32)
    for r, c, bb in ((None, None, None), (row, None, None), (None, col, bias), (row, col, bias),
                     (None, torch.tensor(0.37), None), (row, torch.tensor(3.0), bias)):
        want = exact.clone()
        scale = c if r is None else r if c is None else r * c
        if scale is not None:
            want.mul_(scale)
        if bb is not None:
            want.add_(bb)
        for path in ("avx2", "float", "reference"):
            got = int_mm_scaled(a, b, bits_a=8, bits_b=8, row_scale=r, col_scale=c, bias=bb, path=path)
            assert got.dtype == torch.float32 and torch.equal(got, want), (path, r is None, c is None)


@needs_kernel
def test_int_mm_scaled_wide_codes_and_long_k_take_the_int_mm_route():
    """16-bit codes, a K beyond int32 and the float path's int64 chunk sums give the same values as the torch
    ops."""
    g = _gen(5)
    a = torch.randint(-32767, 32768, (7, 33), generator=g, dtype=torch.int16)
    b = torch.randint(-127, 128, (33, 5), generator=g, dtype=torch.int8)
    want = reference_mm(a, b).to(torch.float32).mul_(0.25)
    for path in ("avx2", "float"):
        assert torch.equal(int_mm_scaled(a, b, bits_a=16, bits_b=8, col_scale=torch.tensor(0.25), path=path), want)
    a = torch.randint(-127, 128, (3, 3001), generator=g, dtype=torch.int8)  # float path: K in float32 chunks
    b = torch.randint(-127, 128, (3001, 2), generator=g, dtype=torch.int8)
    want = reference_mm(a, b).to(torch.float32)
    assert torch.equal(int_mm_scaled(a, b, bits_a=8, bits_b=8, path="float"), want)
    k = 140_000
    a, b = torch.full((2, k), 127, dtype=torch.int8), torch.full((k, 3), 127, dtype=torch.int8)
    got = int_mm_scaled(a, b, bits_a=8, bits_b=8, path="avx2")
    assert torch.equal(got, torch.full((2, 3), float(k * 127 * 127)))


@needs_kernel
def test_empty_products():
    for m, k, n in ((0, 5, 3), (3, 0, 4), (3, 5, 0)):
        got = int_mm_scaled(torch.zeros(m, k, dtype=torch.int8), torch.zeros(k, n, dtype=torch.int8), bits_a=8,
                            bits_b=8, bias=torch.ones(n), path="avx2")
        assert torch.equal(got, torch.ones(m, n))
    assert fused_codes(torch.zeros(0, 4), torch.tensor(1.0), 8).shape == (0, 4)


def _linear_grads(spec, kernel, monkeypatch, seed):
    monkeypatch.setenv(kernels.KERNEL_ENV, kernel)
    assert kernels.fused_quantize_selected(spec.activation_bits, spec.weight_bits, torch.device("cpu")) == (
        kernel == "avx2")
    g = _gen(seed)
    x = torch.randn(3, 11, 37, generator=g, requires_grad=True)  # 33 tokens: odd M, K, N
    weight = torch.randn(19, 37, generator=g, requires_grad=True)
    bias = torch.randn(19, generator=g, requires_grad=True)
    y = IntLinearFunction.apply(x, weight, bias, spec, _gen(seed + 1), None)
    y.backward(torch.randn(y.shape, generator=g))
    return y.detach(), x.grad, weight.grad, bias.grad


@needs_kernel
@pytest.mark.parametrize(("bits", "rows", "per_token", "gradient_group"), [
    (8, None, False, "tensor"), (8, 1, True, "tensor"), (8, 1, False, "row"), (4, None, True, "tensor"),
    (16, None, False, "tensor")])
def test_int_linear_is_identical_with_and_without_the_fused_ops(monkeypatch, bits, rows, per_token, gradient_group):
    """Forward and the three gradients, forced avx2 (fused ops) against forced reference (torch ops, int64)."""
    spec = TensorSpec(bits, bits, bits, rows_per_group=rows, per_token=per_token, gradient_group=gradient_group)
    fused = _linear_grads(spec, "avx2", monkeypatch, 7)
    plain = _linear_grads(spec, "reference", monkeypatch, 7)
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize(("bits", "width", "with_bias", "quantizer"), [
    (8, 24, True, "dfp"), (8, 37, False, "symmetric"), (16, 13, True, "dfp"), (4, 385, True, "symmetric")])
def test_layer_norm_and_embedding_are_identical_with_and_without_the_fused_ops(monkeypatch, bits, width, with_bias,
                                                                               quantizer):
    """The layer norm's fused forward (exact sums, then double maths in torch's order) and quantized gradient, and
    the embedding's gradient: forced avx2 against forced reference, odd widths, int8 and int16 codes."""
    spec = TensorSpec(bits, bits, bits, quantizer=quantizer)
    results = {}
    for kernel in ("avx2", "reference"):
        monkeypatch.setenv(kernels.KERNEL_ENV, kernel)
        g = _gen(width)
        x = (torch.randn(5, 7, width, generator=g) * 3 + 1).requires_grad_()
        gain = torch.rand(width, generator=g).requires_grad_()
        shift = torch.randn(width, generator=g).requires_grad_() if with_bias else None
        table = torch.randn(50, width, generator=g, requires_grad=True)
        ids = torch.randint(0, 50, (5, 7), generator=g)
        y = IntLayerNormFunction.apply(x, gain, shift, spec, _gen(12), 1e-12)
        z = IntEmbeddingFunction.apply(ids, table, spec, _gen(13), 0, None)
        (y * torch.randn(y.shape, generator=g)).sum().add((z * torch.randn(z.shape, generator=g)).sum()).backward()
        results[kernel] = (y.detach(), z.detach(), x.grad, gain.grad, table.grad,
                           shift.grad if with_bias else x.grad)
    for got, want in zip(results["avx2"], results["reference"]):
        assert torch.equal(got, want)
