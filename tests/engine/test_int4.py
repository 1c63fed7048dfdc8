"""The int4 mode: LSQ against its formula (float64), bit splitting and leverage-score sampling (bounds and
unbiasedness over many draws), the integer forward against int64 (exact), the backward against the float
gradient of the fake-quantized forward (a proven bound), and the modules."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qanalyze.engine.functions import TensorSpec
from qanalyze.engine.int4 import (
    CODE_MAX,
    CODE_MIN,
    BitSplit,
    Int4Embedding,
    Int4Linear,
    Int4LinearFunction,
    Int4Spec,
    LSQQuantize,
    bit_split,
    lsq_init,
    lsq_quantize,
    lss_probabilities,
)
from qanalyze.engine.int4 import _stacked_rows as stacked_rows
from qanalyze.engine.kernels import reference_mm
from qanalyze.engine.packing import PackedTensor, load_packed, save_packed
from qanalyze.errors import ConfigError
from qanalyze.quant.hadamard import block_hadamard, choose_block

SPEC = TensorSpec(weight_bits=4, activation_bits=4, gradient_bits=8)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _f16(value, dtype=torch.float32):
    """A step size that float16 holds exactly, so the one the quantizer uses is the one given."""
    return torch.tensor(value, dtype=torch.float16).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# LSQ


def test_lsq_step_gradient_matches_the_paper_formula_in_float64():
    g = _gen(0)
    h = (torch.randn(7, 13, generator=g, dtype=torch.float64) * 3).requires_grad_()
    s = _f16(0.4, torch.float64).requires_grad_()
    upstream = torch.randn(7, 13, generator=g, dtype=torch.float64)
    out = LSQQuantize.apply(h, s)
    out.backward(upstream)
    # the LSQ paper's formulas, element by element in Python floats
    step, total, grad_h = float(s.detach()), 0.0, []
    for value, up in zip(h.detach().flatten().tolist(), upstream.flatten().tolist()):
        v = value / step
        if v <= -8:
            total += up * -8
            grad_h.append(0.0)
        elif v >= 7:
            total += up * 7
            grad_h.append(0.0)
        else:
            total += up * (-v + round(v))  # Python's round is also ties-to-even
            grad_h.append(up)
    expected_s = total / math.sqrt(h.numel() * 7)
    assert float(s.grad) == pytest.approx(expected_s, rel=1e-12, abs=1e-12)
    assert torch.equal(h.grad, torch.tensor(grad_h, dtype=torch.float64).reshape(7, 13))
    clipped = (h.detach() / step <= -8) | (h.detach() / step >= 7)
    assert 0 < int(clipped.sum()) < h.numel()  # both branches were exercised
    codes = torch.clamp(torch.round(h.detach() / step), -8, 7)
    assert torch.equal(out.detach(), codes * step)


def test_lsq_init_and_codes():
    h = torch.randn(50, 20, generator=_gen(1))
    h[0, :2] = torch.tensor([100.0, -100.0])  # clipped at both ends
    s = lsq_init(h)
    assert float(s) == pytest.approx(2 * float(h.abs().mean()) / math.sqrt(7), rel=1e-6)
    assert float(lsq_init(torch.zeros(3))) == 1.0
    quantized = lsq_quantize(h, s)
    assert quantized.q.dtype == torch.int8 and quantized.bits == 4 and quantized.rows_per_group is None
    assert int(quantized.q.min()) == CODE_MIN and int(quantized.q.max()) == CODE_MAX
    assert float(quantized.scale) == float(s.half())  # the float16 step, storable as it is
    assert torch.equal(quantized.dequantize(), LSQQuantize.apply(h, s))
    with pytest.raises(ConfigError, match="inf or nan"):
        lsq_init(torch.tensor([1.0, math.inf]))


# ---------------------------------------------------------------------------------------------------------------------
# bit splitting


def test_bit_split_reconstructs_within_one_low_step():
    g = torch.randn(32, 24, generator=_gen(2)) * 1e-3
    g[3, 4] = 5e-3
    split = bit_split(g, _gen(3))
    assert isinstance(split, BitSplit)
    for part in (split.hi, split.lo):
        assert part.dtype == torch.int8 and int(part.abs().max()) <= 7
    amax = float(g.abs().max())
    assert float(split.scale_hi) == pytest.approx(amax / 7, rel=1e-6)
    assert float(split.scale_lo) == pytest.approx(amax / 98, rel=1e-6)
    error = (split.dequantize() - g).abs().max()
    # the stated bound: |g - (s_hi hi + s_lo lo)| < s_lo = max|g| / 98 (plus float32 rounding)
    assert float(error) < float(split.scale_lo) * (1 + 1e-5)
    assert float(error) > 0.3 * float(split.scale_lo)  # and the bound is not vacuous
    zero = bit_split(torch.zeros(4, 4), _gen(0))
    assert not zero.hi.any() and not zero.lo.any()


def test_bit_split_is_unbiased_over_many_draws():
    g = torch.randn(6, 10, generator=_gen(4), dtype=torch.float64)
    generator = _gen(5)
    draws = 4000
    total = torch.zeros_like(g)
    for _ in range(draws):
        total += bit_split(g, generator).dequantize()
    mean = total / draws
    # each draw is within one low step of g with variance at most s_lo^2 / 4 (a two-point distribution), so
    # the standard error of the mean is at most s_lo / (2 sqrt(draws)); 60 elements: 4 SE (Bonferroni, ~0.4 %)
    s_lo = float(g.abs().max()) / 98
    assert float((mean - g).abs().max()) < 4 * s_lo / (2 * math.sqrt(draws))
    # the hi part alone is biased (nearest rounding): unbiasedness comes from lo
    hi_only = bit_split(g, generator)
    assert float((hi_only.hi * hi_only.scale_hi - g).abs().max()) > 10 * s_lo / math.sqrt(draws)


# ---------------------------------------------------------------------------------------------------------------------
# leverage-score sampling


def test_water_filling_caps_at_one_and_sums_to_the_budget():
    norms = torch.tensor([100.0, 50.0, 1.0, 2.0, 3.0, 0.0, 4.0, 0.5])
    for budget in (0.5, 1.0, 2.5, 3.0, 5.5, 6.9):
        p = lss_probabilities(norms, budget)
        assert float(p.max()) <= 1.0 and float(p.min()) >= 0.0
        assert float(p.sum()) == pytest.approx(budget, rel=1e-6)
        assert float(p[5]) == 0.0
        free = (p < 1) & (norms > 0)
        if free.any():  # the uncapped ones are proportional to their norms, with a ratio capped ones exceed
            ratio = p[free] / norms[free]
            torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))
            assert bool((norms[p == 1] * ratio[0] >= 1 - 1e-6).all())
    assert float(lss_probabilities(norms, 2.5)[0]) == 1.0 == float(lss_probabilities(norms, 2.5)[1])
    assert torch.equal(lss_probabilities(norms, 7), (norms > 0).float())  # budget >= positive rows
    assert torch.equal(lss_probabilities(norms, 100), (norms > 0).float())


def test_water_filling_refuses_bad_input():
    with pytest.raises(ConfigError, match="positive number"):
        lss_probabilities(torch.ones(3), 0)
    with pytest.raises(ConfigError, match="non-negative"):
        lss_probabilities(torch.tensor([1.0, -1.0]), 1)
    with pytest.raises(ConfigError, match="1-D"):
        lss_probabilities(torch.ones(2, 2), 1)


def test_sampling_the_split_keeps_the_high_parts_and_drops_low_residuals():
    g = _gen(6)
    grad = torch.randn(400, 24, generator=g) * torch.rand(400, 1, generator=g)
    grad[::7] = 0.0  # padding tokens: rows of zeros are never kept
    split = bit_split(grad, _gen(7))
    spec = Int4Spec(block=4, lss=True, keep_fraction=0.5, budget="nonzero")
    nonzero = int((split.hi.abs().sum(1) > 0).sum() + (split.lo.abs().sum(1) > 0).sum())
    kept_hi, kept_lo = [], []
    for seed in range(40):
        rows = stacked_rows(split, None, spec, _gen(100 + seed), sample=True, power_of_two=False)
        assert not bool(((rows.hi % 7) == 0).any() | ((rows.lo % 7) == 0).any())
        assert bool((rows.weight_hi >= 1).all() & (rows.weight_lo >= 1).all())
        kept_hi.append(rows.hi.numel())
        kept_lo.append(rows.lo.numel())
    # the budget: half of the non-zero rows of [14 hi; lo], in expectation
    mean_kept = (sum(kept_hi) + sum(kept_lo)) / 40
    assert mean_kept == pytest.approx(0.5 * nonzero, rel=0.05)
    # most of it goes to the high parts, 14 times the magnitude of the low ones
    share_hi = sum(kept_hi) / 40 / int((split.hi.abs().sum(1) > 0).sum())
    share_lo = sum(kept_lo) / 40 / int((split.lo.abs().sum(1) > 0).sum())
    assert share_hi > 0.75 and share_lo < share_hi / 2, (share_hi, share_lo)
    # for the weight gradient every 1/p is a power of two, so each level is one exact integer product
    rows = stacked_rows(split, torch.rand(400, generator=g) + 0.5, spec, _gen(8), sample=True, power_of_two=True)
    weights = torch.cat((rows.weight_hi, rows.weight_lo))
    assert torch.equal(torch.exp2(torch.log2(weights).round()), weights)
    # without sampling: every non-zero row, weight 1, and no draw from the generator
    generator = _gen(9)
    state = generator.get_state()
    rows = stacked_rows(split, None, Int4Spec(block=4, lss=False), generator, sample=True, power_of_two=True)
    assert rows.hi.numel() + rows.lo.numel() == nonzero and bool((rows.weight_hi == 1).all())
    assert torch.equal(generator.get_state(), state)


def test_the_paper_budget_counts_padding_rows_and_the_strict_one_does_not():
    g = _gen(16)
    grad = torch.randn(300, 24, generator=g) * torch.rand(300, 1, generator=g)
    grad[100:] = 0.0  # two thirds padding: 200 non-zero rows of [14 hi; lo] at most, 600 rows in all
    split = bit_split(grad, _gen(17))
    nonzero = int((split.hi.abs().sum(1) > 0).sum() + (split.lo.abs().sum(1) > 0).sum())
    assert 100 < nonzero <= 200
    # N of 2N rows (300 of 600) covers every non-zero row: nothing is sampled, every weight is 1
    paper = stacked_rows(split, None, Int4Spec(block=4, lss=True, keep_fraction=0.5), _gen(18), sample=True,
                         power_of_two=False)
    assert paper.hi.numel() + paper.lo.numel() == nonzero
    assert bool((paper.weight_hi == 1).all() & (paper.weight_lo == 1).all())
    # a third of all rows (200) is at or above the non-zero count too; a quarter (150) is not
    quarter = Int4Spec(block=4, lss=True, keep_fraction=0.25)
    kept = [sum(r.numel() for r in (rows.hi, rows.lo)) for rows in
            (stacked_rows(split, None, quarter, _gen(19 + i), sample=True, power_of_two=False) for i in range(40))]
    assert sum(kept) / 40 == pytest.approx(150, rel=0.05)
    # the strict budget halves the non-zero rows whatever the padding
    strict = Int4Spec(block=4, lss=True, keep_fraction=0.5, budget="nonzero")
    kept = [sum(r.numel() for r in (rows.hi, rows.lo)) for rows in
            (stacked_rows(split, None, strict, _gen(60 + i), sample=True, power_of_two=False) for i in range(40))]
    assert sum(kept) / 40 == pytest.approx(0.5 * nonzero, rel=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# the Function


def _layer(n=24, d=32, o=12, seed=8):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 5] *= 20.0  # an outlier feature
    w = torch.randn(o, d, generator=g) * 0.2
    b = torch.randn(o, generator=g)
    return x, w, b


def test_integer_forward_equals_the_int64_reference_exactly():
    x, w, b = _layer()
    x3 = x.reshape(4, 6, 32)
    k = 8
    s_x, s_w = lsq_init(block_hadamard(x, k)), lsq_init(block_hadamard(w, k))
    y = Int4LinearFunction.apply(x3, w, b, Int4Spec(block=k, lss=False), s_x, s_w, _gen(0), None)
    xq, wq = lsq_quantize(block_hadamard(x, k), s_x), lsq_quantize(block_hadamard(w, k), s_w)
    expected = reference_mm(xq.q, wq.q.t()).to(torch.float32) * (xq.scale * wq.scale) + b
    assert y.shape == (4, 6, 12)
    assert torch.equal(y.reshape(24, 12), expected)
    # and the frozen path (codes given) gives the same output
    frozen = Int4LinearFunction.apply(x3, w, b, Int4Spec(block=k, lss=False), s_x, s_w, _gen(0), wq)
    assert torch.equal(frozen, y)


def _reference_grads(x, w, b, s_x, s_w, k, upstream):
    """Float autograd through the fake-quantized forward: LSQ(XH) LSQ(WH)ᵀ + b."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s_x, s_w)]
    xr, wr, br, sxr, swr = leaves
    y = LSQQuantize.apply(block_hadamard(xr, k), sxr) @ LSQQuantize.apply(block_hadamard(wr, k), swr).T + br
    y.backward(upstream)
    return y.detach(), [t.grad for t in leaves]


