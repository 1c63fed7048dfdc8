"""sweep() end to end on a tiny BERT with real SST-2 sentences: rows, baselines, reuse and resume."""

import dataclasses
import json

import pandas as pd
import pytest

from qanalyze.data import load_task
from qanalyze.engine.train import TrainConfig, TrainingInterrupted
from qanalyze.errors import ConfigError
from qanalyze.methods.qdylora import QDyLoRAConfig
from qanalyze.plan.make import PlanConfig
from qanalyze.records import SweepRecord
from qanalyze.rundir import checkpoint_dir, is_finished_run
from qanalyze.sensitivity.analyze import AnalyzeConfig
from qanalyze.sweep.config import SweepConfig, budget_text
from qanalyze.sweep.run import SweepHooks, sweep
from qanalyze.sweep.table import sweep_table


@pytest.fixture(scope="module")
def sst2(glue_dir):
    return load_task("sst2", str(glue_dir), max_train_examples=48, max_eval_examples=16, seed=0)


def _config(**overrides):
    settings = dict(budgets=("2bit", "4bit"), modes=("qat",), integer_bits=(8,),
                    train=TrainConfig(epochs=1, batch_size=16, max_length=24, save_every=1),
                    analysis=AnalyzeConfig(batches=2, batch_size=8, max_length=24, trace_max_probes=4,
                                           trace_min_probes=2, eig_max_iter=10,
                                           metrics=("eig", "trace", "weights", "activations", "gradients")))
    settings.update(overrides)
    return SweepConfig(**settings)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_bert_dir, sst2):
    out = tmp_path_factory.mktemp("sweep")
    return out, sweep(str(tiny_bert_dir), sst2, _config(), out)


def test_every_budget_and_plan_becomes_a_row(swept):
    out, record = swept
    assert record.complete and SweepRecord.load(out / "sweep.json").rows == record.rows
    assert [(r["budget"], r["plan"]) for r in record.rows] == [
        (b, p) for b in ("2bit", "4bit") for p in ("hessian", "uniform", "random", "reversed")] + [(None, "int8")]
    assert (out / "sensitivity.json").is_file() and (out / "fp32.json").is_file()
    for row in record.rows:
        assert row["metric"] == "accuracy" and 0 <= row["value"] <= 1, row
        assert (out / row["plan_file"]).is_file()
        assert row["delta_pts"] == pytest.approx(100 * (row["value"] - record.fp32["metrics"]["accuracy"]))
    four = {r["plan"]: r for r in record.rows if r["budget"] == "4bit"}
    assert all(is_finished_run(out / r["run"]) for r in four.values())
    # the Hessian plan is the optimum of the damage every baseline is measured by, at (nearly) equal bytes
    for name in ("uniform", "random", "reversed"):
        assert four["hessian"]["predicted_damage"] <= four[name]["predicted_damage"] + 1e-12
        assert four[name]["weight_bits_mean"] <= 4.0 + 1e-9
    assert record.rows[-1]["mode"] == "int" and record.rows[-1]["weight_bits_mean"] == 8


def test_identical_plans_are_trained_once(swept):
    out, record = swept
    two = [r for r in record.rows if r["budget"] == "2bit"]
    # at exactly 2 bits only the all-2-bit plan fits: the baselines equal the Hessian plan
    assert two[0]["status"] == "trained"
    assert all(r["status"] == f"same as {two[0]['run']}" and r["value"] == two[0]["value"] for r in two[1:])
    assert not (out / two[1]["run"]).exists()


def test_table_and_csv_hold_every_row_in_points(swept):
    out, record = swept
    table = sweep_table(record)
    assert table["plan"].iloc[0] == "fp32" and len(table) == len(record.rows) + 1
    assert table["value"].iloc[1] == pytest.approx(100 * record.rows[0]["value"])
    csv = pd.read_csv(out / "sweep.csv")
    assert list(csv.columns) == list(table.columns) and len(csv) == len(table)


