"""The library verbs the CLI calls: each makes its own outputs, refuses bad input before writing, and
returns a typed record."""

import pytest

import qanalyze
from qanalyze.data import load_task
from qanalyze.engine.train import TrainConfig
from qanalyze.errors import ConfigError, OutputDirError
from qanalyze.plan.make import PlanConfig
from qanalyze.records import BitPlan, EvalRecord, RunRecord
from qanalyze.sensitivity.analyze import AnalyzeConfig

CONFIG = TrainConfig(max_steps=2, batch_size=16, max_length=24, seed=0, device="cpu")


@pytest.fixture(scope="module")
def sst2(glue_dir):
    return load_task("sst2", str(glue_dir), max_train_examples=32, max_eval_examples=16, seed=0)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, tiny_bert_dir, sst2):
    out = tmp_path_factory.mktemp("verbs") / "fp32"
    record = qanalyze.train(str(tiny_bert_dir), sst2, CONFIG, out)
    return out, record


def test_train_makes_its_run_directory_and_refuses_a_finished_one(fp32_run, sst2, tiny_bert_dir):
    out, record = fp32_run
    assert isinstance(record, RunRecord) and record.mode == "fp32" and (out / "metrics.json").is_file()
    with pytest.raises(OutputDirError, match="is a qanalyze run"):
        qanalyze.train(str(tiny_bert_dir), sst2, CONFIG, out)


def test_a_plan_the_method_cannot_run_leaves_no_folder(tmp_path, fp32_run, sst2):
    out, _ = fp32_run
    with pytest.raises(ConfigError, match="trains weights and activations at 4 bits"):
        qanalyze.train(str(out), sst2, CONFIG, tmp_path / "int4", mode="int4", plan="uniform:8")
    assert not (tmp_path / "int4").exists()


def test_plan_for_analyzes_first_writes_baselines_and_refuses_to_overwrite(tmp_path, fp32_run, sst2):
    out, _ = fp32_run
    target = tmp_path / "plan-8bit.json"
    analysis = AnalyzeConfig(batches=1, batch_size=8, max_length=24, trace_max_probes=4, trace_min_probes=2)
    plans = qanalyze.plan_for(str(out), "8bit", PlanConfig(), target, data=sst2, baselines=True, analysis=analysis)
    assert (tmp_path / "sensitivity.json").is_file() and BitPlan.load(target).to_dict() == plans[0].to_dict()
    assert [p.baseline for p in plans] == [None, "uniform", "random", "reversed"]
    assert (tmp_path / "plan-8bit.uniform.json").is_file()
    with pytest.raises(OutputDirError, match="exists"):
        qanalyze.plan_for(str(out), "8bit", PlanConfig(), target)


def test_evaluate_run_reloads_a_quantized_run_and_writes_an_eval_record(tmp_path, fp32_run, sst2):
    out, _ = fp32_run
    run = tmp_path / "int8"
    trained = qanalyze.train(str(out), sst2, CONFIG, run, mode="int", plan="uniform:8")
    evaluation = qanalyze.evaluate_run(str(run), max_eval_examples=16)  # the run's own task, data and length
    assert evaluation.quantized and evaluation.path == run / "eval-sst2-dev.json"
    assert EvalRecord.load(evaluation.path).metrics == trained.metrics == evaluation.record.metrics
    with pytest.raises(ConfigError, match="--ranks applies to qdylora runs only"):
        qanalyze.evaluate_run(str(run), ranks=(1,))
