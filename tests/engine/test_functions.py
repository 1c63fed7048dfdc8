"""The integer autograd Functions against int64 references (exact) and float64 (within tolerance)."""

import pytest
import torch

from qanalyze.engine.functions import (
    IntEmbeddingFunction,
    IntLayerNormFunction,
    IntLinearFunction,
    TensorSpec,
    draw_noise,
    fake_quantize_ste,
    get_quantizer,
    integer_codes,
    row_scales,
    tensor_scale,
)
from qanalyze.engine.kernels import reference_mm
from qanalyze.errors import ConfigError


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data(m, k, n, seed=0, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype) * 0.1
    b = torch.randn(n, generator=g, dtype=dtype)
    grad = torch.randn(m, n, generator=g, dtype=dtype)
    return x, w, b, grad


def _reference_linear(x, w, b, grad, spec, seed):
    """The same maths with every product in int64: what the Function must reproduce bit for bit."""
    quantize = get_quantizer(spec.quantizer)
    xq = quantize(x, spec.activation_bits, 1 if spec.per_token else None, "nearest", None)
    wq = quantize(w, spec.weight_bits, spec.rows_per_group, "nearest", None)
    s_x = row_scales(xq, x.shape[0]).float()
    s_x = s_x if s_x.dim() == 0 else s_x.unsqueeze(1)
    s_w = row_scales(wq, w.shape[0]).float()
    y = reference_mm(xq.q, wq.q.t()).to(torch.float32) * (s_x * s_w) + b
    noise = draw_noise(grad.shape, _gen(seed), grad.device)  # one draw shared by both products
    if s_x.dim() == 0 and s_w.dim() == 0 and spec.gradient_group == "tensor":  # one quantization serves both
        scale = tensor_scale(grad, spec.gradient_bits, spec.quantizer)
        codes = integer_codes(grad, scale, spec.gradient_bits, noise)
        grad_x = reference_mm(codes, wq.q).to(torch.float32) * (scale * s_w)
        grad_w = reference_mm(codes.t(), xq.q).to(torch.float32) * (scale * s_x)
        return y, grad_x, grad_w
    rows = spec.gradient_group == "row"
    folded = grad * s_w
    # per row: the quantizer's own scale of each token's row (input gradient) / each output channel (weight gradient)
    scale = quantize(folded, spec.gradient_bits, 1, "nearest", None).scale.reshape(-1, 1) if rows else \
        tensor_scale(folded, spec.gradient_bits, spec.quantizer)
    grad_x = reference_mm(integer_codes(folded, scale, spec.gradient_bits, noise), wq.q).to(torch.float32) * scale
    folded = grad * s_x
    scale = quantize(folded.t().contiguous(), spec.gradient_bits, 1, "nearest", None).scale.reshape(-1, 1) if rows \
        else tensor_scale(folded, spec.gradient_bits, spec.quantizer)
    codes = integer_codes(folded, scale.t() if rows else scale, spec.gradient_bits, noise)
    grad_w = reference_mm(codes.t(), xq.q).to(torch.float32) * scale
    return y, grad_x, grad_w


@pytest.mark.parametrize("quantizer", ["dfp", "symmetric"])
@pytest.mark.parametrize("bits", [2, 5, 8, 12, 16])
def test_fast_integer_codes_equal_the_reference_quantizers(quantizer, bits):
    x = torch.randn(50, 30, generator=_gen(bits)) * 3
    scale = tensor_scale(x, bits, quantizer)
    reference = get_quantizer(quantizer)(x, bits, None, "nearest", None)
    assert torch.equal(scale, reference.scale)
    assert torch.equal(integer_codes(x, scale, bits).to(torch.int32), reference.q.to(torch.int32))
    stochastic = get_quantizer(quantizer)(x, bits, None, "stochastic", _gen(7))
    noise = draw_noise(x.shape, _gen(7), x.device)
    assert torch.equal(integer_codes(x, scale, bits, noise).to(torch.int32), stochastic.q.to(torch.int32))


def _run_linear(x, w, b, grad, spec, seed):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y = IntLinearFunction.apply(x, w, b, spec, _gen(seed), None)
    y.backward(grad)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 8, 8), (16, 16, 16), (8, 12, 16), (2, 3, 5)])
