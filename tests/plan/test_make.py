"""make_plan end to end: a sensitivity report from a real analysis of a tiny BERT -> plan.json; the bits
budget rule (each tensor's first scale free) on that report and on random ones."""

import copy
import itertools
import json
import math

import numpy as np
import pytest

from qanalyze.data import load_task
from qanalyze.engine.apply import apply_plan
from qanalyze.errors import ConfigError, RecordError
from qanalyze.models import inventory, load_model
from qanalyze.plan.budget import SCALE_BITS, parse_budget
from qanalyze.plan.make import BASELINES, PlanConfig, check_plan, make_plan
from qanalyze.records import BitPlan, SensitivityReport
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
               for b in (2, 2.5, 3, 4, 6, 8, 16)]
    assert damages == sorted(damages, reverse=True)


def quantized(plan: BitPlan) -> dict[str, dict]:
    return {n: m for n, m in plan.modules.items() if not m.get("float")}


def test_16bit_gives_every_planned_module_16_bits_per_tensor(analysed):
    # a bits budget lets each tensor's first scale go free, so 16 bits everywhere fits a 16bit budget exactly
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("16bit"), PlanConfig(groups=("tensor",)))
    assert {(m["weight_bits"], m["groups"]) for m in quantized(plan).values()} == {(16, 1)}
    assert plan.totals["weight_bits_mean"] == 16.0
    assert plan.totals["weight_bits_mean_all_scales"] > 16.0  # nothing hidden: the scales are still stored


def test_16bit_with_finer_groups_on_offer(analysed):
    # the uniform plan takes 16 bits at one scale per tensor; the optimum may give a few bits of an
    # insensitive module to finer scales elsewhere, but only when that lowers the predicted damage
    report, _, _ = analysed
    uniform = make_plan(report, parse_budget("16bit"), PlanConfig(), baseline="uniform")
    assert {(m["weight_bits"], m["groups"]) for m in quantized(uniform).values()} == {(16, 1)}
    best = make_plan(report, parse_budget("16bit"), PlanConfig())
    assert best.totals["weight_bits_mean"] <= 16.0
    assert best.totals["predicted_damage"] <= uniform.totals["predicted_damage"]


@pytest.mark.parametrize("baseline", [None, *BASELINES])
def test_2bit_is_reachable_and_gives_2_bits_everywhere(analysed, baseline):
    # the one choice that fits: 2 bits and one scale per tensor (groups of 32 or more rows are one group here)
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("2bit"), PlanConfig(), baseline=baseline)
    assert {(m["weight_bits"], m["groups"]) for m in quantized(plan).values()} == {(2, 1)}
    assert plan.totals["weight_bits_mean"] == 2.0


def test_uniform_baseline_at_4bit_gives_4_bits_everywhere(analysed):
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("4bit"), PlanConfig(), baseline="uniform")
    assert {m["weight_bits"] for m in quantized(plan).values()} == {4}
    assert plan.totals["weight_bits_mean"] == 4.0


def test_mean_bits_count_every_scale_beyond_the_first_of_each_tensor(analysed):
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("3bit"), PlanConfig())
    planned = quantized(plan)
    params = sum(math.prod(plan.model["modules"][n]) for n in planned)
    stored = sum(m["weight_bits"] * math.prod(plan.model["modules"][n]) + SCALE_BITS * m["groups"]
                 for n, m in planned.items())
    assert plan.totals["weight_bits_mean_all_scales"] == pytest.approx(stored / params, rel=1e-12)
    assert plan.totals["weight_bits_mean"] == pytest.approx((stored - SCALE_BITS * len(planned)) / params, rel=1e-12)
    assert plan.totals["weight_bits_mean"] <= 3.0 + 1e-9
    # bytes count every scale: the weights plus every scale, plus the float modules at 32 bits
    floats = sum(math.prod(plan.model["modules"][n]) for n, m in plan.modules.items() if m.get("float"))
    assert plan.totals["weight_bytes"] == math.ceil((stored + 32 * floats) / 8)


def random_report(rng: np.random.Generator, layers: int) -> SensitivityReport:
    """Random sensitivities of ``layers`` x two linear modules (``layer.<i>.a``, ``layer.<i>.b``) with
    shapes, curvatures and weight errors drawn at random; finer groups err less, by a random factor."""
    modules = {}
    for layer in range(layers):
        for part in ("a", "b"):
            rows, cols = int(rng.choice([2, 4, 8, 16, 32])), int(rng.integers(1, 48))
            shrink = {"tensor": 1.0, "2": float(rng.uniform(0.3, 1.0)), "channel": float(rng.uniform(0.05, 0.3))}
            modules[f"layer.{layer}.{part}"] = {
                "kind": "linear", "block": layer, "shape": [rows, cols], "params": rows * cols,
                "group_rows": {"tensor": rows, "2": 2, "channel": 1},
                "hessian": {"avg_trace": float(10 ** rng.uniform(-3, 2))},
                "weight_error": {str(b): {g: float(rng.uniform(0.5, 2.0)) * rows * cols * 4.0**-b * f
                                          for g, f in shrink.items()} for b in RANDOM_BITS},
            }
    return SensitivityReport(model={"fingerprint": "random"}, data={}, settings={}, modules=modules)


RANDOM_BITS = (2, 3, 4, 6, 8, 16)


