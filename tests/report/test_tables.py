"""Report tables from the fixture records: the numbers the figures show, checked against their sources."""

import pandas as pd
import pytest
from scipy.stats import spearmanr

from qanalyze.records import BitPlan, SensitivityReport, SweepRecord
from qanalyze.report.tables import (
    damage_agreement,
    error_table,
    plan_table,
    plan_totals,
    predictor_table,
    rank_table,
    results_table,
    sensitivity_table,
    short_name,
    spearman_table,
    verdict_table,
)
from qanalyze.sweep.table import sweep_table

from .conftest import write_sweep_folder


def test_short_names_drop_the_shared_prefix():
    assert short_name("bert.encoder.layer.0.attention.self.query") == "layer.0.attention.self.query"
    assert short_name("bert.embeddings.word_embeddings") == "embeddings.word_embeddings"
    assert short_name("classifier") == "classifier"


def test_sensitivity_and_error_tables_follow_the_record(sweep_folder):
    report = SensitivityReport.load(sweep_folder / "sensitivity.json")
    table = sensitivity_table(report)
    assert len(table) == len(report.modules)
    first_name, first = next(iter(report.modules.items()))
    assert table["module"].iloc[0] == short_name(first_name)
    assert table["omega"].iloc[0] == first["hessian"]["omega"]
    assert table["eig_std"].iloc[0] == pytest.approx(pd.Series(first["hessian"]["eigenvalues"]).std(ddof=0))
    weights = error_table(report, "weight")
    assert list(weights.columns) == [2, 3, 4, 5, 6, 8, 12, 16]
    assert weights.loc[short_name(first_name), 4] == first["weight_error"]["4"]["channel"]
    gradients = error_table(report, "gradient")
    assert set(gradients.index) == {short_name(n) for n, e in report.modules.items() if "gradient_error" in e}


def test_spearman_table_equals_scipy(sweep_folder):
    predictions = predictor_table(SensitivityReport.load(sweep_folder / "sensitivity.json"))
    table = spearman_table(predictions)
    at4 = predictions[predictions["bits"] == 4]
    for predictor in ("trace", "eig", "fisher"):
        expected = spearmanr(at4[predictor], at4["measured"]).statistic
        assert table.set_index("bits").loc[4, predictor] == pytest.approx(expected)


def test_plan_table_marks_float_modules(sweep_folder):
    plan = BitPlan.load(sweep_folder / "plans" / "plan-4bit.json")
    table = plan_table(plan)
    assert len(table) == len(plan.modules)
    assert table.loc[table["module"] == "classifier", "float"].item()
    assert (table.loc[~table["float"], "weight_bits"] >= 2).all()
    # plans without the field use the max rule; a clipped plan says so per module and in its totals
    assert set(table.loc[~table["float"], "weight_range"]) == {"max"}
    clipped = plan.to_dict()
    for spec in clipped["modules"].values():
        if not spec.get("float"):
            spec["weight_range"] = "mse"
    clipped = BitPlan.from_dict(clipped)
    assert set(plan_table(clipped).loc[~table["float"], "weight_range"]) == {"mse"}
    assert plan_totals(clipped).set_index("quantity").loc["weight_range", "value"] == "mse"


def test_verdict_says_plainly_when_the_hessian_plan_loses(tmp_path, sweep_folder):
    verdicts = verdict_table(results_table(SweepRecord.load(sweep_folder / "sweep.json")))
    assert list(zip(verdicts["budget"], verdicts["mode"])) == [("3bit", "qat"), ("4bit", "qat"), ("8bit", "qat"),
                                                               ("4bit", "qdylora")]
    wins = verdicts[verdicts["mode"] == "qat"]
    assert wins["hessian_ahead"].all()
    assert wins.set_index("budget").loc["4bit", "margin_pts"] == pytest.approx(0.8)
    # qdylora compares its own runs: the Hessian-plan base 1 pt ahead of the uniform one (the only baseline run)
    lora = verdicts[verdicts["mode"] == "qdylora"].iloc[0]
    assert lora["best_baseline"] == "uniform" and lora["margin_pts"] == pytest.approx(1.0)
    losing = write_sweep_folder(tmp_path, hessian_wins=False)
    loses = verdict_table(results_table(SweepRecord.load(losing / "sweep.json")))
    loses = loses[loses["mode"] == "qat"]
    assert not loses["hessian_ahead"].any()
    assert loses.set_index("budget").loc["4bit", "best_baseline"] == "reversed"


