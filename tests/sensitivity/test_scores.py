"""One-pass scores (fisher, output-gradient) on tiny random models built here: each against a direct
computation, their growth as bits shrink, the lm task end to end, and plans made from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from qanalyze.data import load_task
from qanalyze.models import inventory, load_model
from qanalyze.plan.budget import parse_budget
from qanalyze.plan.make import PlanConfig, make_plan
from qanalyze.quant.primitives import fake_quantize, rows_per_group
from qanalyze.sensitivity.analyze import AnalyzeConfig, analyze
from qanalyze.sensitivity.calibration import calibration_batches
from qanalyze.sensitivity.candidates import CandidateSteps
from qanalyze.sensitivity.scores import measure_scores

WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"
SEQ_LEN = 24


@pytest.fixture(scope="module")
def llama(tmp_path_factory, minilm_dir):
    """A tiny random LLaMA (GQA, tied embeddings, RMSNorm) with the MiniLM tokenizer, saved and loaded."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True).save_pretrained(folder)
    return load_model(str(folder), eager_attention=True)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """valid.txt and test.txt holding a few thousand characters of WikiText-2 each."""
    folder = tmp_path_factory.mktemp("text")
    (folder / "valid.txt").write_text((WIKITEXT / "valid.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    (folder / "test.txt").write_text((WIKITEXT / "test.txt").read_text(encoding="utf-8")[:2000], encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def text(text_dir):
    return load_task("lm", str(text_dir), seq_len=SEQ_LEN)


def _config(**overrides):
    settings = dict(batches=2, batch_size=2, bits=(2, 3, 4, 8), score_bits=(2, 4), groups=("tensor", "channel", "8"),
                    metrics=("weights", "fisher", "output-gradient"))
    settings.update(overrides)
    return AnalyzeConfig(**settings)


def _quantized(weight: torch.Tensor, bits: int, group: str, head_dim=None) -> torch.Tensor:
    rows = rows_per_group(weight.shape[0], group, head_dim=head_dim)
    return fake_quantize(weight, bits, rows_per_group=None if rows == weight.shape[0] else rows)


def test_lm_windows_are_batches_of_one_with_their_own_labels(llama, text):
    batches = calibration_batches(text, llama.tokenizer, _config())
    assert len(batches) == 4
    for batch in batches:
        assert batch["input_ids"].shape == (1, SEQ_LEN) and torch.equal(batch["input_ids"], batch["labels"])


def test_fisher_is_the_mean_of_per_window_squared_gradients(llama, text):
    model = llama.model.double()
    try:
        config = _config()
        batches = calibration_batches(text, llama.tokenizer, config)
        infos = [i for i in inventory(model) if i.name in ("model.embed_tokens", "model.layers.1.mlp.down_proj")]
        fisher = measure_scores(model, infos, batches, fisher=True, output_steps=None).fisher
        weights = [dict(model.named_modules())[i.name].weight for i in infos]
        squares = [torch.zeros_like(w) for w in weights]
        for batch in batches:
            # a plain loop over windows: the tied table's gradient holds its lookup and its LM-head use
            for square, grad in zip(squares, torch.autograd.grad(model(**batch).loss, weights)):
                square += grad**2
        for info, square in zip(infos, squares):
            torch.testing.assert_close(fisher[info.name], square / len(batches), rtol=1e-10, atol=0)
            weight = dict(model.named_modules())[info.name].weight.detach()
            steps = CandidateSteps(weight, (3,), ("channel",))
            expected = float((fisher[info.name] * (_quantized(weight, 3, "channel") - weight) ** 2).sum())
            assert steps.weighted_errors(fisher[info.name])[3]["channel"] == pytest.approx(expected, rel=1e-10)
    finally:
        model.float()


def _brute_force(model, module, batches, bits, group):
    """Σ (∂L/∂Y)² (Y − Y_q)² per window, Y_q from a forward with the weight replaced by Q(W)."""
    captured = {}
    handle = module.register_forward_hook(lambda m, a, out: captured.__setitem__("y", out))
    total = 0.0
    try:
        for batch in batches:
            loss = model(**batch).loss
            y = captured["y"]
            (grad,) = torch.autograd.grad(loss, [y])
            original = module.weight.detach().clone()
            with torch.no_grad():
                module.weight.copy_(_quantized(original, bits, group))
                model(**batch)
                module.weight.copy_(original)
            total += float((grad**2 * (y.detach() - captured["y"]) ** 2).sum())
    finally:
        handle.remove()
    return total / len(batches)


def test_output_gradient_score_is_the_brute_force_one(llama, text):
    model = llama.model.double()  # the brute force subtracts two forwards: float64 keeps it exact to 1e-5
    try:
        batches = calibration_batches(text, llama.tokenizer, _config(batches=1))
        names = ("model.embed_tokens", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.0.input_layernorm")
        infos = [i for i in inventory(model) if i.name in names]
        modules = dict(model.named_modules())
        steps = {i.name: CandidateSteps(modules[i.name].weight, (2, 4), ("tensor", "channel", "8")) for i in infos}
        scores = measure_scores(model, infos, batches, fisher=False, output_steps=steps).output
        assert set(scores) == set(names)
        for name in names:
            for bits, group in ((2, "tensor"), (4, "8") if "8" in steps[name].steps else (4, "channel")):
                expected = _brute_force(model, modules[name], batches, bits, group)
                assert scores[name][str(bits)][group] == pytest.approx(expected, rel=1e-5), (name, bits, group)
    finally:
        model.float()


def test_lm_analysis_scores_grow_as_bits_shrink_and_plan(tmp_path, llama, text):
    report = analyze(llama, text, _config(), tmp_path / "s.json")
    assert report.data["task"] == "lm"
    for name, entry in report.modules.items():
        if entry["kind"] in ("layernorm", "rmsnorm"):
            continue  # a fresh RMSNorm's gains are all 1: every layout holds them exactly
        fisher, output = entry["fisher_error"], entry["output_gradient_error"]
        assert set(fisher) == {"2", "3", "4", "8"} and set(output) == {"2", "4"}
        assert fisher["2"]["channel"] > fisher["4"]["channel"] > fisher["8"]["channel"] > 0, name
        assert output["2"]["channel"] > output["4"]["channel"] > 0, name
    for objective in ("fisher", "output-gradient"):
        plan = make_plan(report, parse_budget("3bit"), PlanConfig(objective=objective, bits=(2, 3, 4, 8),
                                                   groups=("tensor", "channel", "8")))
        chosen = [e.weight_bits for e in plan.entries.values() if hasattr(e, "weight_bits")]
        assert chosen and min(chosen) >= 2 and max(chosen) <= 8


def test_classifier_analysis_has_the_scores(tmp_path, tiny_bert_dir, glue_dir):
    tiny = load_model(str(tiny_bert_dir), num_labels=2, eager_attention=True)
    sst2 = load_task("sst2", str(glue_dir), max_train_examples=32, max_eval_examples=8, seed=0)
    report = analyze(tiny, sst2, _config(max_length=24, modules=r"layer\.0\.attention\.self"), tmp_path / "s.json")
    query = report.modules["bert.encoder.layer.0.attention.self.query"]
    assert query["output_gradient_error"]["2"]["tensor"] >= query["output_gradient_error"]["2"]["channel"] > 0
    assert query["fisher_error"]["2"]["8"] > query["fisher_error"]["8"]["8"] > 0
    assert report.timings["score_passes"] == 4
    assert AnalyzeConfig().for_objective("fisher").metrics[-1] == "fisher"


def test_score_bits_are_checked():
    from qanalyze.errors import ConfigError

    with pytest.raises(ConfigError, match="bits"):
        AnalyzeConfig(score_bits=(1,))
    with pytest.raises(ConfigError, match="score-bits"):
        AnalyzeConfig(score_bits=())
    with pytest.raises(ConfigError, match="unknown score labels 'model'; known: data, sampled"):
        AnalyzeConfig(score_labels="model")


def test_lm_windows_beyond_the_context_are_refused(tmp_path, llama, text):
    from dataclasses import replace

    from qanalyze.errors import ConfigError

    long = replace(text, train=replace(text.train, seq_len=96))  # the tiny LLaMA's context is 64
    with pytest.raises(ConfigError, match="--seq-len 96 exceeds the model's position limit of 64"):
        analyze(llama, long, _config(batches=1, batch_size=1), tmp_path / "s.json")


def test_sampled_labels_come_from_the_model_and_repeat_by_seed(llama, text, tiny_bert_dir, glue_dir):
    from qanalyze.sensitivity.scores import SCORE_LABELS

    sample = SCORE_LABELS["sampled"]
    (window,) = calibration_batches(text, llama.tokenizer, _config(batches=1, batch_size=1))
    draws = [sample(llama.model, window, torch.Generator().manual_seed(3))["labels"] for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == window["labels"].shape
    assert draws[0][0, 0] == window["labels"][0, 0] and not torch.equal(draws[0], window["labels"])
    # a model that puts all its mass on one token draws only that token
    with torch.no_grad():
        bias = torch.full((llama.model.config.vocab_size,), -1e4)
        bias[7] = 1e4
        llama.model.lm_head.bias = torch.nn.Parameter(bias)
        try:
            peaked = sample(llama.model, window, torch.Generator().manual_seed(0))["labels"]
        finally:
            del llama.model.lm_head.bias
            llama.model.lm_head.register_parameter("bias", None)
    assert bool((peaked[0, 1:] == 7).all())
    tiny = load_model(str(tiny_bert_dir), num_labels=2, eager_attention=True)
    sst2 = load_task("sst2", str(glue_dir), max_train_examples=8, max_eval_examples=8, seed=0)
    batch = calibration_batches(sst2, tiny.tokenizer, _config(batches=1, batch_size=4))[0]
    labels = sample(tiny.model, batch, torch.Generator().manual_seed(0))["labels"]
    assert labels.shape == (4,) and set(labels.tolist()) <= {0, 1}


def test_cli_analyzes_an_lm_with_the_scores(tmp_path, llama, text_dir, capfd):
    import json

    from qanalyze.cli import main

    folder = tmp_path / "llama"
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    task = tmp_path / "lm24.json"
    task.write_text(json.dumps({"kind": "lm", "name": "lm24", "seq_len": SEQ_LEN}))
    out = tmp_path / "s.json"
    # --max-length: the verb checks it against the context whatever the task (see the issue 22 report)
    code = main([str(a) for a in ("analyze", folder, "--task", task, "--data", text_dir, "--max-length", SEQ_LEN,
                                  "--batches", 2, "--batch-size", 1, "--bits", "2,4", "--metrics",
                                  "weights,fisher,output-gradient", "--out", out, "--quiet")])
    assert code == 0, capfd.readouterr().err
    entry = json.loads(out.read_text())["modules"]["model.layers.0.mlp.up_proj"]
    # task lm measures the column layouts by default; 16 input columns take only one group per row
    assert entry["fisher_error"]["2"]["row"] > entry["fisher_error"]["4"]["row"] > 0
    assert set(entry["output_gradient_error"]) == {"2", "3", "4", "5", "6", "8"}


def test_objectives_read_the_scores_and_scale_unscored_bits():
    from qanalyze.errors import ConfigError
    from qanalyze.plan.costs import OBJECTIVES

    entry = {"shape": [4, 4], "weight_error": {"3": {"channel": 2.0}, "4": {"channel": 0.5}},
             "fisher_error": {"3": {"channel": 0.2}, "4": {"channel": 0.06}},
             "output_gradient_error": {"4": {"channel": 0.1}}}
    assert OBJECTIVES["fisher"](entry, 3, "channel") == 0.2
    assert OBJECTIVES["output-gradient"](entry, 3, "channel") == pytest.approx(0.4)  # 0.1 x 2.0 / 0.5
    with pytest.raises(ConfigError, match="has no fisher_error: run `qanalyze analyze` with the fisher metric"):
        OBJECTIVES["fisher"]({"weight_error": entry["weight_error"]}, 3, "channel")


def test_an_lm_analysis_defaults_to_what_its_objective_reads(tmp_path, llama, text_dir):
    from qanalyze import load_task, verbs
    from qanalyze.sensitivity.analyze import AnalyzeConfig

    folder = tmp_path / "llama"
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    data = load_task("lm", str(text_dir), seq_len=SEQ_LEN)
    report = verbs.analyze(str(folder), data, AnalyzeConfig(batches=2, batch_size=1, bits=(2, 4)), tmp_path / "s.json")
    assert report.settings["metrics"] == ["weights", "fisher"]
    assert all("fisher_error" in entry for entry in report.modules.values())
