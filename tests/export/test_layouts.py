"""Which entries each format stores exactly, and --snap up: the layouts come from the planner's TARGETS table,
a snapped entry is never less precise, and what cannot be stored is refused by module name."""

from __future__ import annotations

import pytest

from qanalyze.errors import ConfigError
from qanalyze.export.layouts import ModuleLayout, express, snap_up
from qanalyze.export.registry import EXPORTERS, get_exporter
from qanalyze.quant.targets import TARGETS


def _layout(bits, group, columns=576, name="model.layers.0.self_attn.q_proj"):
    return ModuleLayout(name, bits, group, False, (576, columns))


def test_every_exporter_names_a_target_of_the_planner_table():
    assert {"compressed-tensors", "gptq", "torchao"} <= set(EXPORTERS)
    for exporter in EXPORTERS.values():
        assert exporter.target in TARGETS and exporter.description
    with pytest.raises(ConfigError, match=r"unknown export format 'onnx'; known: .*compressed-tensors.*gptq"):
        get_exporter("onnx")


def test_a_g128p_entry_is_plain_g128_where_128_divides_the_width():
    assert _layout(4, 128, columns=1536).layout == "g128"
    assert _layout(4, 128, columns=576).layout == "g128p"
    assert _layout(4, None).layout == "row"


def test_listed_layouts_are_kept_and_others_refused_without_snap():
    kept = express([_layout(4, 64)], "gptq", "gptq")
    assert kept.exact == 1 and not kept.snapped
    with pytest.raises(ConfigError, match=r"gptq cannot store model\.layers\.0\.self_attn\.q_proj at 5-bit g64 "
                                          r"asym .*stores 2-bit g128, .*pass --snap up"):
        express([_layout(5, 64)], "gptq", "gptq")


def test_snap_up_takes_the_cheapest_layout_at_least_as_precise():
    # 5 bits -> 8 (gptq has no 5 or 6); g128p on 576 columns -> g64 (128 does not divide 576, 64 does)
    assert snap_up(_layout(5, 64), TARGETS["gptq"]) == _layout(8, 64)
    assert snap_up(_layout(3, 128), TARGETS["gptq"]) == _layout(3, 64)
    assert snap_up(_layout(3, 128), TARGETS["compressed-tensors"]) == _layout(4, 64)
    # torchao's 4-bit groups: a per-row 3-bit entry goes to 4-bit groups of 128, no wider than a row
    assert snap_up(_layout(3, None), TARGETS["torchao"]) == _layout(4, 64)
    for target in ("gptq", "compressed-tensors", "torchao"):
        for bits in range(2, 9):
            for group in (32, 64, 128, None):
                moved = snap_up(_layout(bits, group), TARGETS[target])
                if moved is not None:
                    assert moved.bits >= bits and (moved.group_size or 10**9) <= (group or 10**9)
                    assert TARGETS[target].allows(moved.bits, moved.layout)


def test_snap_records_each_move_and_refuses_what_nothing_covers():
    done = express([_layout(3, 64), _layout(4, 64, name="b")], "compressed-tensors", "compressed-tensors",
                   snap="up")
    assert done.exact == 1 and [(s.name, s.planned, s.stored) for s in done.snapped] == [
        ("model.layers.0.self_attn.q_proj", "3-bit g64 asym", "4-bit g64 asym")]
    with pytest.raises(ConfigError, match="no layout at least as precise fits"):
        express([_layout(8, 64)], "torchao", "torchao", snap="up")  # torchao's 8 bits are per row only
    with pytest.raises(ConfigError, match="its codes are fixed"):
        express([_layout(3, 64)], "torchao", "torchao", snap="up", can_snap=False)
