"""Column layouts (g32, g64, g128, row) in the planner: exact storage, plan entries, ties, budgets, the uniform
(bits, layout) configurations and llama.cpp's rule mix, from a tiny random LLaMA's analysis and by hand."""

from __future__ import annotations

import math

import pytest

from qanalyze.data import load_task
from qanalyze.errors import ConfigError
from qanalyze.models import inventory, load_model
from qanalyze.plan.architecture import check_plan
from qanalyze.plan.baselines import rule_mix_modules, use_more_bits
from qanalyze.plan.budget import parse_budget
from qanalyze.plan.costs import module_options, resolve_groups
from qanalyze.plan.make import RULE_MIX, PlanConfig, make_plan, uniform_layout_plan, uniform_layouts
from qanalyze.quant.columns import ColumnSpec, storage_bits
from qanalyze.sensitivity.analyze import LM_DEFAULT_GROUPS, AnalyzeConfig, analyze

SIZES = {"g32": 32, "g64": 64, "g128": 128, "row": None}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_llama_dir, wikitext_sample_dir):
    """The tiny LLaMA (2 layers, hidden 32, intermediate 64, tied embeddings) analyzed on the lm task."""
    loaded = load_model(str(tiny_llama_dir), eager_attention=True)
    data = load_task("lm", str(wikitext_sample_dir), seq_len=24)
    config = AnalyzeConfig(batches=2, batch_size=1, groups=LM_DEFAULT_GROUPS, metrics=("weights", "fisher"))
    report = analyze(loaded, data, config, tmp_path_factory.mktemp("plan-columns") / "sensitivity.json")
    return report, {info.name: list(info.shape) for info in inventory(loaded.model)}


def _cost(entry: dict, shape: list[int]) -> int:
    return storage_bits(shape[0], shape[1], ColumnSpec(entry["weight_bits"], SIZES[entry["column_group"]],
                                                       symmetric=False))


def test_column_costs_are_storage_bits_exactly():
    entry = {"kind": "linear", "shape": [8, 64], "weight_error": {"3": {"g32": 1.0, "row": 2.0, "channel": 3.0}},
             "column_groups": {"g32": 2, "row": 1}, "group_rows": {"channel": 1}, "hessian": {"avg_trace": 1.0}}
    (option,) = module_options({"modules": {"m": entry}}, bits=(3,), groups=("g32", "g64", "row", "channel"),
                               keep_float=())
    found = {c.group: (c.groups, c.cost_bits) for c in option.candidates}
    assert found == {"g32": (16, storage_bits(8, 64, ColumnSpec(3, 32, symmetric=False))),
                     "row": (8, storage_bits(8, 64, ColumnSpec(3, None, symmetric=False))),
                     "channel": (8, 3 * 8 * 64 + 16 * 8)}
    assert found["g32"][1] == 3 * 512 + 16 * 16 + 3 * 16  # bits·n + 16·groups + bits·groups (zero points)


def test_auto_groups_follow_the_task():
    assert resolve_groups(("auto",), "lm") == ("g32", "g64", "g128", "row")
    assert resolve_groups(("auto",), "classification") == ("tensor", "channel", "head", "128", "64", "32")
    assert resolve_groups(("g64", "row"), "classification") == ("g64", "row")
    with pytest.raises(ConfigError, match="auto"):
        resolve_groups(("auto", "g32"), "lm")


def test_column_plan_of_a_tiny_llama(analysed):
    report, shapes = analysed
    plan = make_plan(report, parse_budget("4bit"), PlanConfig())  # auto: the column layouts for task lm
    assert plan.settings["groups"] == ["g32", "g64", "g128", "row"]
    check_plan(plan, shapes)
    planned = {n: m for n, m in plan.modules.items() if not m.get("float")}
    assert set(planned) == {n for n, e in report.modules.items() if e["kind"] == "linear"}
    assert plan.modules["model.embed_tokens"] == {"float": True}  # no column layout: kept float, as GPTQ does
    for name, entry in planned.items():
        assert entry["column_group"] in ("g32", "g64", "row") and entry["scheme"] == "asymmetric", name
        assert entry["group"] == "channel" and entry["gradient_bits"] == 16
        per_row = 1 if entry["column_group"] == "row" else shapes[name][1] // SIZES[entry["column_group"]]
        assert entry["groups"] == shapes[name][0] * per_row
    cost = sum(_cost(entry, shapes[name]) for name, entry in planned.items())
    params = sum(math.prod(shapes[name]) for name in planned)
    assert plan.budget["capacity_bits"] == 4 * params + 16 * len(planned)
    assert cost <= plan.budget["capacity_bits"] and plan.totals["weight_bits_mean"] <= 4
    assert plan.totals["weight_bits_mean_all_scales"] == cost / params
    for layer in (0, 1):  # default ties: q/k/v and gate/up share bits and layout
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parts = "self_attn" if "q_proj" in members else "mlp"
            chosen = {(planned[f"model.layers.{layer}.{parts}.{m}"]["weight_bits"],
                       planned[f"model.layers.{layer}.{parts}.{m}"]["column_group"]) for m in members}
            assert len(chosen) == 1, (layer, members)


