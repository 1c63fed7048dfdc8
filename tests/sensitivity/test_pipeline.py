"""A LLaMA split by decoder layers over two gloo ranks gives one process's Hessian-vector products, traces and
Fisher scores while each rank holds only its stage (`qanalyze.sensitivity.stages`, `qanalyze.sensitivity.pipeline`,
`qanalyze.sensitivity.pipeline_fisher`, `qanalyze.sensitivity.pipelined_analysis`); bad input is refused with
one line."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from rank_helpers import two_ranks

from qanalyze.data import load_task
from qanalyze.errors import ConfigError
from qanalyze.models import LoadedModel, architecture_fingerprint, inventory, load_model
from qanalyze.sensitivity.analyze import AnalyzeConfig, analyze, module_groups
from qanalyze.sensitivity.calibration import calibration_batches
from qanalyze.sensitivity.errors import all_weight_errors
from qanalyze.sensitivity.hvp import HVP
from qanalyze.sensitivity.pipeline import draw_probe
from qanalyze.sensitivity.pipelined_analysis import analyze_pipelined
from qanalyze.sensitivity.stages import load_stage, split_layers

TOLERANCE = 1e-5
"""Relative: the same float32 operations as one process's double backward, the tied table's two contributions
added after the sweeps instead of by autograd (measured 0 on the tiny LLaMA and on SmolLM2-135M's samples)."""

CONFIG = AnalyzeConfig(batches=2, batch_size=1, max_length=32, metrics=("weights", "fisher", "trace"),
                       trace_max_probes=3, trace_min_probes=3, groups=("channel", "32"), bits=(4, 8))

TWO_RANKS = """
import json, sys
import torch
from qanalyze.data import load_task
from qanalyze.distributed import world
from qanalyze.sensitivity.analyze import AnalyzeConfig
from qanalyze.sensitivity.pipeline import PipelinedHVP
from qanalyze.sensitivity.pipelined_analysis import analyze_pipelined
from qanalyze.sensitivity.stages import load_stage

model, text, out = sys.argv[1:4]
rank = world().rank
stage = load_stage(model, rank, world().size)
ids = torch.randint(0, 30522, (1, 24), generator=torch.Generator().manual_seed(1))
op = PipelinedHVP.build(stage, {"input_ids": ids, "labels": ids})
torch.save(op(op.probe(seed=0, batch=0, probe=0)), f"{out}/hv{rank}.pt")
names = [name for name, _ in stage.model.named_parameters()]
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"names": names, "bytes": stage.parameter_bytes, "loss": op.loss}, f)
config = AnalyzeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[4]).items()})
analyze_pipelined(model, load_task("lm", text, seq_len=32), config, f"{out}/two.json")
"""


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_llama_dir, wikitext_sample_dir) -> Path:
    """Every two-rank check's output, from one run: each rank's parameters, products and the report."""
    out = tmp_path_factory.mktemp("pipeline")
    script = out / "ranks.py"
    script.write_text(TWO_RANKS)
    settings = json.dumps(CONFIG.recorded())
    ranks = two_ranks(str(script), str(tiny_llama_dir), str(wikitext_sample_dir), str(out), settings)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir) -> LoadedModel:
    """The whole tiny LLaMA in one process, eager attention."""
    return load_model(str(tiny_llama_dir), eager_attention=True)


@pytest.fixture(scope="module")
def full(loaded) -> torch.nn.Module:
    """The whole tiny LLaMA's module."""
    return loaded.model


def _reference_products(model: torch.nn.Module, batch: dict, *, batch_index: int, probes: int) -> list[dict]:
    """One process's probes (the same keyed draws) and products, with `HVP` over every quantizable weight."""
    modules = dict(model.named_modules())
    names = [info.name for info in inventory(model)]
    op = HVP.build(model, batch, {name: modules[name].weight for name in names})
    shapes = {name: modules[name].weight.shape for name in names}
    result = []
    for probe in range(probes):
        v = draw_probe(shapes, seed=0, batch=batch_index, probe=probe)
        result.append({"v": v, "hv": dict(zip(names, op([v[name] for name in names])))})
    return result


