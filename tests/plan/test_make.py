"""make_plan end to end: a sensitivity report from a real analysis of a tiny BERT -> plan.json."""

import json

import pytest

from qanalyze.data import load_task
from qanalyze.errors import ConfigError
from qanalyze.models import inventory, load_model
from qanalyze.plan.budget import parse_budget
from qanalyze.plan.make import PlanConfig, check_plan, make_plan
from qanalyze.records import BitPlan
from qanalyze.sensitivity.analyze import AnalyzeConfig, analyze


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_bert_dir, glue_dir):
    """A real sensitivity report of the tiny BERT on SST-2 sentences (weights, activations, gradients, traces)."""
    data = load_task("sst2", str(glue_dir), max_train_examples=32, max_eval_examples=8, seed=0)
    loaded = load_model(str(tiny_bert_dir), num_labels=2, eager_attention=True)
    out = tmp_path_factory.mktemp("plan") / "sensitivity.json"
    config = AnalyzeConfig(batches=2, batch_size=8, max_length=24, metrics=("trace", "eig", "weights", "activations",
                                                                            "gradients"),
                           bits=(2, 3, 4, 5, 6, 8, 12, 16), trace_max_probes=8, trace_min_probes=4)
    return analyze(loaded, data, config, out), out, loaded


def test_plan_meets_the_budget_and_round_trips(tmp_path, analysed):
    report, path, _ = analysed
    plan = make_plan(report, parse_budget("4bit"), PlanConfig(), sensitivity_path=path)
    assert plan.totals["weight_bits_mean"] <= 4.0 + 1e-9
    quantized = {n: m for n, m in plan.modules.items() if not m.get("float")}
    assert quantized and all(2 <= m["weight_bits"] <= 16 for m in quantized.values())
    assert all(m.get("float") for n, m in plan.modules.items() if "LayerNorm" in n or n == "classifier")
    assert all(m["activation_bits"] for n, m in quantized.items() if "embeddings" not in n)
    plan.save(tmp_path / "p.json")
    assert BitPlan.load(tmp_path / "p.json") == plan
    again = make_plan(report, parse_budget("4bit"), PlanConfig(), sensitivity_path=path)
    again.save(tmp_path / "q.json")
    assert (tmp_path / "p.json").read_bytes() == (tmp_path / "q.json").read_bytes()


def test_more_budget_never_predicts_more_damage(analysed):
    report, _, _ = analysed
    damages = [make_plan(report, parse_budget(f"{b}bit"), PlanConfig()).totals["predicted_damage"]
               for b in (2.5, 3, 4, 6, 8, 16)]
    assert damages == sorted(damages, reverse=True)


def test_hessian_plan_beats_its_baselines_at_equal_budget(analysed):
    report, _, _ = analysed
    budget = parse_budget("4bit")
    best = make_plan(report, budget, PlanConfig()).totals["predicted_damage"]
    for name in ("uniform", "random", "reversed"):
        baseline = make_plan(report, budget, PlanConfig(), baseline=name)
        assert baseline.baseline == name
        assert baseline.totals["weight_bits_mean"] <= 4.0 + 1e-9
        assert baseline.totals["predicted_damage"] >= best - 1e-12


def test_unreachable_budget_names_the_smallest_reachable(analysed):
    report, _, _ = analysed
    with pytest.raises(ConfigError, match=r"smallest reachable is \d"):
        make_plan(report, parse_budget("1bit"), PlanConfig())
    with pytest.raises(ConfigError, match="smallest reachable"):
        make_plan(report, parse_budget("30x"), PlanConfig())


def test_plan_is_refused_for_another_architecture(analysed):
    report, _, loaded = analysed
    plan = make_plan(report, parse_budget("8bit"), PlanConfig())
    architecture = {i.name: list(i.shape) for i in inventory(loaded.model)}
    check_plan(plan, architecture)
    other = dict(architecture)
    other["bert.encoder.layer.0.attention.self.query"] = [64, 32]
    with pytest.raises(ConfigError, match=r"attention\.self\.query has shape"):
        check_plan(plan, other)
    other = {k: v for k, v in architecture.items() if "layer.1." not in k}
    with pytest.raises(ConfigError, match="does not exist in this model"):
        check_plan(plan, other)


def test_tied_modules_share_bits(analysed):
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("3bit"), PlanConfig(ties=(r"attention\.self\.(query|key|value)",)))
    for layer in (0, 1):
        bits = {plan.modules[f"bert.encoder.layer.{layer}.attention.self.{p}"]["weight_bits"]
                for p in ("query", "key", "value")}
        assert len(bits) == 1
    assert json.dumps(plan.to_dict())  # plain JSON


def test_bops_budget_is_a_second_constraint(analysed):
    report, _, _ = analysed
    free = make_plan(report, parse_budget("8bit"), PlanConfig())
    cap = free.totals["bops"] * 0.5
    capped = make_plan(report, parse_budget("8bit"), PlanConfig(bops=cap))
    assert capped.totals["bops"] <= cap * (1 + 1e-9)
    assert capped.totals["weight_bits_mean"] <= 8.0 + 1e-9
    assert capped.totals["predicted_damage"] >= free.totals["predicted_damage"]
    with pytest.raises(ConfigError, match=r"BOPs budget .* smallest reachable"):
        make_plan(report, parse_budget("8bit"), PlanConfig(bops=1.0))


def test_gradient_budget_allocates_measured_bits(analysed):
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("4bit"), PlanConfig(grad_budget=6.0))
    linear = {n: m for n, m in plan.modules.items() if not m.get("float") and "embeddings" not in n}
    out_features = {n: plan.model["modules"][n][0] for n in linear}
    mean = sum(m["gradient_bits"] * out_features[n] for n, m in linear.items()) / sum(out_features.values())
    assert mean <= 6.0 + 1e-9
    assert len({m["gradient_bits"] for m in linear.values()}) > 1  # allocated, not uniform
    with pytest.raises(ConfigError, match=r"gradient budget 1\.5bit cannot be reached"):
        make_plan(report, parse_budget("4bit"), PlanConfig(grad_budget=1.5))