@pytest.mark.parametrize("quantizer", ["dfp", "symmetric"])
@pytest.mark.parametrize("shape", [(1, 7, 13), (37, 64, 24), (5, 3, 96)])
def test_integer_linear_equals_the_int64_reference_exactly(bits, quantizer, shape):
    weight_bits, activation_bits, gradient_bits = bits
    m, k, n = shape
    rows = n // 4 if n % 4 == 0 else None
    spec = TensorSpec(weight_bits, activation_bits, gradient_bits, rows_per_group=rows, quantizer=quantizer)
    x, w, b, grad = _data(m, k, n, seed=m + k + n)
    y, grad_x, grad_w, grad_b = _run_linear(x, w, b, grad, spec, seed=11)
    ref_y, ref_x, ref_w = _reference_linear(x, w, b, grad, spec, seed=11)
    assert torch.equal(y, ref_y)
    assert torch.equal(grad_x, ref_x)
    assert torch.equal(grad_w, ref_w)
    assert torch.equal(grad_b, grad.sum(0))


def test_per_token_activation_scales_are_exact_too():
    spec = TensorSpec(8, 8, 8, rows_per_group=1, per_token=True)
    x, w, b, grad = _data(9, 16, 8, seed=3)
    x[0] *= 100  # one loud token: per-token scales keep the others' resolution
    y, grad_x, grad_w, _ = _run_linear(x, w, b, grad, spec, seed=5)
    ref_y, ref_x, ref_w = _reference_linear(x, w, b, grad, spec, seed=5)
    assert torch.equal(y, ref_y) and torch.equal(grad_x, ref_x) and torch.equal(grad_w, ref_w)


@pytest.mark.parametrize("quantizer", ["dfp", "symmetric"])
@pytest.mark.parametrize(("per_token", "rows_per_group"), [(False, None), (True, 1)])
def test_row_gradient_scales_are_exact_and_keep_quiet_rows(quantizer, per_token, rows_per_group):
    spec = TensorSpec(8, 8, 4, rows_per_group=rows_per_group, per_token=per_token, quantizer=quantizer,
                      gradient_group="row")
    x, w, b, grad = _data(12, 16, 8, seed=7)
    grad[0] *= 1000  # one loud token (the classification token's gradient, say)
    grad[:, 3] *= 1000  # and one loud output channel
    y, grad_x, grad_w, _ = _run_linear(x, w, b, grad, spec, seed=9)
    ref_y, ref_x, ref_w = _reference_linear(x, w, b, grad, spec, seed=9)
    assert torch.equal(y, ref_y) and torch.equal(grad_x, ref_x) and torch.equal(grad_w, ref_w)
    # with one scale per tensor, 4-bit codes round the quiet rows of G to a handful of levels or to 0; per row,
    # each quiet token's input gradient keeps its resolution
    per_tensor = TensorSpec(8, 8, 4, rows_per_group=rows_per_group, per_token=per_token, quantizer=quantizer)
    tensor_x = _run_linear(x, w, b, grad, per_tensor, seed=9)[1]
    exact_x = grad @ w
    quiet = slice(1, None)
    assert (grad_x[quiet] - exact_x[quiet]).norm() < 0.5 * (tensor_x[quiet] - exact_x[quiet]).norm()


def test_sixteen_bit_linear_matches_float64_within_quantization_tolerance():
    x, w, b, grad = _data(24, 48, 32, seed=7, dtype=torch.float64)
    spec = TensorSpec(16, 16, 16, rows_per_group=1)
    y, grad_x, grad_w, _ = _run_linear(x.float(), w.float(), b.float(), grad.float(), spec, seed=1)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    exact = torch.nn.functional.linear(xs, ws, b)
    exact.backward(grad)

    def rel(a, ref):
        return float((a.double() - ref).norm() / ref.norm())

    # 16-bit dynamic fixed point: a step of 2**-14 of the range; 1e-3 leaves room for the sums
    assert rel(y, exact.detach()) < 1e-3
    assert rel(grad_x, xs.grad) < 1e-3
    assert rel(grad_w, ws.grad) < 1e-3
    # while 4 bits is visibly lossy: the tolerance above is not vacuous
    coarse = _run_linear(x.float(), w.float(), b.float(), grad.float(), TensorSpec(4, 4, 4), seed=1)
    assert rel(coarse[0], exact.detach()) > 1e-2


