"""Eigenvalue, trace and density estimators against the dense float64 Hessian of a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from qanalyze.errors import ConfigError
from qanalyze.sensitivity.estimators import (
    Density,
    hutchinson_traces,
    lanczos,
    power_iteration,
    refined_lanczos,
    slq_density,
)
from qanalyze.sensitivity.hvp import HVP

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
VALUE = "bert.encoder.layer.0.attention.self.value.weight"
CLASSIFIER = "classifier.weight"


def tiny_bert() -> BertForSequenceClassification:
    # A wider initialisation than BERT's 0.02 gives the attention blocks a Hessian well above rounding.
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, initializer_range=0.2, attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    return model.double().eval()


def tiny_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (8, 12), generator=g)
    lengths = torch.randint(6, 13, (8,), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (8,), generator=g)}


def dense_hessian(model: torch.nn.Module, batch: dict, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(x: torch.Tensor) -> torch.Tensor:
        parts = {n: c.view(s) for n, c, s in zip(names, x.split(sizes), shapes)}
        return torch.func.functional_call(model, parts, args=(), kwargs=batch).loss

    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


@pytest.fixture(scope="module")
def setup() -> dict:
    model, batch = tiny_bert(), tiny_batch()
    blocks = {CLASSIFIER: [CLASSIFIER], QUERY: [QUERY], "query+value": [QUERY, VALUE]}
    hessians = {key: dense_hessian(model, batch, names) for key, names in blocks.items()}
    return {"model": model, "batch": batch, "blocks": blocks, "hessians": hessians}


def op_for(setup: dict, key: str) -> HVP:
    return HVP.build(setup["model"], setup["batch"], setup["blocks"][key])


def by_magnitude(hessian: torch.Tensor) -> torch.Tensor:
    eigenvalues = torch.linalg.eigvalsh(hessian)
    return eigenvalues[torch.argsort(eigenvalues.abs(), descending=True)]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("key", [CLASSIFIER, QUERY])
def test_top_eigenvalues_match_dense(setup, key):
    expected = by_magnitude(setup["hessians"][key])[:2].tolist()
    op = op_for(setup, key)
    for estimates in (
        lanczos(op, generator=seeded(), top_k=2, tol=1e-8),
        power_iteration(op, generator=seeded(), top_k=2, tol=1e-8, max_iter=500),
    ):
        assert [e.converged for e in estimates] == [True, True]
        assert estimates[0].value == pytest.approx(expected[0], rel=1e-6)
        assert estimates[1].value == pytest.approx(expected[1], rel=1e-4)
        # The reported error bound holds.
        assert abs(estimates[0].value - expected[0]) <= estimates[0].stderr + 1e-12
    top = lanczos(op, generator=seeded(), top_k=1)[0]
    assert top.value == pytest.approx(expected[0], rel=1e-3)
    assert top.iterations <= op.numel


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_lanczos_needs_fewer_products_than_power_iteration(setup, tol):
    expected = by_magnitude(setup["hessians"][QUERY])[0].item()
    counts, errors = {}, {}
    for name, estimator in (("lanczos", lanczos), ("power", power_iteration)):
        op = op_for(setup, QUERY)
        estimate = estimator(op, generator=seeded(), tol=tol)[0]
        assert estimate.iterations == op.count
        counts[name], errors[name] = op.count, abs(estimate.value / expected - 1)
    assert counts["lanczos"] < counts["power"]
    assert errors["lanczos"] <= max(errors["power"], tol)


@pytest.mark.parametrize("key", [QUERY, "query+value"])
def test_refined_lanczos_reaches_the_exact_tolerance_from_bfloat16_products(setup, key):
    expected = by_magnitude(setup["hessians"][key])[0].item()
    model32 = tiny_bert().float()
    names = setup["blocks"][key]
    fast = HVP.build(model32, setup["batch"], names, precision="bfloat16")
    exact = HVP.build(model32, setup["batch"], names)
    rough = lanczos(HVP.build(model32, setup["batch"], names, precision="bfloat16"), generator=seeded(), tol=1e-6)[0]
    estimate = refined_lanczos(fast, exact, generator=seeded(), tol=1e-6)[0]
    plain = lanczos(HVP.build(model32, setup["batch"], names), generator=seeded(), tol=1e-6)[0]
    assert estimate.converged
    assert estimate.iterations == fast.count + exact.count
    # The point of it: few products in float32 (the costly ones), where plain Lanczos needs many.
    assert exact.count < plain.iterations
    # bfloat16 alone settles away from the eigenvalue; the float32 finish brings it to float32's error.
    assert abs(rough.value / expected - 1) > 1e-4
    assert estimate.value == pytest.approx(expected, rel=1e-5)
    assert abs(estimate.value - expected) <= estimate.stderr + 1e-5 * abs(expected)


class MatrixOp:
    """A symmetric matrix in the operator interface the estimators use."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix, self.numel = matrix, matrix.shape[0]
        self.sizes, self.dtype, self.device, self.count = [self.numel], matrix.dtype, matrix.device, 0

    def flat(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.matrix @ v


def test_lanczos_basis_stays_orthogonal_without_ghost_eigenvalues():
    """A spectrum where plain three-term Lanczos soon loses orthogonality (a few outliers far above a
    cluster): in float32, after 120 steps the basis is orthonormal to rounding, and the converged top
    eigenvalue appears once among the Ritz values, not again as a ghost copy."""
    from collections import deque

    from qanalyze.sensitivity.estimators import _lanczos_steps

    basis, _ = torch.linalg.qr(torch.randn(400, 400, generator=seeded(5), dtype=torch.float64))
    values = torch.cat([torch.tensor([100.0, 60.0, 30.0], dtype=torch.float64),
                        torch.linspace(0.0, 1.0, 397, dtype=torch.float64)])
    matrix = (basis @ torch.diag(values) @ basis.T).float()
    start = torch.randn(400, generator=seeded(6))
    tri = deque(_lanczos_steps(MatrixOp(matrix), start, 120), maxlen=1)[0]
    q = tri.basis.double()
    assert (q @ q.T - torch.eye(len(tri.alphas), dtype=torch.float64)).abs().max().item() < 1e-5
    theta, _ = tri.eigh()
    for value in (100.0, 60.0, 30.0):
        assert int(((theta - value).abs() < 1e-3 * value).sum()) == 1


def test_refined_lanczos_picks_the_larger_of_two_magnitudes_the_fast_operator_swapped(monkeypatch):
    import qanalyze.sensitivity.estimators as estimators

    # Exact: -1.01 is the largest magnitude; the 2 % off "bfloat16" operator has +1.0 ahead of -0.99.
    basis, _ = torch.linalg.qr(torch.randn(40, 40, generator=seeded(3), dtype=torch.float64))
    rest = torch.linspace(0.05, 0.6, 38, dtype=torch.float64)
    exact = basis @ torch.diag(torch.cat([torch.tensor([-1.01, 1.0], dtype=torch.float64), rest])) @ basis.T
    fast = basis @ torch.diag(torch.cat([torch.tensor([-0.99, 1.0], dtype=torch.float64), rest])) @ basis.T
    estimate = refined_lanczos(MatrixOp(fast), MatrixOp(exact), generator=seeded(), tol=1e-6)[0]
    assert estimate.value == pytest.approx(-1.01, rel=1e-6)
    # Refining only the fast top vector stays on the eigenvalue bfloat16 put first.
    monkeypatch.setattr(estimators, "FAST_MARGIN", 0.0)
    assert refined_lanczos(MatrixOp(fast), MatrixOp(exact), generator=seeded(), tol=1e-6)[0].value == pytest.approx(
        1.0, rel=1e-6)


@pytest.mark.parametrize("key", [QUERY, "query+value"])
def test_a_gradient_hint_keeps_lanczos_on_the_top_eigenvalue(setup, key):
    expected = by_magnitude(setup["hessians"][key])[0].item()
    op = op_for(setup, key)
    hint = torch.cat([g.reshape(-1) for g in op.gradient()])
    assert op.count == 0  # the graph's gradient is not a product
    estimate = lanczos(op, generator=seeded(), tol=1e-8, hint=hint)[0]
    assert estimate.value == pytest.approx(expected, rel=1e-6)
    # A zero hint is no hint: the same start, the same products.
    plain, zero = (lanczos(op_for(setup, key), generator=seeded(), tol=1e-8, hint=h)[0]
                   for h in (None, torch.zeros_like(hint)))
    assert plain == zero
    with pytest.raises(ValueError, match="flat vector"):
        lanczos(op, generator=seeded(), hint=hint[:-1])


def test_a_hint_orthogonal_to_the_top_eigenvector_still_finds_it():
    # The Gaussian part of the start keeps every eigenvector in reach, even one the hint misses entirely.
    basis, _ = torch.linalg.qr(torch.randn(60, 60, generator=seeded(4), dtype=torch.float64))
    rest = torch.linspace(0.1, 1.5, 58, dtype=torch.float64)
    values = torch.cat([torch.tensor([-3.0, 2.0], dtype=torch.float64), rest])
    matrix = basis @ torch.diag(values) @ basis.T
    hint = basis[:, 1] + 0.5 * basis[:, 2]  # along the second eigenvector and a small one, not the top
    estimate = lanczos(MatrixOp(matrix), generator=seeded(), tol=1e-10, hint=hint)[0]
    assert estimate.value == pytest.approx(-3.0, rel=1e-8)
    refined = refined_lanczos(MatrixOp(matrix * 1.01), MatrixOp(matrix), generator=seeded(), tol=1e-10, hint=hint)[0]
    assert refined.value == pytest.approx(-3.0, rel=1e-8)


def test_refined_lanczos_refuses_different_blocks(setup):
    with pytest.raises(ConfigError, match="different blocks"):
        refined_lanczos(op_for(setup, QUERY), op_for(setup, CLASSIFIER), generator=seeded())


def test_power_iteration_reports_non_convergence(setup):
    estimate = power_iteration(op_for(setup, QUERY), generator=seeded(), max_iter=2, tol=1e-12)[0]
    assert (estimate.converged, estimate.iterations) == (False, 2)


def test_hutchinson_matches_dense_trace(setup):
    expected = torch.trace(setup["hessians"][QUERY]).item()
    estimate = hutchinson_traces(
        op_for(setup, QUERY), {"q": [0]}, generator=seeded(), max_probes=300, min_probes=300
    )["q"]
    assert estimate.iterations == 300
    assert estimate.stderr > 0
    assert abs(estimate.value - expected) <= 3 * estimate.stderr


def test_hutchinson_group_traces_from_one_global_product(setup):
    hessian = setup["hessians"]["query+value"]
    n = hessian.shape[0] // 2
    expected = {"q": torch.trace(hessian[:n, :n]).item(), "v": torch.trace(hessian[n:, n:]).item()}
    op = op_for(setup, "query+value")
    traces = hutchinson_traces(op, {"q": [0], "v": [1]}, generator=seeded(), max_probes=200, min_probes=200)
    assert op.count == 200  # one product per probe serves both groups
    for name in ("q", "v"):
        assert abs(traces[name].value - expected[name]) <= 3 * traces[name].stderr


def test_hutchinson_stops_at_tolerance_and_is_deterministic(setup):
    op = op_for(setup, "query+value")
    groups = {"q": [0], "v": [1], "both": [0, 1]}
    # q's trace (-0.12) is small next to its probe-to-probe spread (0.35): abs_tol keeps the probe count
    # well inside max_probes whatever the draws
    first = hutchinson_traces(op, groups, generator=seeded(5), rel_tol=0.2, abs_tol=0.05)
    again = hutchinson_traces(op, groups, generator=seeded(5), rel_tol=0.2, abs_tol=0.05)
    assert first == again
    probes = first["q"].iterations
    assert 8 <= probes < 200
    largest = max(abs(e.value) for e in first.values())
    for estimate in first.values():
        assert estimate.converged
        assert estimate.stderr <= max(0.2 * abs(estimate.value), 0.05, 0.2 * 1e-3 * largest)
    assert first["both"].value == pytest.approx(first["q"].value + first["v"].value)


def test_slq_density(setup):
    hessian = setup["hessians"][QUERY]
    eigenvalues = torch.linalg.eigvalsh(hessian)
    low, high = eigenvalues[0].item(), eigenvalues[-1].item()
    slack = 1e-9 * max(abs(low), abs(high))
    density = slq_density(op_for(setup, QUERY), generator=seeded(), probes=2, steps=30)
    assert len(density.nodes) == len(density.weights) == 2
    for nodes, weights in zip(density.nodes, density.weights):
        assert len(nodes) == 30
        assert sum(weights) == pytest.approx(1.0, abs=1e-10)
        assert min(nodes) >= low - slack and max(nodes) <= high + slack
    sigma = 0.02 * (high - low)
    grid = torch.linspace(low - 10 * sigma, high + 10 * sigma, 4001)
    smooth = density.smooth(grid, sigma=sigma)
    assert torch.trapezoid(smooth, grid).item() == pytest.approx(1.0, abs=1e-3)


def test_slq_with_enough_steps_finds_the_extreme_eigenvalues(setup):
    eigenvalues = torch.linalg.eigvalsh(setup["hessians"][CLASSIFIER])
    op = op_for(setup, CLASSIFIER)
    density = slq_density(op, generator=seeded(), steps=op.numel + 5)
    nodes = torch.tensor(density.nodes[0])
    scale = eigenvalues.abs().max().item()
    for extreme in (eigenvalues[0].item(), eigenvalues[-1].item()):
        assert (nodes - extreme).abs().min().item() <= 1e-8 * scale
    assert sum(density.weights[0]) == pytest.approx(1.0, abs=1e-10)


def test_density_smooth_of_known_nodes():
    density = Density(nodes=[[0.0, 1.0]], weights=[[0.25, 0.75]])
    grid = torch.linspace(-2, 3, 5001)
    smooth = density.smooth(grid, sigma=0.1)
    assert torch.trapezoid(smooth, grid).item() == pytest.approx(1.0, abs=1e-6)
    assert smooth[grid.sub(1.0).abs().argmin()] / smooth[grid.abs().argmin()] == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(ConfigError, match="sigma"):
        density.smooth(grid, sigma=0.0)


def test_bad_settings_are_config_errors(setup):
    op = op_for(setup, CLASSIFIER)
    with pytest.raises(ConfigError, match="top_k"):
        lanczos(op, generator=seeded(), top_k=0)
    with pytest.raises(ConfigError, match="top_k"):
        power_iteration(op, generator=seeded(), top_k=op.numel + 1)
    with pytest.raises(ConfigError, match="tol"):
        lanczos(op, generator=seeded(), tol=0)
    with pytest.raises(ConfigError, match="max_probes"):
        hutchinson_traces(op, {"w": [0]}, generator=seeded(), max_probes=4, min_probes=8)
    with pytest.raises(ConfigError, match="parameter index"):
        hutchinson_traces(op, {"w": [1]}, generator=seeded())
    with pytest.raises(ConfigError, match="empty"):
        hutchinson_traces(op, {"w": []}, generator=seeded())
    assert op.count == 0


def test_rademacher_probes_are_fair_independent_signs(setup):
    from qanalyze.sensitivity.estimators import rademacher

    op = op_for(setup, CLASSIFIER)
    draws = torch.stack([rademacher(op, seeded(s)) for s in range(200)])
    assert draws.shape == (200, op.numel) and draws.dtype == op.dtype
    assert set(draws.unique().tolist()) == {-1.0, 1.0}
    # each coordinate is a fair sign: mean 0 with standard error 1/sqrt(200) per coordinate
    assert float(draws.mean(0).abs().max()) < 6 / 200**0.5
    assert abs(float(draws.mean())) < 4 / (200 * op.numel) ** 0.5
    # neighbours within a byte are uncorrelated
    pairs = (draws[:, :-1] * draws[:, 1:]).mean()
    assert abs(float(pairs)) < 4 / (200 * (op.numel - 1)) ** 0.5
    assert not torch.equal(draws[0], draws[1])
