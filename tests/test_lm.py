"""Task lm on tiny random decoders (LLaMA and GPT-2 built here): windows, perplexity against a plain
transformers loop, KL and top-1 agreement against a reference, and the bad inputs through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from cli_helpers import assert_one_line_error, run_cli

from qanalyze.data import encode, load_task
from qanalyze.engine.evaluate import evaluate
from qanalyze.engine.lm_eval import compare_lm, evaluate_lm, reference_logits
from qanalyze.errors import ConfigError, DataError, ModelFormatError
from qanalyze.lm_data import LMText, cut_windows, encode_text
from qanalyze.models import has_task_head, load_model

CONTEXT = 64  # the tiny models' positions (conftest's tiny_llama_dir has as many)


def _tokenizer(minilm_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)


def _save(folder: Path, model: torch.nn.Module, minilm_dir: Path) -> Path:
    model.save_pretrained(folder)
    _tokenizer(minilm_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, minilm_dir):
    """A tiny random GPT-2 LM head model with the MiniLM tokenizer."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=CONTEXT)
    return _save(tmp_path_factory.mktemp("gpt2"), transformers.GPT2LMHeadModel(config), minilm_dir)




# ---------------------------------------------------------------------------------------------
# Windows


def test_windows_are_cut_without_overlap_and_drop_the_partial_one():
    windows = cut_windows(list(range(11)), 3)
    assert windows.input_ids.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows.text_tokens == 11 and windows.predicted_tokens == 6 and windows.indices == (0, 1, 2)


def test_window_subset_is_seeded_and_kept_in_order():
    first = cut_windows(list(range(100)), 10, limit=4, seed=3)
    again = cut_windows(list(range(100)), 10, limit=4, seed=3)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4].sort().values.tolist()
    assert first.indices == again.indices == tuple(expected)
    assert [row[0] for row in first.input_ids.tolist()] == [10 * i for i in expected]
    assert cut_windows(list(range(100)), 10, limit=4, seed=4).indices != first.indices


def test_too_short_text_names_source_and_token_count():
    with pytest.raises(DataError, match=r"notes\.txt has 5 tokens, fewer than one window of 8"):
        cut_windows([1, 2, 3, 4, 5], 8, where="notes.txt")
    with pytest.raises(DataError, match=r"empty\.txt holds no text \(0 tokens\)"):
        encode_text(LMText("  \n", "empty.txt", 8), object())


def test_whole_text_is_tokenized_once(minilm_dir):
    tokenizer = _tokenizer(minilm_dir)
    text = "the cat sat on the mat . " * 20
    windows = encode_text(LMText(text, "t", 16), tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert windows.text_tokens == len(ids)
    assert windows.input_ids.flatten().tolist() == ids[: len(windows) * 16]


# ---------------------------------------------------------------------------------------------
# Reading the text


def test_folder_takes_valid_for_training_and_test_for_evaluation(wikitext_sample_dir):
    data = load_task("lm", str(wikitext_sample_dir), max_eval_examples=2, seed=1)
    assert data.train.where.endswith("valid.txt") and data.dev.where.endswith("test.txt")
    assert (data.dev.seq_len, data.dev.limit, data.dev.seed, data.train.limit) == (512, 2, 1, None)
    assert data.identity["format"] == "text" and len(data.identity["hash"]) == 64


def test_identity_follows_text_and_window_settings(wikitext_sample_dir):
    base = load_task("lm", str(wikitext_sample_dir)).identity
    shorter = load_task("lm", str(wikitext_sample_dir), seq_len=32).identity
    fewer_train = load_task("lm", str(wikitext_sample_dir), max_train_examples=3).identity
    assert shorter["hash"] != base["hash"] and shorter["seq_len"] == 32
    assert fewer_train["dev_hash"] == base["dev_hash"] and fewer_train["train_hash"] != base["train_hash"]


def test_single_text_file_serves_both_splits(wikitext_sample_dir):
    data = load_task("lm", str(wikitext_sample_dir / "test.txt"))
    assert data.train.text == data.dev.text


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_table_files_read_the_text_field(tmp_path, suffix):
    rows = [{"body": "first line 1.50"}, {"body": "second line"}]
    path = tmp_path / f"corpus.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    else:
        path.write_text("body\nfirst line 1.50\nsecond line\n", encoding="utf-8")
    data = load_task("lm", str(path), text_field="body")
    assert data.dev.text == "first line 1.50\nsecond line"
    with pytest.raises(DataError, match="no column 'text'"):
        load_task("lm", str(path))


def test_lm_settings_are_refused_for_classification_tasks(glue_dir):
    with pytest.raises(ConfigError, match="seq_len applies to language-model tasks"):
        load_task("sst2", str(glue_dir), seq_len=64)


def test_folder_without_text_files(tmp_path):
    with pytest.raises(DataError, match=r"no train\.txt or valid\.txt"):
        load_task("lm", str(tmp_path))


def test_task_file_of_kind_lm(tmp_path):
    path = tmp_path / "wiki.json"
    path.write_text(json.dumps({"kind": "lm", "name": "wiki-short", "seq_len": 128}), encoding="utf-8")
    from qanalyze.tasks import get_task

    spec = get_task(str(path))
    assert (spec.kind, spec.seq_len, spec.num_labels, spec.main_metric) == ("lm", 128, None, "perplexity")


# ---------------------------------------------------------------------------------------------
# Perplexity, KL, agreement


def _plain_perplexity(model, windows) -> float:
    weighted, tokens = 0.0, 0
    with torch.inference_mode():
        for window in windows.input_ids:
            loss = model(input_ids=window[None], labels=window[None]).loss
            weighted += float(loss) * (windows.seq_len - 1)
            tokens += windows.seq_len - 1
    return math.exp(weighted / tokens)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "gpt2_dir"])