def test_a_second_sweep_reuses_finished_runs(swept, tiny_bert_dir, sst2):
    out, record = swept
    stamps = {r["run"]: (out / r["run"] / "metrics.json").stat().st_mtime_ns for r in record.rows
              if r["status"] == "trained"}
    again = sweep(str(tiny_bert_dir), sst2, _config(), out)
    assert {r["status"].split()[0] for r in again.rows} <= {"reused", "same"}
    assert [r["value"] for r in again.rows] == [r["value"] for r in record.rows]
    assert stamps == {run: (out / run / "metrics.json").stat().st_mtime_ns for run in stamps}


def test_an_interrupted_sweep_resumes_its_run_and_redoes_changed_ones(tmp_path, tiny_bert_dir, sst2):
    config = _config(budgets=("4bit",), plans=("hessian", "uniform"), integer_bits=())
    steps = []

    def interrupt(log):
        steps.append(log.step)
        if len(steps) == 5:  # the second run, at its second step
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        sweep(str(tiny_bert_dir), sst2, config, tmp_path, hooks=SweepHooks(on_step=interrupt))
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert not record["complete"] and [r["status"] for r in record["rows"]] == ["trained"]
    assert checkpoint_dir(tmp_path / "runs" / "4bit-uniform-qat") is not None
    resumed = sweep(str(tiny_bert_dir), sst2, config, tmp_path)
    assert [r["status"] for r in resumed.rows] == ["reused", "resumed"] and resumed.complete
    # other training settings: nothing can be reused
    changed = _config(budgets=("4bit",), plans=("hessian",), integer_bits=(),
                      train=TrainConfig(epochs=1, batch_size=16, max_length=24, lr=5e-5))
    assert [r["status"] for r in sweep(str(tiny_bert_dir), sst2, changed, tmp_path).rows] == ["trained"]


def test_an_unrelated_error_on_resume_keeps_the_checkpoint_and_the_finished_runs(tmp_path, tiny_bert_dir, sst2,
                                                                                monkeypatch):
    import qanalyze.sweep.run as sweep_module

    config = _config(budgets=("4bit",), plans=("hessian", "uniform"), integer_bits=())
    steps = []

    def interrupt(log):
        steps.append(log.step)
        if len(steps) == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        sweep(str(tiny_bert_dir), sst2, config, tmp_path, hooks=SweepHooks(on_step=interrupt))
    real_train = sweep_module.train

    def failing(*args, resume=False, **kwargs):
        if resume:  # an error that says nothing about the checkpoint (a full disk, a bad device, ...)
            raise ConfigError("unrelated trouble")
        return real_train(*args, resume=resume, **kwargs)

    monkeypatch.setattr(sweep_module, "train", failing)
    with pytest.raises(ConfigError, match="unrelated trouble"):
        sweep(str(tiny_bert_dir), sst2, config, tmp_path)
    assert checkpoint_dir(tmp_path / "runs" / "4bit-uniform-qat") is not None
    assert is_finished_run(tmp_path / "runs" / "4bit-hessian-qat")