def _int4_grads(x, w, b, s_x, s_w, spec, upstream, generator):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s_x, s_w)]
    xr, wr, br, sxr, swr = leaves
    y = Int4LinearFunction.apply(xr, wr, br, spec, sxr, swr, generator, None)
    y.backward(upstream)
    return y.detach(), [t.grad for t in leaves]


def test_backward_without_lss_is_the_float_gradient_within_the_split_bound():
    x, w, b = _layer()
    k = 8
    s_x, s_w = lsq_init(block_hadamard(x, k)), lsq_init(block_hadamard(w, k))
    upstream = torch.randn(24, 12, generator=_gen(9))
    y_ref, ref = _reference_grads(x, w, b, s_x, s_w, k, upstream)
    y, got = _int4_grads(x, w, b, s_x, s_w, Int4Spec(block=k, lss=False), upstream, _gen(10))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # float vs integer accumulation
    torch.testing.assert_close(got[2], ref[2])  # the bias gradient is exact
    # Bound. The only approximation is the split G_s = G + E with |E_ij| < s_lo = max|G|/98, so
    # ‖E‖_F < sqrt(numel G) s_lo. The input gradient is (E Q(W̃) ⊙ mask) Hᵀ away from the float one; the
    # mask is a projection and H orthonormal, so the difference is at most ‖E‖_F ‖Q(W̃)‖_2 (Cauchy-Schwarz
    # with the spectral norm); likewise ‖Q(X̃)‖_2 ‖E‖_F for the weight gradient, and for a step size
    # ‖E‖_F ‖Q‖_2 ‖D‖_F / sqrt(numel · 7), D its per-element LSQ terms (|D| <= 8). A 1e-5 relative
    # slack covers float32 rounding.
    e_bound = math.sqrt(upstream.numel()) * float(upstream.abs().max()) / 98
    qx = lsq_quantize(block_hadamard(x, k), s_x).dequantize()
    qw = lsq_quantize(block_hadamard(w, k), s_w).dequantize()
    norm_qx, norm_qw = float(torch.linalg.matrix_norm(qx, 2)), float(torch.linalg.matrix_norm(qw, 2))
    checks = [(got[0], ref[0], e_bound * norm_qw), (got[1], ref[1], e_bound * norm_qx),
              (got[3], ref[3], e_bound * norm_qw * 8 * math.sqrt(qx.numel()) / math.sqrt(qx.numel() * 7)),
              (got[4], ref[4], e_bound * norm_qx * 8 * math.sqrt(qw.numel()) / math.sqrt(qw.numel() * 7))]
    for value, reference, bound in checks:
        assert float((value - reference).norm()) <= bound + 1e-5 * float(reference.norm())
    # in practice far inside it: a few percent of the gradient
    for value, reference in zip(got[:2], ref[:2]):
        assert float((value - reference).norm() / reference.norm()) < 0.05