@pytest.mark.parametrize("seed", range(6))
def test_random_instances_never_exceed_a_bits_budget_and_more_budget_never_hurts(seed):
    rng = np.random.default_rng(seed)
    report = random_report(rng, int(rng.integers(1, 5)))
    # odd seeds tie a and b of each layer: a tie group counts each member tensor
    config = PlanConfig(bits=RANDOM_BITS, groups=("tensor", "2", "channel"), keep_float=(),
                        ties=(r"\.(a|b)$",) if seed % 2 else ())
    budgets = sorted({2.0, 16.0, *np.round(rng.uniform(2, 16, 5), 2).tolist()})
    damages = []
    for value in budgets:
        budget = parse_budget(f"{value}bit")
        for baseline in (None, *BASELINES):
            plan = make_plan(report, budget, config, baseline=baseline)
            assert plan.totals["weight_bits_mean"] <= value + 1e-9, (value, baseline)
            if baseline is None:
                damages.append(plan.totals["predicted_damage"])
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(damages)), damages


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
    # the same rule as the budget: 2 bits at one scale per tensor is exactly 2bit
    with pytest.raises(ConfigError, match=r"smallest reachable is 2bit: 11 of 11 planned modules take nothing "
                       r"smaller, e\.g\. bert\.embeddings\.word_embeddings \(shape \[30522, 32\]\), whose least "
                       r"is 2-bit tensor at 2 bits$"):
        make_plan(report, parse_budget("1bit"), PlanConfig())
    with pytest.raises(ConfigError, match=r"smallest reachable is 3bit: 11 of 11 .* whose least is 3-bit tensor at "
                       r"3 bits$"):
        make_plan(report, parse_budget("2.5bit"), PlanConfig(bits=(3, 4, 8)))
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


def _qkv_bits(plan, layer):
    entries = [plan.modules[f"bert.encoder.layer.{layer}.attention.self.{p}"] for p in ("query", "key", "value")]
    return {(entry["weight_bits"], entry["group"]) for entry in entries}


def test_modules_engines_fuse_are_tied_by_default(analysed):
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("3bit"), PlanConfig())
    assert all(len(_qkv_bits(plan, layer)) == 1 for layer in (0, 1))
    assert plan.settings["default_ties"] is True
    free = make_plan(report, parse_budget("3bit"), PlanConfig(default_ties=False))
    assert free.totals["predicted_damage"] <= plan.totals["predicted_damage"] * (1 + 1e-9)  # ties only constrain


def test_default_tie_rules_by_family():
    from qanalyze.plan.ties import default_ties, model_family

    assert model_family("LlamaForCausalLM") == "llama" and model_family("GPT2LMHeadModel") == "gpt2"
    assert any("gate_proj" in rule for rule in default_ties("Qwen2ForCausalLM"))
    assert default_ties("GPT2LMHeadModel") == () and default_ties("UnknownThing") == ()


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


def test_token_activation_group_marks_linear_inputs_and_applies_in_int_mode(analysed):
    report, path, loaded = analysed
    tensor = make_plan(report, parse_budget("4bit"), PlanConfig(), sensitivity_path=path)
    token = make_plan(report, parse_budget("4bit"), PlanConfig(act_group="token"), sensitivity_path=path)
    assert not any("activation_group" in m for m in tensor.modules.values())
    marked = {n for n, m in token.modules.items() if m.get("activation_group") == "token"}
    linears = {i.name for i in inventory(loaded.model) if i.kind == "linear"}
    assert marked and marked <= linears
    # the weights are the same choice: per-token scales only change how inputs are quantized
    strip = {n: {k: v for k, v in m.items() if k != "activation_group"} for n, m in token.modules.items()}
    assert strip == tensor.modules and token.settings["act_group"] == "token"
    applied = apply_plan(copy.deepcopy(loaded.model), token, "int")
    assert {n for n, spec in applied.specs.items() if spec.per_token} == marked
    with pytest.raises(ConfigError, match="act_group 'row'"):
        make_plan(report, parse_budget("4bit"), PlanConfig(act_group="row"))


def test_row_gradient_group_marks_linear_gradients_and_applies_in_int_mode(analysed):
    report, path, loaded = analysed
    tensor = make_plan(report, parse_budget("4bit"), PlanConfig(), sensitivity_path=path)
    rows = make_plan(report, parse_budget("4bit"), PlanConfig(grad_group="row"), sensitivity_path=path)
    marked = {n for n, m in rows.modules.items() if m.get("gradient_group") == "row"}
    linears = {i.name for i in inventory(loaded.model) if i.kind == "linear"}
    assert marked and marked <= linears and rows.settings["grad_group"] == "row"
    strip = {n: {k: v for k, v in m.items() if k != "gradient_group"} for n, m in rows.modules.items()}
    assert strip == tensor.modules
    applied = apply_plan(copy.deepcopy(loaded.model), rows, "int")
    assert {n for n, spec in applied.specs.items() if spec.gradient_group == "row"} == marked
    with pytest.raises(ConfigError, match="grad_group 'token'"):
        make_plan(report, parse_budget("4bit"), PlanConfig(grad_group="token"))


def test_plan_entries_carry_the_weight_range_their_errors_were_measured_with(analysed):
    report, _, _ = analysed
    plan = make_plan(report, parse_budget("4bit"), PlanConfig())
    assert {m["weight_range"] for m in quantized(plan).values()} == {"max"}
    clipped = copy.deepcopy(report)
    clipped.settings["weight_range"] = "mse"
    for baseline in (None, "random"):
        plan = make_plan(clipped, parse_budget("4bit"), PlanConfig(), baseline=baseline)
        assert {m["weight_range"] for m in quantized(plan).values()} == {"mse"}
    bad = plan.to_dict()
    next(m for m in bad["modules"].values() if not m.get("float"))["weight_range"] = "p99"
    with pytest.raises(RecordError, match="weight_range 'p99'"):
        BitPlan.from_dict(bad)
