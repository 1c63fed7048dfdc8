"""analyze() end to end on a tiny BERT with real SST-2 sentences, and its resume and bad input."""

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from qanalyze.data import load_task
from qanalyze.errors import ConfigError
from qanalyze.models import LoadedModel, load_model
from qanalyze.records import SensitivityReport
from qanalyze.sensitivity.analyze import AnalyzeConfig, analyze, partial_path
from qanalyze.sensitivity.estimators import lanczos
from qanalyze.sensitivity.hvp import HVP, NonFiniteError


@pytest.fixture(scope="module")
def sst2(glue_dir):
    return load_task("sst2", str(glue_dir), max_train_examples=64, max_eval_examples=8, seed=0)


@pytest.fixture()
def tiny(tiny_bert_dir):
    return load_model(str(tiny_bert_dir), num_labels=2, eager_attention=True)


def _config(**overrides):
    settings = dict(batches=2, batch_size=8, max_length=24, bits=(2, 4, 8), gradient_bits=(4, 8),
                    groups=("tensor", "channel", "head", "8"), trace_max_probes=12, trace_min_probes=4,
                    metrics=("eig", "trace", "density", "weights", "activations", "gradients"),
                    density_steps=10, eig_max_iter=40, trace_refine_params=4096)
    settings.update(overrides)
    return AnalyzeConfig(**settings)


def test_analyze_covers_every_module(tmp_path, tiny, sst2):
    out = tmp_path / "sensitivity.json"
    report = analyze(tiny, sst2, _config(measure_delta_loss=True, delta_loss_bits=(2, 8)), out)
    raw = json.loads(out.read_text())
    assert raw["schema"] == "qanalyze/sensitivity/v1" and raw["complete"] is True
    assert not partial_path(out).exists()
    assert SensitivityReport.load(out).modules.keys() == report.modules.keys()
    assert raw["data"]["task"] == "sst2" and raw["data"]["examples"] == 16
    assert len(raw["model"]["fingerprint"]) == 64
    query = raw["modules"]["bert.encoder.layer.0.attention.self.query"]
    assert query["kind"] == "linear" and query["block"] == 0 and query["head_dim"] == 16
    assert set(query["weight_error"]["2"]) == {"tensor", "channel", "head", "8"}
    assert query["weight_error"]["2"]["tensor"] >= query["weight_error"]["2"]["channel"]
    assert len(query["hessian"]["eigenvalues"]) == 2
    assert query["hessian"]["omega"] > 0
    assert query["hessian"]["trace_stderr"] >= 0
    assert set(query["gradient_error"]) == {"4", "8"}
    assert query["activation_error"]["2"] > query["activation_error"]["8"]
    assert set(query["delta_loss"]) == {"trace", "eig", "measured", "fisher"}
    assert query["delta_loss"]["fisher"]["2"] > query["delta_loss"]["fisher"]["8"] > 0
    methods = {t["method"] for e in raw["modules"].values() for t in e["hessian"]["trace_per_batch"]}
    assert "restricted" in methods and methods <= {"one-pass", "restricted"}  # small noisy blocks refined
    spearman = raw["model_level"]["predictor_spearman"]
    assert set(spearman) == {"2", "8"} and all(-1 <= v <= 1 for v in spearman["2"].values())
    assert set(raw["blocks"]) == {"0", "1"} and len(raw["blocks"]["0"]["eigenvalues"]) == 2
    assert sum(raw["model_level"]["density"]["weights"][0]) == pytest.approx(1.0)
    # The vocabulary rows batch 1 does not look up (at most 8 x 24 tokens) hold their share of the weights at 0.
    table = tiny.model.get_input_embeddings().weight
    counted = sum(math.prod(entry["shape"]) for entry in raw["modules"].values())
    assert raw["model_level"]["density"]["nodes"][0][-1] == 0.0
    assert (table.shape[0] - 8 * 24) * table.shape[1] / counted <= raw["model_level"]["density"]["weights"][0][-1] < 1
    embedding = raw["modules"]["bert.embeddings.word_embeddings"]
    assert embedding["kind"] == "embedding" and "gradient_error" not in embedding
    for name, entry in raw["modules"].items():
        hessian = entry["hessian"]
        # the top eigenvalue bounds the mean eigenvalue, up to the trace estimate's own noise
        noise = 3 * hessian["trace_stderr"] / math.prod(entry["shape"])
        assert max(abs(v) for v in hessian["eigenvalues"]) >= hessian["avg_trace"] - noise - 1e-9, name