def test_perplexity_equals_a_plain_transformers_loop(request, fixture, wikitext_sample_dir):
    lm_task = load_task("lm", str(wikitext_sample_dir)).task
    loaded = load_model(str(request.getfixturevalue(fixture)), num_labels=lm_task.num_labels)
    assert type(loaded.model).__name__.endswith(("ForCausalLM", "LMHeadModel")) and has_task_head(loaded.model)
    data = load_task("lm", str(wikitext_sample_dir), seq_len=48, max_eval_examples=5)
    windows = encode(data.dev, loaded.tokenizer, max_length=128)
    assert len(windows) == 5
    result = evaluate(loaded.model, loaded.tokenizer, windows, data.task, batch_size=2)  # batches of 2, 2, 1
    expected = _plain_perplexity(loaded.model, windows)
    assert result.metrics["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert result.loss == pytest.approx(math.log(expected), rel=1e-6) and result.examples == 5


@pytest.fixture(scope="module")
def llama_windows(tiny_llama_dir, wikitext_sample_dir):
    loaded = load_model(str(tiny_llama_dir))
    data = load_task("lm", str(wikitext_sample_dir), seq_len=32, max_eval_examples=4)
    return loaded, encode(data.dev, loaded.tokenizer)


def test_model_against_itself_has_zero_kl_and_full_agreement(llama_windows):
    loaded, windows = llama_windows
    same = compare_lm(loaded.model, windows, loaded.model, batch_size=3)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    assert same.tokens == 4 * 31


def test_kl_against_a_perturbed_model_matches_float64(llama_windows, tiny_llama_dir):
    loaded, windows = llama_windows
    perturbed = load_model(str(tiny_llama_dir)).model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    from_model = compare_lm(perturbed, windows, loaded.model, batch_size=2)
    from_logits = compare_lm(perturbed, windows, reference_logits(loaded.model, windows), batch_size=3)
    with torch.inference_mode():
        ref = torch.log_softmax(loaded.model(input_ids=windows.input_ids).logits[:, :-1].double(), -1)
        other = torch.log_softmax(perturbed(input_ids=windows.input_ids).logits[:, :-1].double(), -1)
    expected_kl = float((ref.exp() * (ref - other)).sum(-1).mean())
    expected_agreement = float((ref.argmax(-1) == other.argmax(-1)).double().mean())
    assert from_model.kl > 0
    assert from_model.kl == pytest.approx(expected_kl, rel=1e-4)
    assert from_logits.kl == pytest.approx(from_model.kl, rel=1e-6)
    assert from_model.top1_agreement == from_logits.top1_agreement == pytest.approx(expected_agreement)


def test_lm_evaluation_refuses_a_classifier(tiny_bert_dir, wikitext_sample_dir):
    loaded = load_model(str(tiny_bert_dir))
    data = load_task("lm", str(wikitext_sample_dir), seq_len=32)
    with pytest.raises(ModelFormatError, match="sequence-classification head"):
        evaluate_lm(loaded.model, encode(data.dev, loaded.tokenizer))


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_evaluate_prints_perplexity(capfd, tiny_llama_dir, wikitext_sample_dir, tmp_path):
    task = tmp_path / "lm32.json"
    task.write_text(json.dumps({"kind": "lm", "name": "lm", "seq_len": 32}), encoding="utf-8")
    code, out, err = run_cli(capfd, "evaluate", tiny_llama_dir, "--task", task, "--data", wikitext_sample_dir,
                             "--max-eval-windows", "3", "--out", tmp_path / "eval.json")
    assert code == 0, err
    record = json.loads((tmp_path / "eval.json").read_text())
    assert out.startswith("lm dev (3 examples): perplexity ")
    assert record["metrics"]["perplexity"] == pytest.approx(float(out.split("perplexity ")[1].split()[0]), rel=1e-4)
    assert record["data"]["seq_len"] == 32 and "warning" not in err


@pytest.mark.parametrize(("text", "fragments"), [
    ("", ("test.txt holds no text (0 tokens)",)),
    ("just a few words here", ("test.txt has 5 tokens, fewer than one window of 512",)),
])
def test_cli_short_text(capfd, tiny_llama_dir, tmp_path, text, fragments):
    (tmp_path / "test.txt").write_text(text, encoding="utf-8")
    code, _, err = run_cli(capfd, "evaluate", tiny_llama_dir, "--task", "lm", "--data", tmp_path / "test.txt",
                           "--out", tmp_path / "eval.json")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "eval.json").exists()