def test_backward_with_lss_is_unbiased():
    x, w, b = _layer(n=16, d=16, o=6, seed=11)
    x[3:6] *= 0.05  # rows of very different scores, so sampling has something to do
    k = 4
    s_x, s_w = lsq_init(block_hadamard(x, k)), lsq_init(block_hadamard(w, k))
    upstream = torch.randn(16, 6, generator=_gen(12)) * torch.rand(16, 1, generator=_gen(13))
    _, ref = _reference_grads(x, w, b, s_x, s_w, k, upstream)
    generator, draws = _gen(14), 600
    spec = Int4Spec(block=k, lss=True, keep_fraction=0.4)
    flat = []
    for _ in range(draws):
        grads = _int4_grads(x, w, b, s_x, s_w, spec, upstream, generator)[1]
        flat.append(torch.cat([grads[0].flatten(), grads[1].flatten(), grads[3].reshape(1), grads[4].reshape(1)]))
    flat = torch.stack(flat).double()
    exact = torch.cat([ref[0].flatten(), ref[1].flatten(), ref[3].reshape(1), ref[4].reshape(1)]).double()
    # one scalar per gradient (a fixed random projection) within 3 standard errors of the float gradient
    g = _gen(15)
    n_x, n_w = x.numel(), w.numel()
    for start, stop in ((0, n_x), (n_x, n_x + n_w), (n_x + n_w, n_x + n_w + 1), (n_x + n_w + 1, n_x + n_w + 2)):
        weights = torch.randn(stop - start, generator=g, dtype=torch.float64)
        projected = flat[:, start:stop] @ weights
        stderr = float(projected.std()) / math.sqrt(draws)
        assert stderr > 0
        assert abs(float(projected.mean()) - float(exact[start:stop] @ weights)) < 3 * stderr