def test_stochastic_rounding_of_gradients_is_unbiased():
    x, w, b, grad = _data(16, 8, 6, seed=9)
    spec = TensorSpec(16, 16, 3)  # 3-bit gradients: rounding noise is large, any bias would show
    draws = torch.stack([_run_linear(x, w, b, grad, spec, seed=s)[2] for s in range(400)])
    # the expectation is the gradient of the quantized forward with the exact output gradient
    quantize = get_quantizer("dfp")
    xq = quantize(x, 16, None, "nearest", None)
    expected = grad.t().double() @ xq.dequantize().double()
    mean = draws.double().mean(0)
    stderr = draws.double().std(0) / 20
    assert bool(((mean - expected).abs() <= 3 * stderr + 1e-6).float().mean() >= 0.99)


@pytest.mark.parametrize("rows", [None, 1, 10])
def test_embedding_forward_is_the_integer_table_and_backward_an_integer_scatter(rows):
    g = _gen(2)
    weight = torch.randn(50, 12, generator=g).requires_grad_(True)
    ids = torch.randint(0, 50, (4, 9), generator=g)
    ids[0, 0] = 0
    spec = TensorSpec(6, 8, 8, rows_per_group=rows)
    out = IntEmbeddingFunction.apply(ids, weight, spec, _gen(4), 0, None)
    wq = get_quantizer("dfp")(weight.detach(), 6, rows, "nearest", None)
    assert torch.equal(out, wq.dequantize()[ids])
    grad = torch.randn(4, 9, 12, generator=g)
    out.backward(grad)
    g2 = grad.reshape(-1, 12)
    scale = tensor_scale(g2, 8, "dfp")
    codes = integer_codes(g2, scale, 8, draw_noise(g2.shape, _gen(4), g2.device))
    expected = torch.zeros(50, 12, dtype=torch.int64).index_add_(0, ids.reshape(-1), codes.to(torch.int64))
    expected[0] = 0  # padding row
    assert torch.equal(weight.grad, expected.to(torch.float32) * scale)


def test_integer_layer_norm_is_close_to_layer_norm_at_16_bits():
    g = _gen(5)
    x = (torch.randn(6, 10, 32, generator=g) * 3 + 1).requires_grad_(True)
    gamma = (1 + 0.1 * torch.randn(32, generator=g)).requires_grad_(True)
    beta = (0.1 * torch.randn(32, generator=g)).requires_grad_(True)
    grad = torch.randn(6, 10, 32, generator=g)
    y = IntLayerNormFunction.apply(x, gamma, beta, TensorSpec(16, 16, 16), _gen(0), 1e-12)
    y.backward(grad)
    got = (y.detach(), x.grad.clone(), gamma.grad.clone(), beta.grad.clone())
    for t in (x, gamma, beta):
        t.grad = None
    ref = torch.nn.functional.layer_norm(x, (32,), gamma, beta, 1e-12)
    ref.backward(grad)
    for a, b in zip(got, (ref.detach(), x.grad, gamma.grad, beta.grad)):
        assert float((a - b).norm() / b.norm()) < 2e-3


def test_fake_quantize_ste_passes_gradients_straight_through():
    x = torch.linspace(-1, 1, 11).requires_grad_(True)
    y = fake_quantize_ste(x, 3)
    assert len(torch.unique(y.detach())) <= 7
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(11))


def test_bad_specs_are_refused_gradient_group():
    with pytest.raises(ConfigError, match="gradient_group"):
        TensorSpec(8, 8, 8, gradient_group="token")


def test_bad_specs_are_refused():
    with pytest.raises(ConfigError, match="bits"):
        TensorSpec(1, 8, 8)
    with pytest.raises(ConfigError, match="unknown quantizer"):
        TensorSpec(8, 8, 8, quantizer="nf4")
