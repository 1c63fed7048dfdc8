"""Typed plan entries: round trips that keep plan.json byte-identical, defaults, validation, old files,
and the boundaries of qanalyze.plan (check_plan outside the planner, no private imports across modules)."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qanalyze.errors import ConfigError, RecordError
from qanalyze.models import inventory, load_model
from qanalyze.plan import architecture, make
from qanalyze.plan.entries import FloatEntry, QuantizedEntry, entry_from_dict
from qanalyze.plan.uniform import LAYOUTS, uniform_plan
from qanalyze.records import BitPlan

PLAN_DIR = Path(__file__).resolve().parents[2] / "qanalyze" / "plan"

# entries exactly as `make_plan` and `uniform_plan` write them today
MADE = {"weight_bits": 4, "group": "channel", "groups": 32, "activation_bits": None, "gradient_bits": 16,
        "scheme": "symmetric", "rounding": "nearest", "weight_range": "max", "predicted_damage": 1.5e-05}
MADE_TOKEN = {**MADE, "activation_bits": 8, "activation_group": "token", "gradient_group": "row"}
UNIFORM_LINEAR = {"weight_bits": 8, "group": "tensor", "groups": 1, "activation_bits": 8, "gradient_bits": 8,
                  "scheme": "symmetric", "rounding": "nearest", "activation_group": "tensor"}
UNIFORM_EMBEDDING = {k: v for k, v in UNIFORM_LINEAR.items() if k != "activation_group"}
# a plan entry from before weight ranges and scale layouts existed
OLD = {"weight_bits": 6, "group": "head", "groups": 2, "activation_bits": 8, "gradient_bits": 8,
       "scheme": "symmetric", "rounding": "nearest", "predicted_damage": 0.25}


def _plan(modules: dict) -> dict:
    shapes = {name: [64, 32] for name in modules}
    return {"schema": "qanalyze/plan/v1", "model": {"fingerprint": "f", "modules": shapes},
            "budget": {"text": "4bit"}, "objective": "trace", "totals": {}, "modules": modules, "sensitivity": {},
            "solver": {}, "settings": {}, "baseline": None, "versions": {"qanalyze": "0.1.0"}}


@pytest.mark.parametrize("data", [MADE, MADE_TOKEN, UNIFORM_LINEAR, UNIFORM_EMBEDDING, OLD, {"float": True}],
                         ids=["made", "made-token", "uniform-linear", "uniform-embedding", "old", "float"])
def test_every_entry_kind_round_trips_with_the_same_keys_in_the_same_order(data):
    entry = entry_from_dict("m", data)
    assert isinstance(entry, FloatEntry if data.get("float") else QuantizedEntry)
    assert json.dumps(entry.to_dict()) == json.dumps(data)
    assert entry_from_dict("m", entry.to_dict()) == entry


def test_absent_optional_keys_read_as_their_defaults_and_stay_absent():
    entry = entry_from_dict("m", {"weight_bits": 8, "group": "tensor"})
    assert (entry.groups, entry.activation_bits, entry.gradient_bits, entry.predicted_damage) == (None,) * 4
    assert (entry.scheme, entry.rounding, entry.weight_range) == ("symmetric", "nearest", "max")
    assert (entry.activation_group, entry.gradient_group) == ("tensor", "tensor")
    assert entry.omitted == frozenset(QuantizedEntry.OPTIONAL_KEYS)
    assert entry.to_dict() == {"weight_bits": 8, "group": "tensor"}
    # a null that a file holds is kept as a null, not dropped like an absent key
    assert entry_from_dict("m", MADE).to_dict()["activation_bits"] is None


def test_an_entry_made_in_code_writes_every_key_unless_told_to_omit_it():
    entry = QuantizedEntry(name="m", weight_bits=4, group="channel", groups=32, gradient_bits=16,
                           predicted_damage=1.5e-05, omitted={"activation_group", "gradient_group"})
    assert json.dumps(entry.to_dict()) == json.dumps(MADE)
    assert entry.omitted == frozenset({"activation_group", "gradient_group"})  # normalised to a frozenset
    # column_group is written only when the entry has a column layout (plans without one stay as v1 wrote them)
    assert list(QuantizedEntry(name="m", weight_bits=8, group="tensor").to_dict()) == [
        "weight_bits", "group", *(k for k in QuantizedEntry.OPTIONAL_KEYS if k != "column_group")]
    column = QuantizedEntry(name="m", weight_bits=4, group="channel", scheme="asymmetric", column_group="g128")
    assert column.to_dict()["column_group"] == "g128"
    assert QuantizedEntry.from_dict("m", column.to_dict()) == column
    with pytest.raises(RecordError, match="module m: column group"):
        QuantizedEntry(name="m", weight_bits=4, group="channel", column_group="g0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.weight_bits = 8  # type: ignore[misc]
    assert FloatEntry("m").to_dict() == {"float": True} and not FloatEntry("m").quantized and entry.quantized


@pytest.mark.parametrize(("change", "message"), [
    ({"weight_bits": 1}, "plan: module m has weight_bits 1; bits must be integers in 2..16"),
    ({"weight_bits": 17}, "plan: module m has weight_bits 17; bits must be integers in 2..16"),
    ({"activation_bits": "8"}, "plan: module m has activation_bits '8'; bits must be integers in 2..16"),
    ({"gradient_bits": 4.0}, "plan: module m has gradient_bits 4.0; bits must be integers in 2..16"),
    ({"weight_bits": True}, "plan: module m has weight_bits True; bits must be integers in 2..16"),
    ({"weight_bits": None}, "plan: module m has no weight_bits/group and is not float"),
    ({"weight_range": "p99"}, "plan: module m has weight_range 'p99'; known: max, mse"),
])
def test_bad_entries_are_record_errors_naming_module_and_key(change, message):
    with pytest.raises(RecordError) as caught:
        entry_from_dict("m", {**MADE, **change})
    assert str(caught.value) == message
    with pytest.raises(RecordError) as caught:
        BitPlan.from_dict(_plan({"m": {**MADE, **change}}))
    assert str(caught.value) == message
    with pytest.raises(RecordError) as caught:
        QuantizedEntry(name="m", **{"weight_bits": 8, "group": "tensor", **change})
    assert str(caught.value) == message


def test_missing_group_unknown_omissions_and_non_mappings_are_refused():
    with pytest.raises(RecordError, match="module m has no weight_bits/group and is not float"):
        entry_from_dict("m", {"weight_bits": 8})
    with pytest.raises(RecordError, match="omits weight_bits, which are not optional"):
        QuantizedEntry(name="m", weight_bits=8, group="tensor", omitted={"weight_bits"})
    with pytest.raises(RecordError, match="not a mapping"):
        entry_from_dict("m", [8, "tensor"])
    with pytest.raises(RecordError, match="not marked float"):
        FloatEntry.from_dict("m", {"float": False})
    # the first fault of the checks' order is the one named, as before the entries were typed
    with pytest.raises(RecordError, match="activation_bits 1"):
        entry_from_dict("m", {"activation_bits": 1, "weight_range": "p99"})


def test_an_old_plan_file_loads_saves_byte_identically_and_reads_typed(tmp_path):
    modules = {"a": OLD, "b": {"float": True}, "c": UNIFORM_LINEAR, "d": {**MADE, "extra_key_of_a_newer_file": 1}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan(modules), indent=2) + "\n", encoding="utf-8")
    plan = BitPlan.load(path)
    plan.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    entries = plan.entries
    assert list(entries) == ["a", "b", "c", "d"]
    assert entries["a"].weight_range == "max" and entries["a"].group == "head" and entries["a"].predicted_damage == 0.25
    assert entries["b"] == FloatEntry("b") and entries["c"].activation_group == "tensor"
    assert entries["d"].to_dict() == MADE  # unknown keys are ignored, as records ignore unknown fields
    assert plan.entry("a") == entries["a"] and plan.entry("not.in.the.plan") == FloatEntry("not.in.the.plan")
    # `modules` stays the on-disk dict, and the typed view follows changes made to it
    plan.modules["a"]["weight_bits"] = 3
    assert plan.entry("a").weight_bits == 3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_uniform_plans_are_unchanged_by_a_round_trip_through_the_records(layout, tiny_bert_dir):
    model = load_model(str(tiny_bert_dir), num_labels=2).model
    plan = uniform_plan(model, 8, layout=layout, kinds=("linear", "embedding", "layernorm"))
    for name, data in plan.modules.items():
        assert json.dumps(plan.entry(name).to_dict()) == json.dumps(data)
    check_plan = architecture.check_plan
    check_plan(plan, {info.name: list(info.shape) for info in inventory(model)})


def test_check_plan_lives_beside_the_records_and_is_still_importable_from_make():
    assert make.check_plan is architecture.check_plan
    plan = BitPlan.from_dict(_plan({"a": MADE, "b": {"float": True}}))
    architecture.check_plan(plan, {"a": [64, 32], "b": [64, 32]})
    bad = BitPlan.from_dict(_plan({"a": {**MADE, "groups": 3}}))
    with pytest.raises(ConfigError, match="plan module a: 3 groups do not divide its 64 rows"):
        architecture.check_plan(bad, {"a": [64, 32]})


def test_plan_records_import_neither_the_engine_nor_the_planner():
    code = ("import sys, qanalyze.records, qanalyze.plan.entries, qanalyze.plan.architecture; "
            "print(' '.join(m for m in sys.modules if m.startswith(('qanalyze.engine', 'qanalyze.sensitivity', "
            "'qanalyze.plan.make', 'qanalyze.plan.solvers', 'qanalyze.plan.costs'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""


def test_no_module_of_the_planner_imports_another_ones_private_names():
    private = []
    for path in sorted(PLAN_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qanalyze"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