def test_lss_for_the_weight_gradient_only_leaves_the_input_gradient_unsampled():
    x, w, b = _layer(n=16, d=16, o=6, seed=11)
    k = 4
    s_x, s_w = lsq_init(block_hadamard(x, k)), lsq_init(block_hadamard(w, k))
    upstream = torch.randn(16, 6, generator=_gen(12)) * torch.rand(16, 1, generator=_gen(13))
    weight_only = Int4Spec(block=k, lss=True, keep_fraction=0.25, lss_input=False)
    # the input side runs first and, unsampled, draws exactly what the no-lss path draws (the split's rounding)
    unsampled = _int4_grads(x, w, b, s_x, s_w, Int4Spec(block=k, lss=False), upstream, _gen(3))[1]
    sampled = _int4_grads(x, w, b, s_x, s_w, weight_only, upstream, _gen(3))[1]
    assert torch.equal(sampled[0], unsampled[0]) and torch.equal(sampled[3], unsampled[3])
    # while the weight gradient is sampled: a quarter of the rows kept, reweighted, so it differs
    assert not torch.equal(sampled[1], unsampled[1])


def test_function_needs_a_block_size():
    x, w, b = _layer()
    with pytest.raises(ConfigError, match="concrete Hadamard block size"):
        Int4LinearFunction.apply(x, w, b, Int4Spec(), torch.tensor(1.0), torch.tensor(1.0), _gen(0), None)
    with pytest.raises(ConfigError, match="block size 64 does not divide"):
        Int4LinearFunction.apply(x, w, b, Int4Spec(block=64), torch.tensor(1.0), torch.tensor(1.0), _gen(0), None)