def test_group_sizes_accept_column_names_and_row_layouts_mix(analysed):
    report, _ = analysed
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: none of the groups g64 applies"):
        make_plan(report, parse_budget("8bit"), PlanConfig(groups=("g64",)))  # 32 input columns
    # the LM analysis measured column layouts only: a row layout has nothing to plan a linear layer with
    with pytest.raises(ConfigError, match="none of the groups channel applies"):
        make_plan(report, parse_budget("8bit"), PlanConfig(groups=("channel",), keep_float=("rmsnorm", "embedding")))


def test_uniform_layouts_list_what_fits_with_exact_bytes(analysed):
    report, shapes = analysed
    layouts = uniform_layouts(report)
    labels = {(u.bits, u.group) for u in layouts}
    # g64 and g128 do not divide the 32 input columns of q/k/v/o/gate/up: no uniform configuration
    assert labels == {(b, g) for b in (2, 3, 4, 5, 6, 8) for g in ("g32", "row")}
    assert [u.cost_bits for u in layouts] == sorted(u.cost_bits for u in layouts)
    for u in layouts[:3]:
        plan = uniform_layout_plan(report, u.bits, u.group)
        assert plan.baseline == "uniform" and plan.budget["text"] == f"uniform:{u.bits}:{u.group}"
        assert plan.totals["weight_bytes"] == u.weight_bytes
        planned = {n: m for n, m in plan.modules.items() if not m.get("float")}
        assert {(m["weight_bits"], m["column_group"]) for m in planned.values()} == {(u.bits, u.group)}
        assert sum(_cost(m, shapes[n]) for n, m in planned.items()) == u.cost_bits
    with pytest.raises(ConfigError, match=r"uniform:3:g64 does not apply to module model\.layers\.0\.self_attn"):
        uniform_layout_plan(report, 3, "g64")


def test_use_more_bits_is_llama_cpp_s_rule():
    # llama.cpp, 32 layers: the first and last 4, and every third between (6, 9, ..., 27)
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, *range(6, 28, 3), 28, 29, 30, 31]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    names = [f"model.layers.{i}.{part}" for i in range(16) for part in ("self_attn.v_proj", "mlp.down_proj",
                                                                         "self_attn.q_proj")]
    favoured = rule_mix_modules(names)
    assert favoured == {f"model.layers.{i}.{p}" for i in (0, 1, 4, 7, 10, 13, 14, 15)
                        for p in ("self_attn.v_proj", "mlp.down_proj")}
    with pytest.raises(ConfigError, match="needs a decoder"):
        rule_mix_modules(["bert.encoder.layer.0.attention.self.value"])


def test_rule_mix_plan_of_a_tiny_llama(analysed):
    report, _ = analysed
    plan = make_plan(report, parse_budget("4.2bit"), PlanConfig(), baseline=RULE_MIX)
    assert plan.baseline == RULE_MIX and plan.totals["weight_bits_mean"] <= 4.2
    planned = {n: m for n, m in plan.modules.items() if not m.get("float")}
    assert len({m["column_group"] for m in planned.values()}) == 1
    base = planned["model.layers.0.mlp.down_proj"]["weight_bits"]
    # 2 layers: use_more_bits picks layer 1 only; its v_proj (and, tied with it, q/k) and down_proj get 2 more
    more = {f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")} | {"model.layers.1.mlp.down_proj"}
    assert {n: m["weight_bits"] for n, m in planned.items()} == {n: base + 2 if n in more else base for n in planned}
    # the largest base that fits: one more bit everywhere would not
    assert base == 3
    untied = make_plan(report, parse_budget("4.2bit"), PlanConfig(default_ties=False), baseline=RULE_MIX)
    bits = {n: m["weight_bits"] for n, m in untied.modules.items() if not m.get("float")}
    assert bits["model.layers.1.self_attn.v_proj"] == bits["model.layers.1.self_attn.q_proj"] + 2
    with pytest.raises(ConfigError, match="cannot be reached"):
        make_plan(report, parse_budget("2bit"), PlanConfig(), baseline=RULE_MIX)


def test_a_target_offers_only_what_its_engine_loads(analysed):
    from qanalyze.quant.targets import get_target

    report, shapes = analysed
    plan = make_plan(report, parse_budget("6bit"), PlanConfig(target="gguf"))
    check_plan(plan, shapes)
    chosen = {(m["weight_bits"], m["column_group"]) for m in plan.modules.values() if not m.get("float")}
    assert chosen and all(get_target("gguf").allows(*pair) for pair in chosen)
    assert plan.settings["target"] == "gguf"
    torchao = make_plan(report, parse_budget("6bit"), PlanConfig(target="torchao"))
    assert all(get_target("torchao").allows(m["weight_bits"], m["column_group"])
               for m in torchao.modules.values() if not m.get("float"))
    with pytest.raises(ConfigError, match="target gguf runs none of the candidates of"):
        make_plan(report, parse_budget("6bit"), PlanConfig(target="gguf", groups=("row",)))
    with pytest.raises(ConfigError, match="unknown target 'vllm'"):
        PlanConfig(target="vllm")


def test_gguf_plans_are_not_tied_by_default_and_fused_targets_are(analysed):
    from qanalyze.plan.make import _prepare

    report, _ = analysed
    for target, tied in (("gptq", True), ("any", True), ("gguf", False)):
        planned = _prepare(report, PlanConfig(target=target))[3]
        merged = [option.name for option in planned if "+" in option.name]
        assert bool(merged) == tied, target
        assert not tied or any("q_proj" in name and "v_proj" in name for name in merged)
