"""Activation and gradient quantization error through hooks, against direct computation."""

import pytest
import torch
from torch import nn

from qanalyze.models import inventory
from qanalyze.quant.primitives import fake_quantize, weight_errors
from qanalyze.sensitivity.errors import ErrorProbe, all_weight_errors


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(5, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_activation_error_matches_direct_quantization():
    torch.manual_seed(0)
    model = TwoLayer().double()
    x = torch.randn(4, 7, 6, dtype=torch.float64, requires_grad=True)
    infos = {i.name: i for i in inventory(model)}
    modules = dict(model.named_modules())
    probe = ErrorProbe({n: modules[n] for n in infos}, infos, bits=(2, 4, 8), gradient_bits=(),
                       generator=torch.Generator().manual_seed(0))
    with probe:
        model(x).square().sum().backward()
        probe.end_batch()
    summary = probe.sums["first"].summary()
    flat = x.detach().reshape(-1)
    for bits in (2, 4, 8):
        expected = float((fake_quantize(flat, bits) - flat).square().sum()) / 4
        assert abs(summary["activation_error"][str(bits)] - expected) < 1e-12
    errors = [summary["activation_error"][str(b)] for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert "gradient_error" not in summary


def test_gradient_error_shrinks_with_bits_and_is_nearly_unbiased():
    torch.manual_seed(1)
    model = TwoLayer().double()
    infos = {i.name: i for i in inventory(model)}
    modules = dict(model.named_modules())
    probe = ErrorProbe({n: modules[n] for n in infos}, infos, bits=(), gradient_bits=(2, 4, 8, 16),
                       generator=torch.Generator().manual_seed(3), draws=64)
    x = torch.randn(8, 16, 6, dtype=torch.float64)
    with probe:
        model(x).square().sum().backward()
        probe.end_batch()
    grad = probe.sums["second"].summary()["gradient_error"]
    weight = [grad[str(b)]["weight_grad"] for b in (2, 4, 8, 16)]
    assert weight == sorted(weight, reverse=True) and weight[-1] < 1e-3
    # stochastic rounding is unbiased: the mean over 64 draws is ~1/8 of one draw's error
    for bits in ("2", "4"):
        assert grad[bits]["weight_grad_bias"] < 0.5 * grad[bits]["weight_grad"]
        assert grad[bits]["input_grad_bias"] < 0.5 * grad[bits]["input_grad"]


def test_activation_weighted_error_matches_direct_computation():
    torch.manual_seed(2)
    model = TwoLayer().double()
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    infos = {i.name: i for i in inventory(model)}
    modules = dict(model.named_modules())
    inputs = {}
    model.second.register_forward_hook(lambda module, args, out: inputs.update(second=args[0]))
    probe = ErrorProbe({n: modules[n] for n in infos}, infos, bits=(3, 6), gradient_bits=(),
                       generator=torch.Generator().manual_seed(0))
    with probe:
        model(x).square().sum().backward()
        probe.end_batch()
    hidden = inputs["second"]
    grad = torch.autograd.grad(model.second(hidden).square().sum(), hidden)[0]
    summary = probe.sums["second"].summary()
    for bits in (3, 6):
        err = fake_quantize(hidden.detach(), bits) - hidden.detach()
        expected = float((grad.square() * err.square()).sum()) / 3
        assert abs(summary["activation_weighted_error"][str(bits)] - expected) < 1e-12 * max(1.0, expected)
        assert abs(summary["activation_error"][str(bits)] - float(err.square().sum()) / 3) < 1e-12


def test_an_input_whose_gradient_never_comes_is_still_measured():
    model = TwoLayer().double()
    infos = {i.name: i for i in inventory(model)}
    modules = dict(model.named_modules())
    probe = ErrorProbe({n: modules[n] for n in infos}, infos, bits=(4,), gradient_bits=(),
                       generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    with probe:
        model.first(x)  # no backward pass at all
        probe.end_batch()
    summary = probe.sums["first"].summary()
    assert summary["activation_error"]["4"] > 0 and summary["activation_weighted_error"] == {}


def test_rows_with_zero_output_gradient_change_no_gradient_error():
    # Padding rows have a zero output gradient: leaving them out must not change what is measured.
    torch.manual_seed(4)
    model = TwoLayer().double()
    infos = {i.name: i for i in inventory(model)}
    modules = dict(model.named_modules())
    x = torch.randn(4, 6, 6, dtype=torch.float64)
    mask = torch.ones(4, 6, 1, dtype=torch.float64)
    mask[:, 3:] = 0  # half the positions are "padding": the loss ignores them

    def measure(rows: torch.Tensor, weights: torch.Tensor) -> dict:
        probe = ErrorProbe({n: modules[n] for n in infos}, infos, bits=(), gradient_bits=(2, 8),
                           generator=torch.Generator().manual_seed(7), draws=2)
        with probe:
            (model(rows) * weights).square().sum().backward()
            probe.end_batch()
        return probe.sums["second"].summary()["gradient_error"]

    padded, cut = measure(x, mask), measure(x[:, :3], mask[:, :3])
    for bits in ("2", "8"):
        for key in ("weight_grad", "input_grad", "weight_grad_bias", "input_grad_bias"):
            assert abs(padded[bits][key] - cut[bits][key]) <= 1e-12 * max(1.0, cut[bits][key])


@pytest.mark.parametrize(("shape", "head_dim"), [((96, 40), 16), ((64,), None), ((30, 7), None), ((12, 4, 5), None)])
def test_all_weight_errors_match_weight_errors(shape, head_dim):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[1] = 0.0  # a group of zeros keeps scale 1 in both
    groups = ("tensor", "channel", "head", "32", "8", "5")
    reference = weight_errors(weight, range(2, 17), groups, head_dim=head_dim)
    fast = all_weight_errors(weight, range(2, 17), groups, head_dim=head_dim)
    assert fast.keys() == reference.keys()
    for bits in reference:
        assert fast[bits].keys() == reference[bits].keys()
        for group, value in reference[bits].items():
            assert fast[bits][group] == pytest.approx(value, rel=1e-12, abs=1e-30)


def test_all_weight_errors_defer_to_weight_errors_for_mse_ranges():
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    expected = weight_errors(weight, (2, 4), ("channel",), weight_range="mse")
    assert all_weight_errors(weight, (2, 4), ("channel",), weight_range="mse") == expected