@pytest.mark.parametrize("kwargs", [{"block": 3}, {"block": 2048}, {"lss": 1}, {"lss_input": "no"},
                                    {"keep_fraction": 0}, {"budget": "tokens"},
                                    {"keep_fraction": 1.5}, {"keep_fraction": True}])
def test_int4_spec_validation(kwargs):
    with pytest.raises(ConfigError):
        Int4Spec(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# modules


def test_int4_linear_trains_a_small_regression():
    g = _gen(16)
    teacher = torch.randn(4, 32, generator=g)
    x = torch.randn(128, 32, generator=g)
    x[:, 7] *= 8.0
    target = x @ teacher.T
    torch.manual_seed(0)  # nn.Linear's own initialisation draws from the global generator
    layer = Int4Linear(nn.Linear(32, 4), SPEC, _gen(17))
    assert layer.block is None
    optimizer = torch.optim.Adam(layer.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert layer.block == choose_block(x, layer.weight.detach())
    assert layer.s_x.item() > 0 and layer.s_x.grad is not None and layer.s_w.grad is not None
    assert losses[-1] < 0.2 * losses[0]
    assert sum(losses[-5:]) < sum(losses[5:10])


def test_int4_linear_initialises_on_the_first_batch_once():
    torch.manual_seed(1)
    original = nn.Linear(16, 8)
    layer = Int4Linear(original, SPEC, _gen(0), int4=Int4Spec(block=4, lss=False))
    assert layer.weight is original.weight and layer.bias is original.bias
    assert layer.s_x.item() == 0
    assert layer.s_w.item() == float(lsq_init(block_hadamard(original.weight.detach(), 4)))
    x = torch.randn(10, 16, generator=_gen(1))
    layer(x)
    first = layer.s_x.item()
    assert first == float(lsq_init(block_hadamard(x, 4)))
    layer(x * 10)
    assert layer.s_x.item() == first and layer.block == 4
    with pytest.raises(ConfigError, match="block size 32 does not divide the 16 in-features"):
        Int4Linear(nn.Linear(16, 8), SPEC, _gen(0), int4=Int4Spec(block=32))


def test_quantized_weight_and_freeze_round_trip_through_a_packed_file(tmp_path):
    torch.manual_seed(2)
    layer = Int4Linear(nn.Linear(32, 8), SPEC, _gen(0))
    with pytest.raises(ConfigError, match="not chosen yet"):
        layer.quantized_weight()
    x = torch.randn(12, 32, generator=_gen(3))
    layer(x)
    layer.eval()
    before = layer(x)
    quantized = layer.quantized_weight()
    assert quantized.q.dtype == torch.int8 and quantized.q.shape == (8, 32) and quantized.bits == 4
    assert int(quantized.q.min()) >= -8 and int(quantized.q.max()) <= 7
    save_packed(tmp_path / "w.safetensors", {"w": PackedTensor(q=quantized.q, scale=quantized.scale.reshape(1),
                                                               bits=4, signed=True)})
    packed = load_packed(tmp_path / "w.safetensors")[0]["w"]
    assert torch.equal(packed.q.to(torch.int8), quantized.q)
    assert float(packed.scale) == float(quantized.scale)  # the float16 step is stored exactly
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    torch.manual_seed(3)
    fresh = Int4Linear(nn.Linear(32, 8), SPEC, _gen(0))  # as a loader builds it: block unknown
    fresh.load_state_dict(state)
    fresh.freeze(type(quantized)(q=packed.q.to(torch.int8), scale=packed.scale.float().reshape(()),
                                 zero_point=None, bits=4, rows_per_group=None))
    fresh.eval()
    assert fresh.block == layer.block
    assert torch.equal(fresh(x), before)
    # the float weight written back is the dequantized codes times Hᵀ: quantizing it again gives the codes
    expected = block_hadamard(quantized.dequantize(), layer.block)
    torch.testing.assert_close(fresh.weight.detach(), expected)
    again = lsq_quantize(block_hadamard(fresh.weight.detach(), layer.block), quantized.scale)
    assert torch.equal(again.q, quantized.q)
    with pytest.raises(ConfigError, match="4-bit per-tensor codes"):
        fresh.freeze(type(quantized)(q=quantized.q[:4], scale=quantized.scale, zero_point=None, bits=4,
                                     rows_per_group=None))


def test_transposed_weights_give_the_same_layer():
    torch.manual_seed(4)
    linear = nn.Linear(16, 6)
    conv = Conv1D(6, 16)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    spec = Int4Spec(block=8, lss=False)
    a = Int4Linear(linear, SPEC, _gen(0), int4=spec)
    b = Int4Linear(conv, SPEC, _gen(0), transposed=True, int4=spec)
    x = torch.randn(5, 16, generator=_gen(5))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert torch.equal(a.quantized_weight().q, b.quantized_weight().q)
    b.freeze(b.quantized_weight())
    assert b.weight.shape == (16, 6)


def test_int4_embedding_quantizes_outputs_and_learns_its_step():
    torch.manual_seed(5)
    original = nn.Embedding(20, 8, padding_idx=0)
    layer = Int4Embedding(original, SPEC, _gen(0))
    assert layer.s_out.item() == float(lsq_init(original.weight))
    ids = torch.tensor([[1, 2, 0, 5], [5, 5, 3, 19]])
    out = layer(ids)
    step = float(layer.s_out.detach().half())
    codes = out.detach() / step
    assert torch.equal(codes, codes.round()) and float(codes.min()) >= -8 and float(codes.max()) <= 7
    out.pow(2).sum().backward()
    assert layer.s_out.grad is not None and float(layer.s_out.grad) != 0
    assert float(layer.weight.grad[0].abs().sum()) == 0  # the padding row gets no gradient
    assert float(layer.weight.grad[5].abs().sum()) > 0
    layer.eval()
    torch.testing.assert_close(layer(ids), out.detach(), rtol=0, atol=0)
    quantized = layer.quantized_weight()
    layer.freeze(quantized)
    torch.testing.assert_close(layer(ids), out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.detach(), quantized.dequantize())