def test_damage_agreement_ranks_plans(sweep_folder):
    results = results_table(SweepRecord.load(sweep_folder / "sweep.json"))
    agreement = damage_agreement(results)  # the first plan mode: qat's 12 plans, not qdylora's 2
    assert agreement["mode"] == "qat" and agreement["plans"] == 12 and -1 <= agreement["spearman"] <= 1
    assert damage_agreement(results, "qdylora") == {"mode": "qdylora", "plans": 2, "spearman": None}


def test_rank_table_reads_qdylora_rows_and_runs(sweep_folder):
    sweep = SweepRecord.load(sweep_folder / "sweep.json")
    table = rank_table(sweep, {})
    assert list(table["label"].unique()) == ["4bit hessian", "4bit uniform"]
    hessian = table[table["label"] == "4bit hessian"]
    assert list(hessian["rank"]) == [1, 2, 4, 8] and list(hessian["trainable_parameters"]) == [130, 194, 322, 578]
    assert hessian["value"].tolist() == pytest.approx([81.0, 82.0, 84.0, 84.0])
    assert hessian["delta_pts"].tolist() == pytest.approx([-4.0, -3.0, -1.0, -1.0])
    table = sweep_table(sweep)
    best = table[(table["mode"] == "qdylora") & (table["plan"] == "hessian")].iloc[0]
    assert best["best_rank"] == 4 and best["best_rank_value"] == pytest.approx(84.0)  # the smaller of equal ranks
    assert rank_table(None, {}).empty


def test_a_budget_where_every_baseline_is_the_hessian_plan_is_not_a_contest(sweep_folder):
    results = results_table(SweepRecord.load(sweep_folder / "sweep.json"))
    three = (results["budget"] == "3bit") & (results["mode"] == "qat")
    hessian = results.loc[three & (results["plan"] == "hessian"), "value"].item()
    copies = three & results["plan"].isin(["uniform", "random", "reversed"])
    results.loc[copies, "value"] = hessian
    results.loc[copies, "status"] = "same as runs/3bit-hessian-qat"
    verdicts = verdict_table(results).set_index(["budget", "mode"])
    assert verdicts.loc[("3bit", "qat"), "identical_plans"] and not verdicts.loc[("4bit", "qat"), "identical_plans"]
    assert damage_agreement(results)["plans"] == 9  # the three copies of one run count once


def test_layer_by_module_type_holds_each_repeated_modules_predicted_damage():
    from qanalyze.records import SensitivityReport
    from qanalyze.report.tables import layer_type_table

    def entry(block, trace, error):
        return {"kind": "linear", "block": block, "shape": [4, 4], "params": 16, "hessian": {"avg_trace": trace},
                "weight_error": {"4": {"channel": error}}}

    modules = {f"model.layers.{i}.self_attn.{p}": entry(i, 2.0 + i, 0.5)
               for i in range(3) for p in ("q_proj", "o_proj")}
    modules["model.embed_tokens"] = entry(None, 9.0, 1.0)  # outside the layers: left out
    modules["model.layers.2.mlp.down_proj"] = entry(2, -1.0, 0.5)  # a negative trace is no curvature: 0
    report = SensitivityReport(model={"fingerprint": "x"}, data={}, settings={}, modules=modules)
    table = layer_type_table(report)
    assert list(table.index) == [0, 1, 2]
    assert table.loc[1, "self_attn.q_proj"] == pytest.approx(3.0 * 0.5)
    assert table.loc[2, "mlp.down_proj"] == 0.0 and pd.isna(table.loc[0, "mlp.down_proj"])


def test_perplexity_is_shown_as_it_is_and_rates_in_points():
    from qanalyze.metrics import display_scale, display_unit

    assert display_scale("perplexity") == 1.0 and display_unit("perplexity") == ""
    assert display_scale("accuracy") == 100.0 and display_unit("accuracy") == " (points)"