def test_each_rank_holds_only_its_stage(two, full):
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    first, last = (set(r["names"]) for r in ranks)
    layer = {i: {n for n, _ in full.named_parameters() if n.startswith(f"model.layers.{i}.")} for i in range(2)}
    assert first == {"model.embed_tokens.weight", *layer[0]}
    assert last == {*layer[1], "model.norm.weight", "lm_head.weight"}  # the tied head: a copy of the table
    whole = dict(full.named_parameters())
    table = whole["model.embed_tokens.weight"].numel() * 4
    total = sum(p.numel() * 4 for p in whole.values())
    # rank 0: the table and layer 0; rank 1: layer 1, the final norm and the tied head's copy of the table
    layers_bytes = [r["bytes"] - table for r in ranks]
    assert all(0 < b < 0.75 * (total - table) for b in layers_bytes), (layers_bytes, total)
    assert ranks[0]["bytes"] < total and ranks[1]["bytes"] < total


def test_products_on_two_ranks_equal_one_process(two, full):
    ids = torch.randint(0, 30522, (1, 24), generator=torch.Generator().manual_seed(1))
    reference = _reference_products(full, {"input_ids": ids, "labels": ids}, batch_index=0, probes=1)[0]["hv"]
    parts = [torch.load(two / f"hv{r}.pt") for r in range(2)]
    assert set(parts[0]).isdisjoint(parts[1]) and set(parts[0]) | set(parts[1]) == set(reference)
    assert "model.embed_tokens" in parts[0]  # the tied table's two uses, summed on its owner
    products = {**parts[0], **parts[1]}
    worst = max(_relative(products[name], reference[name]) for name in reference)
    assert worst < TOLERANCE, worst
    losses = [json.loads((two / f"rank{r}.json").read_text())["loss"] for r in range(2)]
    expected = float(full(input_ids=ids, labels=ids).loss.detach())
    assert losses[0] == losses[1] and math.isclose(losses[0], expected, rel_tol=1e-6)


def test_the_report_holds_the_reference_traces_and_one_process_weight_errors(two, loaded, full,
                                                                             wikitext_sample_dir):
    report = json.loads((two / "two.json").read_text())
    assert report["complete"] and report["model_level"]["pipeline"]["layers"] == [[0, 1], [1, 2]]
    infos = inventory(full)
    assert set(report["modules"]) == {info.name for info in infos}
    assert report["model"]["fingerprint"] == architecture_fingerprint(infos)
    assert report["model"]["architecture"] == "LlamaForCausalLM"
    assert {key: report["model"][key] for key in loaded.identity} == loaded.identity  # load_model's identity
    data = load_task("lm", str(wikitext_sample_dir), seq_len=32)
    for b, batch in enumerate(calibration_batches(data, loaded.tokenizer, CONFIG)):
        probes = _reference_products(full, batch, batch_index=b, probes=CONFIG.trace_max_probes)
        for name, entry in report["modules"].items():
            samples = torch.tensor([float(torch.dot(p["v"][name].reshape(-1), p["hv"][name].reshape(-1)))
                                    for p in probes], dtype=torch.float64)
            estimate = entry["hessian"]["trace_per_batch"][b]
            assert estimate["iterations"] == CONFIG.trace_max_probes and estimate["method"] == "one-pass"
            assert abs(estimate["value"] - float(samples.mean())) <= TOLERANCE * float(samples.abs().max()), name
            assert math.isclose(estimate["stderr"], float(samples.std() / math.sqrt(len(samples))), rel_tol=1e-4)
    modules = dict(full.named_modules())
    for info in infos:  # each rank measured its own modules' weight errors
        errors = all_weight_errors(modules[info.name].weight.detach(), CONFIG.bits, module_groups(info, CONFIG.groups))
        for bits, measured in errors.items():  # summed in another order by one thread and by several
            recorded = report["modules"][info.name]["weight_error"][str(bits)]
            assert recorded.keys() == measured.keys(), info.name
            assert all(math.isclose(recorded[g], e, rel_tol=1e-9) for g, e in measured.items()), info.name