def test_bfloat16_products_keep_eigenvalues_and_traces(tmp_path, tiny, sst2):
    """bfloat16 traces agree with float32 ones within their standard errors; the eigenvalues, finished
    in float32, within the eigenvalue tolerance; the precision used is recorded."""
    config = _config(metrics=("eig", "trace"), eig_tol=1e-4, trace_max_probes=32, trace_min_probes=32)
    reports = {p: analyze(tiny, sst2, replace(config, hvp_precision=p), tmp_path / f"{p}.json")
               for p in ("float32", "bfloat16")}
    assert [r.settings["hvp_precision"] for r in reports.values()] == ["float32", "bfloat16"]
    for name, entry in reports["float32"].modules.items():
        ours, ref = reports["bfloat16"].modules[name]["hessian"], entry["hessian"]
        for a, b in zip(ours["eigenvalues"], ref["eigenvalues"]):
            assert a == pytest.approx(b, rel=3e-4, abs=1e-6), name
        for a, b in zip(ours["trace_per_batch"], ref["trace_per_batch"]):
            assert abs(a["value"] - b["value"]) <= 3 * math.hypot(a["stderr"], b["stderr"]) + 1e-6, name
    for a, b in zip(reports["bfloat16"].blocks.values(), reports["float32"].blocks.values()):
        assert a["eigenvalues"][0] == pytest.approx(b["eigenvalues"][0], rel=3e-4)


def test_unpadded_products_keep_eigenvalues_and_traces(tmp_path, tiny, sst2):
    """Length buckets change only rounding: the same probes give the same traces, the same starts the
    same eigenvalues; the setting is recorded."""
    from qanalyze.sensitivity.analyze import calibration_batches
    from qanalyze.sensitivity.buckets import LengthBuckets

    config = _config(metrics=("eig", "trace"), batch_size=16, max_length=64, eig_tol=1e-4, hvp_precision="float32")
    batches = calibration_batches(sst2, tiny.tokenizer, config)
    assert all(LengthBuckets.of(b) is not None for b in batches)  # else this test compares nothing
    reports = {u: analyze(tiny, sst2, replace(config, unpad=u), tmp_path / f"{u}.json") for u in (False, True)}
    assert [r.settings["unpad"] for r in reports.values()] == [False, True]
    for name, entry in reports[False].modules.items():
        ours, ref = reports[True].modules[name]["hessian"], entry["hessian"]
        for a, b in zip(ours["eigenvalues"], ref["eigenvalues"]):
            assert a == pytest.approx(b, rel=3e-4, abs=1e-6), name
        for a, b in zip(ours["trace_per_batch"], ref["trace_per_batch"]):
            assert a["value"] == pytest.approx(b["value"], rel=1e-4, abs=1e-6), name


def test_pyhessian_engine_agrees_with_the_native_one(tmp_path, tiny, sst2):
    """--engine pyhessian answers the same questions through PyHessian 0.1 (padded batch, float32);
    its top eigenvalues agree with Lanczos within 2 %, its traces within the standard errors. Both take all 24
    probes: PyHessian stops once its running mean moves less than the tolerance, and the spread of the two or
    three samples it then has understates its error (8.3e-6 ± 1.9e-7 for a query block whose exact trace,
    summed over unit vectors, is -3.8e-7)."""
    config = _config(metrics=("eig", "trace"), batches=1, modules=r"layer\.0\.attention\.self\.(query|value)$",
                     eig_tol=1e-5, eig_max_iter=100, trace_max_probes=24, trace_min_probes=24, trace_rel_tol=1e-9)
    reports = {e: analyze(tiny, sst2, replace(config, engine=e), tmp_path / f"{e}.json")
               for e in ("native", "pyhessian")}
    theirs = reports["pyhessian"]
    assert theirs.settings["hvp_precision"] == "float32" and theirs.settings["unpad"] is False
    assert set(theirs.modules) == {f"bert.encoder.layer.0.attention.self.{m}" for m in ("query", "value")}
    for name, entry in reports["native"].modules.items():
        ours, ref = entry["hessian"], theirs.modules[name]["hessian"]
        assert ref["eigenvalues"][0] == pytest.approx(ours["eigenvalues"][0], rel=0.02), name
        a, b = ours["trace_per_batch"][0], ref["trace_per_batch"][0]
        assert b["method"] == "pyhessian"
        assert abs(a["value"] - b["value"]) <= 3 * math.hypot(a["stderr"], b["stderr"]), name
    layer = theirs.blocks["0"]["per_batch"][0]["value"]
    assert layer == pytest.approx(reports["native"].blocks["0"]["per_batch"][0]["value"], rel=0.02)


