"""Activation and gradient quantization error through hooks, against direct computation."""

import torch
from torch import nn

from qanalyze.models import inventory
from qanalyze.quant.primitives import fake_quantize
from qanalyze.sensitivity.errors import ErrorProbe


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