def test_the_fisher_scores_equal_one_process(two, loaded, wikitext_sample_dir, tmp_path):
    data = load_task("lm", str(wikitext_sample_dir), seq_len=32)
    one = analyze(loaded, data, replace(CONFIG, metrics=("weights", "fisher")), tmp_path / "one.json")
    report = json.loads((two / "two.json").read_text())
    assert report["timings"]["score_passes"] == one.timings["score_passes"] == CONFIG.batches * CONFIG.batch_size
    worst = 0.0  # the sampled labels, the tied table's two uses and the candidate steps as in one process
    for name, entry in one.modules.items():
        recorded = report["modules"][name]["fisher_error"]
        assert recorded.keys() == entry["fisher_error"].keys(), name
        for bits, errors in entry["fisher_error"].items():
            assert recorded[bits].keys() == errors.keys(), name
            # a gain of ones quantizes exactly per channel: 0 in both
            worst = max(worst, *(abs(recorded[bits][g] - e) / max(e, 1e-30) for g, e in errors.items()))
    assert worst < TOLERANCE, worst
    assert one.modules["model.embed_tokens"]["fisher_error"]["4"]["channel"] > 0  # the tied table's two uses


def test_the_default_is_one_process_lm_metrics_and_plan_takes_its_default_objective(capfd, tmp_path, tiny_llama_dir,
                                                                                   wikitext_sample_dir):
    out = tmp_path / "sensitivity.json"  # one rank: the whole model, in this process
    code, _, err = run_cli(capfd, "analyze", tiny_llama_dir, "--task", "lm", "--data", wikitext_sample_dir,
                           "--seq-len", "32", "--batches", "2", "--batch-size", "1", "--pipeline", "--quiet",
                           "--out", out)
    assert code == 0, err
    assert json.loads(out.read_text())["settings"]["metrics"] == ["weights", "fisher"]
    code, _, err = run_cli(capfd, "plan", tiny_llama_dir, "--budget", "4bit", "--sensitivity", out, "--quiet",
                           "--out", tmp_path / "plan.json")
    assert code == 0, err


@pytest.mark.parametrize(("layers", "size", "expected"), [
    (2, 2, [(0, 1), (1, 2)]), (5, 2, [(0, 3), (3, 5)]), (30, 4, [(0, 8), (8, 16), (16, 23), (23, 30)]),
    (3, 1, [(0, 3)]),
])
def test_stages_are_contiguous_and_even(layers, size, expected):
    splits = [split_layers(layers, size, rank) for rank in range(size)]
    assert [(s.start, s.stop) for s in splits] == expected
    assert splits[0].owns("model.embed_tokens") and splits[-1].owns("lm_head") and splits[-1].owns("model.norm")
    assert splits[0].owns(f"model.layers.{expected[0][1] - 1}.mlp.up_proj")
    assert size == 1 or not splits[0].owns(f"model.layers.{expected[0][1]}.mlp.up_proj")


def test_more_ranks_than_layers_are_refused(tiny_llama_dir):
    message = r"a pipeline of 3 ranks needs at least 3 decoder layers \(one per rank\); the model has 2"
    with pytest.raises(ConfigError, match=message):
        load_stage(tiny_llama_dir, 0, 3)


def test_a_folder_that_is_not_a_llama_is_refused(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"needs a model folder with config\.json"):
        load_stage(tmp_path, 0, 1)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"splits LLaMA-style decoders \(llama\); .* type 'bert'"):
        load_stage(tmp_path, 0, 1)
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"has none \(save the model with save_pretrained first\)"):
        load_stage(tmp_path, 0, 1)


@pytest.mark.parametrize(("change", "message"), [
    ({"metrics": ("fisher", "output-gradient")}, "measures weights, fisher, trace, not output-gradient"),
    ({"engine": "pyhessian"}, "native engine, not pyhessian"),
    ({"hvp_precision": "bfloat16"}, "in float32, not bfloat16"),
])
def test_unsupported_settings_are_refused(tmp_path, tiny_llama_dir, wikitext_sample_dir, change, message):
    data = load_task("lm", str(wikitext_sample_dir), seq_len=32)
    with pytest.raises(ConfigError, match=message):
        analyze_pipelined(tiny_llama_dir, data, replace(CONFIG, **change), tmp_path / "s.json")
    assert not list(tmp_path.iterdir())
