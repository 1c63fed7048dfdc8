"""PTQ sweeps (``--modes rtn,gptq``): the best uniform configurations and llama.cpp's rule mix beside the
Hessian plan, the lm gap ratio, and for a classifier bootstrap intervals and the paired test."""

from __future__ import annotations

import pytest

from qanalyze.data import load_task
from qanalyze.engine.train import TrainConfig
from qanalyze.plan.make import PlanConfig
from qanalyze.sensitivity.analyze import AnalyzeConfig
from qanalyze.sweep.config import SweepConfig
from qanalyze.sweep.run import sweep


def test_lm_sweep_runs_the_best_uniform_configurations_and_the_rule_mix(tmp_path, tiny_llama_dir,
                                                                       wikitext_sample_dir):
    data = load_task("lm", str(wikitext_sample_dir), seq_len=32)
    config = SweepConfig(budgets=("3bit",), plans=("hessian", "best-uniform", "rule-mix"), modes=("rtn",),
                         integer_bits=(), train=TrainConfig(epochs=1, eval_batch_size=8),
                         analysis=AnalyzeConfig(batches=2, batch_size=4, metrics=("weights", "fisher")))
    record = sweep(str(tiny_llama_dir), data, config, tmp_path)
    rows = {row["plan"]: row for row in record.rows if row["plan"] != "best-uniform"}
    uniform = [row for row in record.rows if row["plan"] == "best-uniform"]
    hessian = rows["hessian"]
    # the finest layout of the two highest bit widths under the Hessian plan's bytes, and the nearest one above
    under = [row["weight_bytes"] <= hessian["weight_bytes"] for row in uniform]
    assert all(under[:-1]) and not under[-1] and 1 <= len(under) - 1 <= 2
    assert all(row["layout"].startswith("uniform:") for row in uniform) and "rule-mix" in rows
    best = [row for row in uniform if row.get("best")]
    assert len(best) == 1 and best[0]["weight_bytes"] <= hessian["weight_bytes"]
    assert min(row["value"] for row in uniform if row["weight_bytes"] <= hessian["weight_bytes"]) == best[0]["value"]
    versus = hessian["vs_best_uniform"]
    fp32 = record.fp32["metrics"]["perplexity"]
    assert versus["run"] == best[0]["run"]
    assert versus["gap_ratio"] == pytest.approx((hessian["value"] - fp32) / (best[0]["value"] - fp32))
    assert hessian["vs_uniform_at_or_above"]["weight_bytes"] >= hessian["weight_bytes"]
    assert {"kl", "top1_agreement"} <= set(hessian["metrics"]) and hessian["status"] == "quantized"


def test_classifier_sweep_gives_bootstrap_intervals_and_the_paired_test(tmp_path, tiny_bert_dir, glue_dir):
    data = load_task("sst2", str(glue_dir), max_train_examples=24, max_eval_examples=40, seed=0)
    config = SweepConfig(budgets=("4bit",), plans=("hessian", "best-uniform"), modes=("gptq",), integer_bits=(),
                         plan=PlanConfig(groups=("g32", "row")),
                         train=TrainConfig(epochs=1, max_length=24),
                         analysis=AnalyzeConfig(batches=2, batch_size=8, max_length=24, trace_max_probes=4,
                                                trace_min_probes=2, metrics=("trace", "weights"),
                                                groups=("channel", "g32", "row")))
    record = sweep(str(tiny_bert_dir), data, config, tmp_path)
    hessian = next(row for row in record.rows if row["plan"] == "hessian")
    low, high = hessian["intervals"]["accuracy"]
    assert low <= hessian["value"] <= high and high - low > 0
    paired = hessian["vs_best_uniform"]["paired"]
    assert paired["metric"] == "accuracy" and paired["low"] <= paired["difference"] <= paired["high"]
    assert paired["significant"] == (paired["low"] > 0 or paired["high"] < 0)