def test_bad_sweeps_are_refused_before_any_work(tmp_path, minilm_dir, sst2):
    with pytest.raises(ConfigError, match="unknown plan kind"):
        _config(plans=("hessian", "best"))
    with pytest.raises(ConfigError, match="budget"):
        _config(budgets=("four",))
    with pytest.raises(ConfigError, match="'fp32' not among qat, int, ptq-dynamic, qdylora, rtn, gptq, int4"):
        _config(modes=("qat", "fp32"))
    with pytest.raises(ConfigError, match="modes repeat"):
        _config(modes=("qat", "qat"))
    with pytest.raises(ConfigError, match="base from each plan"):
        _config(modes=("qdylora",), methods={"qdylora": QDyLoRAConfig(base="nf4")})
    with pytest.raises(ConfigError, match="positive integers"):
        _config(methods={"qdylora": QDyLoRAConfig(eval_ranks=(0, 2))})
    # qat takes per-token inputs too (dynamic per-token fake quantization)
    assert _config(modes=("int", "qat"), plan=PlanConfig(act_group="token")).plan.act_group == "token"
    assert _config(modes=("int", "int4"), plan=PlanConfig(act_group="token")).plan.act_group == "token"
    with pytest.raises(ConfigError, match="--grad-group row: mode qat quantizes each output gradient"):
        _config(modes=("int", "qat"), plan=PlanConfig(grad_group="row"))
    # dynamic PTQ never quantizes a gradient, so it takes any gradient layout
    assert _config(modes=("int", "ptq-dynamic"), plan=PlanConfig(grad_group="row")).plan.grad_group == "row"
    with pytest.raises(ConfigError, match="no trained sst2 head"):
        sweep(str(minilm_dir), sst2, _config(), tmp_path / "out")
    assert not (tmp_path / "out" / "sweep.json").exists()
    assert budget_text("4") == "4bit" and budget_text("3.5") == "3.5bit" and budget_text("12MB") == "12MB"


def test_qdylora_follows_every_plan_and_int4_runs_once(tmp_path, tiny_bert_dir, sst2):
    config = _config(budgets=("4bit",), plans=("hessian", "uniform"), modes=("qat", "qdylora", "int4"),
                     integer_bits=(), methods={"qdylora": QDyLoRAConfig(rank=4, eval_ranks=(1, 2, 4))})
    record = sweep(str(tiny_bert_dir), sst2, config, tmp_path)
    assert [(r["budget"], r["plan"], r["mode"]) for r in record.rows] == [
        ("4bit", "hessian", "qat"), ("4bit", "hessian", "qdylora"), ("4bit", "uniform", "qat"),
        ("4bit", "uniform", "qdylora"), (None, "int4", "int4")]
    assert record.settings["modes"] == ["qat", "qdylora", "int4"] and record.settings["lora"]["rank"] == 4
    for row in record.rows:
        assert row["status"] == "trained" and 0 <= row["value"] <= 1, row
        trained = json.loads((tmp_path / row["run"] / "metrics.json").read_text())
        assert trained["mode"] == row["mode"]
    for row in (r for r in record.rows if r["mode"] == "qdylora"):
        # one run, cut at every rank: the parameters it trains grow with the rank by r x (in + out) per adapter
        assert sorted(row["rank_metrics"], key=int) == ["1", "2", "4"]
        params = [row["rank_parameters"][r] for r in ("1", "2", "4")]
        assert params[1] - params[0] == (params[2] - params[1]) / 2 > 0
    int4 = record.rows[-1]
    assert int4["weight_bits_mean"] == 4 and (tmp_path / int4["plan_file"]).name == "uniform-4.int4.json"
    table = sweep_table(record)
    assert table.loc[table["mode"] == "qdylora", "best_rank"].notna().all()
    assert table.loc[table["mode"] == "qat", "best_rank"].isna().all()
    # the LoRA settings are part of what a finished run must match to be reused
    again = sweep(str(tiny_bert_dir), sst2, config, tmp_path)
    assert {r["status"] for r in again.rows} == {"reused"}
    other_ranks = dataclasses.replace(config, modes=("qdylora",), plans=("hessian",),
                                      methods={"qdylora": QDyLoRAConfig(rank=4, eval_ranks=(2, 4))})
    assert [r["status"] for r in sweep(str(tiny_bert_dir), sst2, other_ranks, tmp_path).rows] == ["trained"]
    changed = sweep(str(tiny_bert_dir), sst2, _config(budgets=("4bit",), plans=("hessian",), modes=("qdylora",),
                                                      integer_bits=(),
                                                      methods={"qdylora": QDyLoRAConfig(rank=2, eval_ranks=(1, 2))}),
                    tmp_path)
    assert [r["status"] for r in changed.rows] == ["trained"]