def test_cli_lm_task_on_a_classifier(capfd, tiny_bert_dir, wikitext_sample_dir):
    code, _, err = run_cli(capfd, "evaluate", tiny_bert_dir, "--task", "lm", "--data", wikitext_sample_dir)
    assert_one_line_error(code, err, "task lm needs a causal language model", "sequence-classification head")


def test_cli_classification_task_on_a_causal_lm(capfd, tiny_llama_dir, glue_dir):
    code, _, err = run_cli(capfd, "evaluate", tiny_llama_dir, "--task", "sst2", "--data", glue_dir,
                           "--max-eval-examples", "4")
    assert_one_line_error(code, err, "task sst2 needs a trained classification head", "LlamaForCausalLM")


def test_cli_window_longer_than_the_context(capfd, tiny_llama_dir, wikitext_sample_dir):
    # the default 512-token windows of task lm exceed the tiny model's 64 positions
    code, _, err = run_cli(capfd, "evaluate", tiny_llama_dir, "--task", "lm", "--data",
                           wikitext_sample_dir / "test.txt")
    assert_one_line_error(code, err, "--seq-len 512 exceeds the model's position limit of 64 tokens")


def _evaluate_has_seq_len() -> bool:
    from qanalyze.cli import build_cli

    return any("--seq-len" in param.opts for param in build_cli().commands["evaluate"].params)


needs_seq_len = pytest.mark.skipif(not _evaluate_has_seq_len(),
                                   reason="`qanalyze evaluate` does not take --seq-len yet (cli.py / verbs.py wiring)")


@needs_seq_len
def test_cli_seq_len_and_text_field(capfd, tiny_llama_dir, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": "the quick brown fox jumps over the lazy dog"}) for _ in range(20)),
                    encoding="utf-8")
    code, out, err = run_cli(capfd, "evaluate", tiny_llama_dir, "--task", "lm", "--data", path, "--text-field", "body",
                             "--seq-len", "16", "--max-eval-windows", "4", "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert out.startswith("lm dev (4 examples): perplexity ")
    assert json.loads((tmp_path / "eval.json").read_text())["data"]["seq_len"] == 16


@needs_seq_len
@pytest.mark.parametrize(("task", "seq_len", "fragment"), [
    ("lm", "128", "--seq-len 128 exceeds the model's position limit of 64 tokens"),
    ("sst2", "16", "seq_len applies to language-model tasks (lm) only, not sst2"),
])
def test_cli_bad_seq_len(capfd, tiny_llama_dir, wikitext_sample_dir, glue_dir, task, seq_len, fragment):
    data = wikitext_sample_dir if task == "lm" else glue_dir
    code, _, err = run_cli(capfd, "evaluate", tiny_llama_dir, "--task", task, "--data", data, "--seq-len", seq_len)
    assert_one_line_error(code, err, fragment)


def test_evaluation_leaves_gradients_on(llama_windows):
    loaded, windows = llama_windows
    loaded.model.train()
    evaluate_lm(loaded.model, windows, batch_size=3)
    compare_lm(loaded.model, windows, loaded.model, batch_size=3)
    reference_logits(loaded.model, windows)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and loaded.model.training
    loaded.model.eval()
