"""Candidates, costs and predicted damage from hand-made sensitivity reports (and the real one if present)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qanalyze.errors import ConfigError
from qanalyze.plan.costs import (
    SCALE_BITS,
    Candidate,
    ModuleOptions,
    activation_options,
    gradient_bits,
    merge_ties,
    module_options,
    tie_groups,
)
from qanalyze.records import SensitivityReport

REAL = Path(__file__).resolve().parents[2] / "runs" / "bench" / "sensitivity.json"
BITS = (2, 4, 8)
GROUPS = ("tensor", "channel", "head", "2")
SHRINK = {"tensor": 1.0, "channel": 0.25, "head": 0.5, "2": 0.6}  # finer groups, smaller error


def _rows(rows: int, head_dim: int | None) -> dict[str, int]:
    layout = {"tensor": rows, "channel": 1, "2": 2}
    if head_dim:
        layout["head"] = head_dim
    return layout


def entry(kind="linear", shape=(8, 4), *, stage="layers", block=0, head_dim=None, avg_trace=0.5, omega=3.0,
          scale=1.0, activations=True, gradients=None, measured=None):
    """One sensitivity entry: weight error = scale * 4**-bits * SHRINK[group] over the groups that fit."""
    rows = _rows(shape[0], head_dim)
    entry = {
        "kind": kind, "block": block, "stage": stage, "shape": list(shape), "params": math.prod(shape) + shape[0],
        "head_dim": head_dim, "group_rows": rows,
        "hessian": {"avg_trace": avg_trace, "omega": omega},
        "weight_error": {str(b): {g: scale * 4.0**-b * SHRINK[g] for g in rows} for b in BITS},
        "delta_loss": {},
    }
    if activations:
        entry["activation_error"] = {str(b): 10.0 * 4.0**-b for b in BITS}
        entry["activation_weighted_error"] = {str(b): scale * 2.0**-b for b in BITS}
    if gradients:
        entry["gradient_error"] = {str(b): {"weight_grad": w, "input_grad": x} for b, (w, x) in gradients.items()}
    if measured:
        entry["delta_loss"]["measured"] = {str(b): v for b, v in measured.items()}
    return entry


def report(**modules):
    """A report dict; module names use "/" for "." so they can be keyword arguments."""
    return {"schema": "qanalyze/sensitivity/v1", "model": {"fingerprint": "x"}, "data": {}, "settings": {},
            "modules": {name.replace("__", "."): e for name, e in modules.items()}}


def bert_like():
    modules = {"embeddings.word": entry("embedding", (16, 4), stage="embeddings", block=None, activations=False),
               "embeddings.LayerNorm": entry("layernorm", (4,), stage="embeddings", block=None)}
    for layer in (0, 1):
        for proj in ("query", "key", "value"):
            modules[f"encoder.layer.{layer}.attention.self.{proj}"] = entry(shape=(4, 4), block=layer, head_dim=2,
                                                                             scale=1 + layer)
        modules[f"encoder.layer.{layer}.output.dense"] = entry(shape=(4, 8), block=layer)
        modules[f"encoder.layer.{layer}.output.LayerNorm"] = entry("layernorm", (4,), block=layer)
    modules["classifier"] = entry(shape=(2, 4), stage="head", block=None)
    return {"schema": "qanalyze/sensitivity/v1", "model": {"fingerprint": "x"}, "data": {}, "settings": {},
            "modules": modules}


def by_name(options):
    return {o.name: o for o in options}


# --- weight candidates ------------------------------------------------------------------------------------------


def test_candidate_costs_are_bits_times_n_plus_16_per_scale():
    (options,) = module_options(report(q=entry(shape=(8, 4), head_dim=4)), bits=BITS, groups=GROUPS, keep_float=())
    n = 32
    expected_groups = {"tensor": 1, "channel": 8, "head": 2, "2": 4}
    assert options.params == n and options.shape == (8, 4)
    assert {c.label for c in options.candidates} == {(b, g) for b in BITS for g in expected_groups}
    for c in options.candidates:
        assert c.groups == expected_groups[c.group]
        assert c.cost_bits == c.bits * n + SCALE_BITS * c.groups
    assert SCALE_BITS == 16


def test_groups_missing_from_weight_error_are_skipped_and_unrequested_ones_left_out():
    (no_heads,) = module_options(report(d=entry(shape=(8, 4))), bits=BITS, groups=GROUPS, keep_float=())
    assert {c.group for c in no_heads.candidates} == {"tensor", "channel", "2"}
    (some,) = module_options(report(d=entry(shape=(8, 4), head_dim=4)), bits=(4,), groups=("channel", 2),
                             keep_float=())
    assert [c.label for c in some.candidates] == [(4, "2"), (4, "channel")]


def test_unmeasured_bits_raise_naming_module_and_bits():
    with pytest.raises(ConfigError, match=r"module d has no weight error at 3, 5 bits"):
        module_options(report(d=entry()), bits=(2, 3, 5), keep_float=())
    with pytest.raises(ConfigError):
        module_options(report(d=entry()), bits=(1, 2), keep_float=())
    with pytest.raises(ConfigError):
        module_options(report(d=entry()), bits=BITS, groups=("rows",), keep_float=())


def test_trace_objective_uses_average_trace_and_clamps_a_negative_one_to_zero():
    rep = report(up=entry(avg_trace=0.5), down=entry(avg_trace=-1e-4))
    up, down = module_options(rep, bits=BITS, groups=GROUPS, keep_float=())
    for c in up.candidates:
        assert c.damage == pytest.approx(0.5 * 4.0**-c.bits * SHRINK[c.group])
    assert all(c.damage == 0.0 for c in down.candidates)


def test_trace_objective_floors_a_noisy_trace_at_its_standard_error():
    noisy = entry(avg_trace=-1e-4)
    noisy["hessian"]["trace_stderr"] = 3.2  # over n = 8 x 4 weights: 0.1 per weight
    (option,) = module_options(report(noisy=noisy), bits=BITS, groups=GROUPS, keep_float=())
    for c in option.candidates:
        assert c.damage == pytest.approx(0.1 * 4.0**-c.bits * SHRINK[c.group])


def test_eig_objective_uses_omega():
    (options,) = module_options(report(d=entry(omega=3.0, avg_trace=-5.0)), bits=BITS, groups=GROUPS, objective="eig",
                                keep_float=())
    for c in options.candidates:
        assert c.damage == pytest.approx(3.0 * 4.0**-c.bits * SHRINK[c.group])


def test_measured_objective_scales_the_per_channel_measurement_by_the_weight_error_ratio():
    rep = report(d=entry(measured={2: 0.3, 4: 0.1, 8: -0.01}))
    (options,) = module_options(rep, bits=BITS, groups=GROUPS, objective="measured", keep_float=())
    damage = {c.label: c.damage for c in options.candidates}
    assert damage[(2, "channel")] == pytest.approx(0.3)
    assert damage[(2, "tensor")] == pytest.approx(0.3 / SHRINK["channel"])
    assert damage[(4, "2")] == pytest.approx(0.1 * SHRINK["2"] / SHRINK["channel"])
    assert damage[(8, "tensor")] == 0.0  # a negative measured change is noise: clamped


def test_measured_objective_names_the_module_without_a_measurement():
    with pytest.raises(ConfigError, match="module bare has no measured loss change"):
        module_options(report(bare=entry()), bits=BITS, groups=GROUPS, objective="measured", keep_float=())
    with pytest.raises(ConfigError, match=r"module d has no measured loss change at 4 bits"):
        module_options(report(d=entry(measured={2: 0.3, 8: 0.0})), bits=BITS, groups=GROUPS, objective="measured",
                       keep_float=())


def test_unknown_objective_lists_the_known_ones():
    with pytest.raises(ConfigError, match="trace, eig, measured, fisher, output-gradient"):
        module_options(report(d=entry()), objective="hessian-norm")


def test_missing_hessian_metric_is_a_config_error():
    e = entry()
    del e["hessian"]["omega"]
    with pytest.raises(ConfigError, match=r"module d has no hessian\.omega"):
        module_options(report(d=e), bits=BITS, groups=GROUPS, objective="eig", keep_float=())


def test_default_keeps_layer_norms_and_the_task_head_float():
    options = by_name(module_options(bert_like(), bits=BITS, groups=GROUPS))
    floats = {name for name, o in options.items() if o.float}
    assert floats == {"embeddings.LayerNorm", "encoder.layer.0.output.LayerNorm",
                      "encoder.layer.1.output.LayerNorm", "classifier"}
    norm = options["encoder.layer.0.output.LayerNorm"]
    assert norm.candidates == () and norm.float_cost_bits == 32 * 4 == norm.min_cost_bits
    assert options["encoder.layer.0.output.dense"].min_cost_bits == 2 * 32 + 16


@pytest.mark.parametrize(("keep", "floats"), [
    (("embedding",), {"embeddings.word"}),
    (("embeddings",), {"embeddings.word", "embeddings.LayerNorm"}),
    (("head",), {"classifier"}),
    (("re:layer\\.1\\..*(query|key)$",),
     {"encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"}),
    ((), set()),
])
def test_keep_float_by_kind_stage_and_regex(keep, floats):
    rep = bert_like()
    for e in rep["modules"].values():  # let layer norms have bits when not kept float
        e["weight_error"] = {b: {g: v for g, v in errs.items() if g != "2"} for b, errs in e["weight_error"].items()}
    options = module_options(rep, bits=BITS, groups=GROUPS, keep_float=keep)
    assert {o.name for o in options if o.float} == floats


def test_bad_keep_float_items_are_config_errors():
    with pytest.raises(ConfigError, match="module kind"):
        module_options(bert_like(), keep_float=("attention",))
    with pytest.raises(ConfigError, match="regular expression"):
        module_options(bert_like(), keep_float=("re:(",))


def test_candidate_order_is_deterministic_and_sorted_by_cost_bits_group():
    rep = report(q=entry(shape=(4, 4), head_dim=2))
    first = module_options(rep, bits=BITS, groups=GROUPS, keep_float=())
    shuffled = json.loads(json.dumps(rep))
    errors = shuffled["modules"]["q"]["weight_error"]
    shuffled["modules"]["q"]["weight_error"] = {b: dict(reversed(errors[b].items())) for b in reversed(errors)}
    again = module_options(shuffled, bits=tuple(reversed(BITS)), groups=("2", "head", "channel", "tensor"),
                           keep_float=())
    assert first == again
    keys = [(c.cost_bits, c.bits, c.group) for c in first[0].candidates]
    assert keys == sorted(keys)
    # "2" and "head" are the same layout here (2 rows per head): equal cost, the group name breaks the tie
    assert [c.group for c in first[0].candidates[:3]] == ["tensor", "2", "head"]


def test_a_sensitivity_report_object_gives_the_same_options():
    rep = bert_like()
    from_record = module_options(SensitivityReport.from_dict(rep), bits=BITS, groups=GROUPS)
    assert from_record == module_options(rep, bits=BITS, groups=GROUPS)


def test_module_options_validate_themselves():
    c = Candidate(bits=2, group="tensor", groups=1, cost_bits=10.0, damage=1.0)
    d = Candidate(bits=4, group="tensor", groups=1, cost_bits=20.0, damage=0.5)
    with pytest.raises(ConfigError):
        ModuleOptions("m", "linear", 0, 4, (2, 2), (c,), float=True)
    with pytest.raises(ConfigError):
        ModuleOptions("m", "linear", 0, 4, (2, 2), ())
    with pytest.raises(ConfigError):
        ModuleOptions("m", "linear", 0, 4, (2, 2), (d, c))
    assert ModuleOptions("m", "linear", 0, 4, (2, 2), (c, d)).members == ("m",)


# --- ties -------------------------------------------------------------------------------------------------------


QKV = "attention.self.(query|key|value)"


def test_tie_groups_gives_one_group_per_layer():
    options = module_options(bert_like(), bits=BITS, groups=GROUPS)
    ties = tie_groups(options, [QKV])
    names = [[options[i].name for i in tie] for tie in ties]
    assert names == [[f"encoder.layer.{layer}.attention.self.{p}" for p in ("query", "key", "value")]
                     for layer in (0, 1)]


def test_tie_groups_each_module_at_most_once_and_no_match_is_an_error():
    options = module_options(bert_like(), bits=BITS, groups=GROUPS)
    ties = tie_groups(options, [QKV, r"layer\.\d"])
    members = [i for tie in ties for i in tie]
    assert len(members) == len(set(members))
    # the second pattern ties what is left across layers: the output projections of layers 0 and 1
    assert [[options[i].name for i in tie] for tie in ties if len(tie) == 2] == [
        ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]]
    assert ties == sorted(ties)  # in the order of their first member
    with pytest.raises(ConfigError, match="matches no quantized module"):
        tie_groups(options, ["attention.self.nothing"])
    with pytest.raises(ConfigError, match="matches no quantized module"):
        tie_groups(options, ["LayerNorm"])  # kept float: nothing to tie
    with pytest.raises(ConfigError, match="regular expression"):
        tie_groups(options, ["("])


def test_merge_ties_sums_costs_and_damages_over_common_labels():
    rep = bert_like()
    key = rep["modules"]["encoder.layer.0.attention.self.key"]
    for errs in key["weight_error"].values():
        del errs["head"]  # the key lacks per-head groups: the tie cannot use them
    options = module_options(rep, bits=BITS, groups=GROUPS)
    ties = tie_groups(options, [QKV])
    merged = merge_ties(options, ties)
    assert len(merged) == len(options) - 4
    first = merged[2]
    assert first.name == "+".join(f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value"))
    assert first.members == tuple(first.name.split("+"))
    assert first.params == 48 and first.shape == (4, 4) and first.block == 0 and first.kind == "linear"
    members = [by_name(options)[name] for name in first.members]
    assert {c.group for c in first.candidates} == {"tensor", "channel", "2"}
    for c in first.candidates:
        parts = [next(m for m in member.candidates if m.label == c.label) for member in members]
        assert c.cost_bits == sum(p.cost_bits for p in parts)
        assert c.damage == pytest.approx(sum(p.damage for p in parts))
        assert c.groups == sum(p.groups for p in parts)
    assert [o.name for o in merged][5] == first.name.replace("layer.0", "layer.1")
    assert "head" in {c.group for c in merged[5].candidates}  # layer 1 kept every label
    untouched = [o for o in merged if "+" not in o.name]
    assert untouched == [o for i, o in enumerate(options) if not any(i in t for t in ties)]
    assert merge_ties(options, []) == options


def test_merge_ties_refuses_bad_ties():
    options = module_options(bert_like(), bits=BITS, groups=GROUPS)
    with pytest.raises(ConfigError, match="more than one tie"):
        merge_ties(options, [[2, 3], [3, 4]])
    with pytest.raises(ConfigError, match="floating point"):
        merge_ties(options, [[1, 2]])
    with pytest.raises(ConfigError, match="outside"):
        merge_ties(options, [[2, 99]])
    rep = bert_like()
    for proj, keep in (("query", "channel"), ("key", "tensor")):  # no label in common
        e = rep["modules"][f"encoder.layer.0.attention.self.{proj}"]
        e["weight_error"] = {b: {keep: v[keep]} for b, v in e["weight_error"].items()}
    options = module_options(rep, bits=BITS, groups=GROUPS)
    with pytest.raises(ConfigError, match="no \\(bits, group\\) choice in common"):
        merge_ties(options, [[2, 3]])


# --- activations and gradients ----------------------------------------------------------------------------------


def test_activation_options_cost_input_width_and_weigh_by_the_second_order_error():
    options = by_name(activation_options(bert_like(), bits=BITS))
    dense = options["encoder.layer.0.output.dense"]  # shape (4, 8): 8 input features
    assert dense.params == 8 and not dense.float
    assert [(c.bits, c.group, c.groups, c.cost_bits) for c in dense.candidates] == [(b, "tensor", 1, 8.0 * b)
                                                                                    for b in BITS]
    assert [c.damage for c in dense.candidates] == [2.0**-b for b in BITS]
    assert options["embeddings.word"].float  # token ids: no activation data
    assert options["classifier"].float and options["embeddings.LayerNorm"].float  # default keep_float
    norms = by_name(activation_options(bert_like(), bits=BITS, keep_float=()))
    assert not norms["embeddings.LayerNorm"].float and norms["embeddings.LayerNorm"].params == 4


def test_activation_options_errors():
    with pytest.raises(ConfigError, match=r"module d has no activation error at 16 bits"):
        activation_options(report(d=entry()), bits=(2, 16))
    e = entry()
    del e["activation_weighted_error"]
    with pytest.raises(ConfigError, match="module d has activation errors but no activation_weighted_error"):
        activation_options(report(d=e), bits=BITS)
    assert [c.bits for c in activation_options(report(d=entry()), bits=(8, 2))[0].candidates] == [2, 8]


def test_gradient_bits_fewest_bits_meeting_both_errors():
    rep = report(
        easy=entry(gradients={2: (0.04, 0.01), 4: (0.01, 0.001), 8: (0.0, 0.0)}),
        input_bound=entry(gradients={2: (0.01, 0.3), 4: (0.02, 0.06), 8: (0.03, 0.05)}),
        never=entry(gradients={2: (1.0, 1.0), 4: (0.5, 0.5), 8: (0.2, 0.01)}),
        unmeasured=entry(gradients={16: (0.0, 0.0)}),
        no_data=entry(),
    )
    assert gradient_bits(rep, bits=(*BITS, 16), tol=0.05) == {
        "easy": 2, "input_bound": 8, "never": None, "unmeasured": 16, "no_data": None}
    assert gradient_bits(rep, bits=BITS, tol=0.05)["unmeasured"] is None  # 16 not offered
    assert gradient_bits(rep, bits=BITS, tol=0.3)["input_bound"] == 2
    for bad in (0, -0.1, float("nan")):
        with pytest.raises(ConfigError):
            gradient_bits(rep, tol=bad)


# --- the real file ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL.is_file(), reason=f"no benchmark sensitivity file at {REAL} (made by the benchmark run)")
def test_real_minilm_report():
    rep = json.loads(REAL.read_text(encoding="utf-8"))
    options = module_options(rep)
    assert len(options) == len(rep["modules"])
    quantized = [o for o in options if not o.float]
    assert quantized and all(o.candidates for o in quantized)
    for o in quantized:
        entry = rep["modules"][o.name]
        assert o.params == math.prod(entry["shape"])
        assert all(c.cost_bits == c.bits * o.params + 16 * c.groups and c.damage >= 0 for c in o.candidates)
    assert {o.name for o in options if o.float} >= {n for n, e in rep["modules"].items() if e["kind"] == "layernorm"}
    ties = tie_groups(options, [QKV])
    assert all(len(t) == 3 for t in ties) and len(ties) == len({rep["modules"][options[t[0]].name]["block"]
                                                                for t in ties})
    merged = merge_ties(options, ties)
    assert len(merged) == len(options) - 2 * len(ties)
    assert all(isinstance(b, int) or b is None for b in gradient_bits(rep).values())
    activation_options(rep)
