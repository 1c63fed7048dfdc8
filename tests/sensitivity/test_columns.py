"""Column-group candidates (g32, g64, g128, row) in the analysis: ΔW bit for bit as `quantize_columns` gives it,
the layouts that do not fit left out, and an LM analysis that records them for linear layers only."""

from __future__ import annotations

import pytest
import torch

from qanalyze.data import load_task
from qanalyze.errors import ConfigError
from qanalyze.models import load_model
from qanalyze.quant.columns import ColumnSpec, quantize_columns
from qanalyze.quant.ggml import GGML_TYPES
from qanalyze.quant.layouts import parse_layout
from qanalyze.sensitivity.analyze import LM_DEFAULT_GROUPS, AnalyzeConfig, analyze
from qanalyze.sensitivity.candidates import CandidateSteps
from qanalyze.sensitivity.errors import all_weight_errors

SIZES = {"g32": 32, "g64": 64, "row": None}


def _reference(weight: torch.Tensor, bits: int, group: str) -> torch.Tensor:
    return quantize_columns(weight, ColumnSpec(bits, SIZES[group], symmetric=False)).dequantize() - weight


def test_column_deltas_are_quantize_columns_bit_for_bit():
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    steps = CandidateSteps(weight, (2, 3, 4, 8, 12), ("channel", "g32", "g64", "g128", "row"))
    # g128 does not divide 64 columns, and 12 bits is no column width: neither is a candidate
    assert set(steps.columns) == {"g32", "g64", "row"}
    assert all(set(by_bits) == {2, 3, 4, 8} for by_bits in steps.columns.values())
    assert (12, "g32") not in set(steps.candidates()) and (12, "channel") in set(steps.candidates())
    rows = torch.tensor([5, 1, 23])
    for bits in (2, 3, 4, 8):
        for group in SIZES:
            expected = _reference(weight, bits, group)
            assert torch.equal(steps.delta(bits, group), expected), (bits, group)
            assert torch.equal(steps.delta(bits, group, slice(3, 9)), expected[3:9])
            assert torch.equal(steps.delta(bits, group, rows), expected[rows])


def test_column_weight_errors_and_weighted_errors_sum_those_deltas():
    generator = torch.Generator().manual_seed(1)
    weight, fisher = torch.randn(16, 64, generator=generator), torch.rand(16, 64, generator=generator)
    errors = all_weight_errors(weight, (2, 4, 9), ("tensor", "g32", "g64", "g128", "row"))
    weighted = CandidateSteps(weight, (2, 4, 9), ("tensor", "g32", "g64", "g128", "row")).weighted_errors(fisher)
    assert set(errors[9]) == set(weighted[9]) == {"tensor"}
    for bits in (2, 4):
        assert set(errors[bits]) == set(weighted[bits]) == {"tensor", "g32", "g64", "row"}
        for group in SIZES:
            delta = _reference(weight, bits, group).to(torch.float64)
            assert errors[bits][group] == pytest.approx(float(delta.square().sum()), rel=1e-12)
            assert weighted[bits][group] == pytest.approx(float((fisher.double() * delta.square()).sum()), rel=1e-9)
    assert errors[2]["g32"] < errors[2]["row"]  # finer groups, less error
    # a norm's gain has no input columns: no column candidate
    assert all_weight_errors(torch.ones(8), (4,), ("g32", "row", "tensor")) == {4: {"tensor": 0.0}}


def test_layout_names():
    assert [parse_layout(g) for g in ("g0128", "row", "128", 64, "channel")] == ["g128", "row", "128", "64", "channel"]
    for bad in ("g", "g0", "rows", "x32"):
        with pytest.raises(ConfigError, match="column layout"):
            parse_layout(bad)
    AnalyzeConfig(groups=("g32", "row", "channel"))
    with pytest.raises(ConfigError, match="column layout"):
        AnalyzeConfig(groups=("g-1",))


@pytest.fixture(scope="module")
def llama_report(tmp_path_factory, tiny_llama_dir, wikitext_sample_dir):
    """The tiny LLaMA (hidden 32, intermediate 64) analyzed on the lm task at the LM default layouts."""
    loaded = load_model(str(tiny_llama_dir), eager_attention=True)
    data = load_task("lm", str(wikitext_sample_dir), seq_len=24)
    config = AnalyzeConfig(batches=2, batch_size=1, bits=(2, 3, 4, 5, 6, 8, 12, 16), groups=LM_DEFAULT_GROUPS,
                           metrics=("weights", "fisher", "output-gradient"), score_bits=(2, 4))
    return analyze(loaded, data, config, tmp_path_factory.mktemp("columns") / "sensitivity.json")


def test_lm_analysis_measures_column_layouts_of_linear_layers_only(llama_report):
    modules = llama_report.modules
    embedding = modules["model.embed_tokens"]
    assert "column_groups" not in embedding and all(not e for e in embedding["weight_error"].values())
    up, down = modules["model.layers.0.mlp.up_proj"], modules["model.layers.1.mlp.down_proj"]
    # 32 input columns take g32 and row, 64 take g64 too; g128 fits neither; llama.cpp's legacy types (blocks of
    # 32) fit both, its k-quants (super-blocks of 256) neither
    legacy = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    assert up["column_groups"] == {"g32": 1, "row": 1, **dict.fromkeys(legacy, 1)}
    assert down["column_groups"] == {"g32": 2, "g64": 1, "row": 1, **dict.fromkeys(legacy, 2)}
    assert up["group_rows"] == {}
    assert set(down["weight_error"]["4"]) == {"g32", "g64", "row", "Q4_0", "Q4_1"} and down["weight_error"]["12"] == {}
    assert set(down["weight_error"]["8"]) == {"g32", "g64", "row", "Q8_0"}
    assert set(down["fisher_error"]["3"]) == {"g32", "g64", "row"}
    assert set(down["output_gradient_error"]["2"]) == {"g32", "g64", "row"}
    assert down["fisher_error"]["2"]["g32"] > down["fisher_error"]["4"]["g32"] > 0
    assert down["output_gradient_error"]["2"]["row"] > down["output_gradient_error"]["4"]["row"] > 0


def test_an_lm_analysis_defaults_to_column_layouts(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    from qanalyze import verbs

    data = load_task("lm", str(wikitext_sample_dir), seq_len=24)
    report = verbs.analyze(str(tiny_llama_dir), data, AnalyzeConfig(batches=1, batch_size=1, bits=(2, 4)),
                           tmp_path / "s.json")
    assert report.settings["groups"] == ["g32", "g64", "g128", "row", *GGML_TYPES]
    assert set(report.modules["model.layers.0.self_attn.q_proj"]["fisher_error"]["2"]) == {"g32", "row"}


def test_partial_column_deltas_equal_quantize_columns():
    from qanalyze.quant.columns import ColumnSpec, quantize_columns
    from qanalyze.sensitivity.candidates import CandidateSteps

    weight = torch.randn(6, 80, generator=torch.Generator().manual_seed(1))
    steps = CandidateSteps(weight, (3, 4), ("g32p", "g32"))
    assert (3, "g32p") in set(steps.candidates()) and (3, "g32") not in set(steps.candidates())
    for bits in (3, 4):
        expected = quantize_columns(weight, ColumnSpec(bits, 32, symmetric=False, partial_last=True))
        assert torch.equal(steps.delta(bits, "g32p"), expected.dequantize() - weight)
        assert torch.equal(steps.delta(bits, "g32p", slice(1, 4)), (expected.dequantize() - weight)[1:4])
