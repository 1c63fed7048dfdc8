"""Report tables from the fixture records: the numbers the figures show, checked against their sources."""

import pandas as pd
import pytest
from scipy.stats import spearmanr

from qanalyze.records import BitPlan, SensitivityReport, SweepRecord
from qanalyze.report.tables import (
    damage_agreement,
    error_table,
    plan_table,
    predictor_table,
    results_table,
    sensitivity_table,
    short_name,
    spearman_table,
    verdict_table,
)

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


def test_verdict_says_plainly_when_the_hessian_plan_loses(tmp_path, sweep_folder):
    wins = verdict_table(results_table(SweepRecord.load(sweep_folder / "sweep.json")))
    assert list(wins["budget"]) == ["3bit", "4bit", "8bit"] and wins["hessian_ahead"].all()
    assert wins.set_index("budget").loc["4bit", "margin_pts"] == pytest.approx(0.8)
    losing = write_sweep_folder(tmp_path, hessian_wins=False)
    loses = verdict_table(results_table(SweepRecord.load(losing / "sweep.json")))
    assert not loses["hessian_ahead"].any()
    assert loses.set_index("budget").loc["4bit", "best_baseline"] == "reversed"


def test_damage_agreement_ranks_plans(sweep_folder):
    agreement = damage_agreement(results_table(SweepRecord.load(sweep_folder / "sweep.json")))
    assert agreement["plans"] == 12 and -1 <= agreement["spearman"] <= 1