def test_auto_precision_is_float32_for_a_float64_model(tmp_path, tiny, sst2):
    tiny.model.double()
    report = analyze(tiny, sst2, _config(metrics=("trace",), trace_max_probes=4, trace_min_probes=4),
                     tmp_path / "s.json")
    assert report.settings["hvp_precision"] == "float32"


def test_empirical_fisher_is_the_mean_of_single_example_squared_gradients(tiny, sst2):
    """Each example encoded alone (no padding) gives the reference; the padded batch slices must match it."""
    from qanalyze.data import collate, encode
    from qanalyze.models import inventory
    from qanalyze.sensitivity.analyze import _empirical_fisher, calibration_batches

    config = _config(batches=1, batch_size=4)
    model = tiny.model.eval()
    infos = [i for i in inventory(model) if i.name.endswith("layer.1.output.dense")]
    modules = dict(model.named_modules())
    fisher = _empirical_fisher(model, infos, modules, calibration_batches(sst2, tiny.tokenizer, config),
                               lambda *_: None)[infos[0].name]
    order = torch.randperm(len(sst2.train), generator=torch.Generator().manual_seed(config.seed))[:4].tolist()
    weight = modules[infos[0].name].weight
    squares, grads = [], []
    for i in order:
        encoded = encode([sst2.train[i]], tiny.tokenizer, max_length=config.max_length)
        (grad,) = torch.autograd.grad(model(**collate(encoded, range(1), tiny.tokenizer)).loss, [weight])
        squares.append(grad**2)
        grads.append(grad)
    torch.testing.assert_close(fisher, torch.stack(squares).mean(0), rtol=1e-4, atol=1e-10)
    # the Fisher of the mean gradient is what a batch gradient would have given: much smaller
    assert float(fisher.sum()) > 1.5 * float((torch.stack(grads).mean(0) ** 2).sum())


def test_module_eigenvalue_is_the_block_of_the_full_hessian(tiny, sst2):
    """The per-module restriction of the shared graph equals an HVP built for that module alone."""
    from qanalyze.sensitivity.analyze import calibration_batches
    from qanalyze.sensitivity.sources import Restricted

    config = _config()
    batch = calibration_batches(sst2, tiny.tokenizer, config)[0]
    model = tiny.model
    name = "bert.encoder.layer.1.output.dense"
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith("dense")}
    index = list(weights).index(name)
    shared = Restricted(HVP.build(model, batch, weights), [index])
    alone = HVP.build(model, batch, {name: weights[name]})
    v = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shared([v])[0], alone([v])[0], rtol=1e-4, atol=1e-7)
    a = lanczos(shared, generator=torch.Generator().manual_seed(1))[0].value
    b = lanczos(alone, generator=torch.Generator().manual_seed(1))[0].value
    assert a == pytest.approx(b, rel=1e-3)


def test_killed_analysis_resumes_without_redoing_work(tmp_path, tiny, sst2, monkeypatch):
    import qanalyze.sensitivity.analyze as module

    out = tmp_path / "s.json"
    config = _config(metrics=("eig", "weights"))
    calls = []
    real = module.EIG_METHODS["lanczos"]

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setitem(module.EIG_METHODS, "lanczos", failing)
    with pytest.raises(KeyboardInterrupt):
        analyze(tiny, sst2, config, out)
    assert not out.exists() and partial_path(out).exists()
    assert json.loads(partial_path(out).read_text())["complete"] is False
    calls.clear()
    monkeypatch.setitem(module.EIG_METHODS, "lanczos", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = analyze(tiny, sst2, config, out, resume=True)
    units_per_batch = len(report.blocks) + len(report.modules)
    assert len(calls) == 2 * units_per_batch - 4  # the four finished units are not redone
    assert all(len(e["hessian"]["eigenvalues"]) == 2 for e in report.modules.values())
    with pytest.raises(ConfigError, match="nothing to resume"):
        analyze(tiny, sst2, config, tmp_path / "other.json", resume=True)


def test_bad_inputs(tmp_path, tiny, sst2, tiny_bert_dir):
    with pytest.raises(ConfigError, match="matches none"):
        analyze(tiny, sst2, _config(modules="nothing-like-this"), tmp_path / "a.json")
    with pytest.raises(ConfigError, match="needs 800 training examples; the data has 64"):
        analyze(tiny, sst2, _config(batches=100), tmp_path / "b.json")
    bare = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64))
    headless = LoadedModel(model=bare.bert, tokenizer=tiny.tokenizer, source=tiny.source, identity=tiny.identity)
    with pytest.raises(ConfigError, match="no task head"):
        analyze(headless, sst2, _config(), tmp_path / "c.json")
    with torch.no_grad():
        tiny.model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"classifier\.weight"):
        analyze(tiny, sst2, _config(metrics=("eig",)), tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()
    for name in ("a.json", "b.json", "c.json"):
        assert not (tmp_path / name).exists()


def test_mse_weight_range_records_lower_weight_errors_and_loss_changes(tmp_path, tiny, sst2):
    kept = dict(metrics=("weights",), measure_delta_loss=True, delta_loss_bits=(2, 4))
    plain = analyze(tiny, sst2, _config(**kept), tmp_path / "max.json")
    clipped = analyze(tiny, sst2, _config(weight_range="mse", **kept), tmp_path / "mse.json")
    assert clipped.settings["weight_range"] == "mse" and plain.settings["weight_range"] == "max"
    lower = 0
    for name, entry in plain.modules.items():
        for bits, groups in entry["weight_error"].items():
            for group, error in groups.items():
                assert clipped.modules[name]["weight_error"][bits][group] <= error * (1 + 1e-9)
                lower += clipped.modules[name]["weight_error"][bits][group] < 0.9 * error
        # the loss changes are measured on the clipped weights too: they differ from the max rule's
        assert clipped.modules[name]["delta_loss"]["measured"].keys() == {"2", "4"}
        if entry["kind"] == "layernorm":  # a gain keeps the max rule, as in the engine
            assert clipped.modules[name]["weight_error"] == entry["weight_error"]
    assert lower > len(plain.modules)  # clipping cuts the error by 10 % or more in many (module, bits, group)
    assert any(clipped.modules[n]["delta_loss"]["measured"]["2"] != plain.modules[n]["delta_loss"]["measured"]["2"]
               for n in plain.modules)
    with pytest.raises(ConfigError, match="weight range"):
        _config(weight_range="percentile")


def test_default_analysis_is_what_the_default_plan_needs_and_counts_its_products(tmp_path, tiny, sst2):
    from qanalyze.plan.budget import parse_budget
    from qanalyze.plan.make import PlanConfig, make_plan

    assert "eig" not in AnalyzeConfig().metrics  # eigenvalues are opt-in
    config = replace(AnalyzeConfig(), batches=2, batch_size=8, max_length=24, trace_max_probes=6, trace_min_probes=4)
    out = tmp_path / "sensitivity.json"
    report = analyze(tiny, sst2, config, out)
    timings = report.timings
    assert timings["hessian_products"] == timings["hessian_products_batch_0"] + timings["hessian_products_batch_1"]
    # one global product per probe and nothing else: no eigenvalues, no restricted refinement
    assert 2 * 4 <= timings["hessian_products"] <= 2 * 6
    assert {"weights_seconds", "errors_seconds", "hessian_seconds"} <= set(timings)
    assert not report.blocks and all("eigenvalues" not in e["hessian"] for e in report.modules.values())
    plan = make_plan(report, parse_budget("4bit"), PlanConfig(), sensitivity_path=out)
    assert plan.objective == "trace" and plan.totals["weight_bits_mean"] <= 4.0 + 1e-9


def test_an_objective_gets_the_measurements_it_reads():
    from qanalyze.sensitivity.analyze import AnalyzeConfig

    default = AnalyzeConfig()
    assert "eig" not in default.metrics and default.for_objective("trace") == default
    assert default.for_objective("eig").metrics == (*default.metrics, "eig")
    assert default.for_objective("measured").measure_delta_loss
