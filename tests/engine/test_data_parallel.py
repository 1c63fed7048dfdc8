"""Training on two gloo ranks follows one process's loss curve (`qanalyze.engine.data_parallel`): ``finetune`` of a
tiny LLaMA on the ``lm`` task on two ranks (token-weighted losses, an uneven last batch), and ``train --mode
qat`` of a dropout-free tiny BERT, interrupted and resumed on two ranks; a global batch the ranks cannot share
is refused with one line. One launch of two processes, about 20 s on two cores (mostly imports)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from rank_helpers import two_ranks
from transformers import AutoTokenizer, BertForSequenceClassification

from qanalyze import load_task, verbs
from qanalyze.distributed import World
from qanalyze.engine import data_parallel
from qanalyze.engine.train import TrainConfig
from qanalyze.errors import ConfigError
from qanalyze.models import load_model

LOSS_TOLERANCE = 1e-5
"""Relative, per step over 20 steps, for the loss and the gradient norm: the ranks add the same gradients in another
order (and pad each share of a classification batch to its own longest example), float32 rounding that AdamW
carries from step to step. Measured worst: 1.7e-7 (fp32 lm), 3.4e-7 (qat at 4 bits)."""

STEPS = 20


def _log(run: Path) -> list[dict[str, float]]:
    with open(run / "log.csv") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _worst(one: list[dict[str, float]], two: list[dict[str, float]], column: str) -> float:
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    return max(abs(a[column] - b[column]) / abs(a[column]) for a, b in zip(one, two))


@pytest.fixture(scope="module")
def still_bert_dir(tmp_path_factory, tiny_bert_dir):
    """The tiny BERT without dropout, whose masks one process draws for the whole batch and each rank for its share."""
    folder = tmp_path_factory.mktemp("still-bert")
    BertForSequenceClassification.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """One process on one thread, as each rank runs (a tiny model's steps are slower on two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rank_one_of_two(monkeypatch):
    monkeypatch.setattr(data_parallel, "world", lambda: World(1, 2))


def test_one_process_takes_whole_batches_and_keeps_its_seeds(tiny_llama_dir, tiny_bert_dir):
    assert data_parallel.rank_share([4, 1, 3]) == [4, 1, 3] and data_parallel.rank_seed(7) == 7
    data_parallel.check_batch_size(3)
    data_parallel.check_last_batch(5, 4, 100)
    generator = torch.Generator().manual_seed(11)
    data_parallel.seed_rank_generators({"m": generator}, ())
    assert generator.initial_seed() == 11
    ids = torch.arange(12).reshape(2, 6)
    assert data_parallel.loss_items(load_model(str(tiny_llama_dir)).model, {"labels": ids}) == 10  # 2 x 5 next tokens
    assert data_parallel.loss_items(load_model(str(tiny_bert_dir), num_labels=2).model, {"labels": ids[:, 0]}) == 2


def test_rank_one_takes_the_second_slice_and_its_own_seeds(rank_one_of_two):
    assert data_parallel.rank_share([9, 8, 7, 6]) == [7, 6]
    assert data_parallel.rank_share([9, 8, 7]) == [7]  # the first rank takes the odd one
    assert data_parallel.rank_seed(7) != 7
    mine, shared = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    data_parallel.seed_rank_generators({"m": mine, "rank-sampler": shared}, {"rank-sampler"})
    assert mine.initial_seed() != 11 and shared.initial_seed() == 11
    with pytest.raises(ConfigError, match="multiple of 2"):
        data_parallel.check_batch_size(3)
    with pytest.raises(ConfigError, match="holds 1 of the 9 training examples"):
        data_parallel.check_last_batch(9, 4, 3)
    data_parallel.check_last_batch(9, 4, 2)  # the run ends before the last batch


ON_TWO_RANKS = """
import sys
from qanalyze import load_task, verbs
from qanalyze.cli import main
from qanalyze.engine.train import TrainConfig, TrainingInterrupted

bert, glue, llama, wikitext, out = sys.argv[1:]
data = load_task("sst2", glue, max_train_examples=45, max_eval_examples=8, seed=2)
config = TrainConfig(max_steps=20, batch_size=8, lr=1e-3, max_length=32, save_every=5, seed=4)

def stop_at_12(log):
    if log.step == 12:
        raise KeyboardInterrupt

try:
    verbs.train(bert, data, config, out + "/qat", mode="qat", plan="uniform:4", on_step=stop_at_12)
except TrainingInterrupted as exc:
    print(exc)
verbs.train(bert, data, config, out + "/qat", mode="qat", plan="uniform:4", resume=True)
# int4: stochastic rounding drawn per rank, block and step sizes chosen on the first global batch
from qanalyze.distributed import gather_objects
from qanalyze.models import load_model
loaded = load_model(bert, num_labels=2)
verbs.train(loaded, data, TrainConfig(max_steps=3, batch_size=8, max_length=32), out + "/int4", mode="int4",
            plan="uniform:4")
sums = gather_objects([float(p.detach().double().sum()) for p in loaded.model.parameters()])
print("int4 weights the same on every rank:", sums[0] == sums[1])
# last: the command line leaves the process group when it is done
sys.exit(main(["finetune", llama, "--task", "lm", "--data", wikitext, "--seq-len", "32", "--max-train-windows", "19",
               "--max-eval-windows", "2", "--max-steps", "20", "--batch-size", "4", "--lr", "1e-3", "--save-every",
               "20", "--out", out + "/lm", "-q"]))
"""


@pytest.fixture(scope="module")
def on_two_ranks(tmp_path_factory, still_bert_dir, glue_dir, tiny_llama_dir, wikitext_sample_dir):
    """One launch of two ranks (the imports are most of its time) that runs ``ON_TWO_RANKS``: ``qat`` into
    ``qat`` (interrupted at step 12, resumed from the checkpoint of step 10), then ``qanalyze finetune`` into
    ``lm``; returns the folder and the two ranks' outcomes."""
    out = tmp_path_factory.mktemp("two-ranks")
    ranks = two_ranks("-c", ON_TWO_RANKS, str(still_bert_dir), str(glue_dir), str(tiny_llama_dir),
                      str(wikitext_sample_dir), str(out))
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    return out, ranks


def test_finetune_on_two_ranks_follows_one_process(tmp_path, one_thread, on_two_ranks, tiny_llama_dir,
                                                   wikitext_sample_dir):
    # 19 windows in global batches of 4: the last batch of each epoch, 3 windows, is shared 2 + 1, so the ranks'
    # losses are means over different numbers of tokens
    data = load_task("lm", str(wikitext_sample_dir), seq_len=32, max_train_examples=19, max_eval_examples=2)
    config = TrainConfig(max_steps=STEPS, batch_size=4, lr=1e-3, save_every=STEPS)
    verbs.train(str(tiny_llama_dir), data, config, tmp_path / "one")
    out, ranks = on_two_ranks
    assert ranks[0].stdout.count("perplexity") == 1 and "perplexity" not in ranks[1].stdout  # rank 0 speaks
    one_log, two_log = _log(tmp_path / "one"), _log(out / "lm")
    assert _worst(one_log, two_log, "loss") < LOSS_TOLERANCE and _worst(one_log, two_log, "grad_norm") < LOSS_TOLERANCE
    assert sorted(p.name for p in (out / "lm").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_qat_on_two_ranks_resumed_follows_one_process(tmp_path, one_thread, on_two_ranks, still_bert_dir, glue_dir):
    data = load_task("sst2", str(glue_dir), max_train_examples=45, max_eval_examples=8, seed=2)
    config = TrainConfig(max_steps=STEPS, batch_size=8, lr=1e-3, max_length=32, save_every=5, seed=4)
    one = verbs.train(str(still_bert_dir), data, config, tmp_path / "one", mode="qat", plan="uniform:4")
    out, ranks = on_two_ranks
    assert all("interrupted at step 12; stopped without saving; the last checkpoint is step 10" in r.stdout
               for r in ranks)
    one_log, two_log = _log(tmp_path / "one"), _log(out / "qat")
    # each rank's own max|x| as its EMA range (no all_reduce): 4e-5 (loss), 2e-3 (gradient norm)
    assert _worst(one_log, two_log, "loss") < LOSS_TOLERANCE and _worst(one_log, two_log, "grad_norm") < LOSS_TOLERANCE
    two = json.loads((out / "qat" / "metrics.json").read_text())
    assert two["metrics"] == pytest.approx(one.metrics) and two["settings"]["ranks"] == 2


def test_ranks_that_draw_their_own_roundings_keep_the_same_weights(on_two_ranks):
    # int4 follows one process's training, not its numbers (data_parallel's docstring), but the ranks stay one model
    assert "int4 weights the same on every rank: True" in on_two_ranks[1][0].stdout


def test_a_batch_the_ranks_cannot_share_exits_2_with_one_line(capfd, tmp_path, rank_one_of_two, tiny_llama_dir,
                                                              wikitext_sample_dir):
    # the CLI's refusal as every rank gives it (rank 0 alone prints it: tests/test_distributed.py)
    code, _, err = run_cli(capfd, "finetune", tiny_llama_dir, "--task", "lm", "--data", wikitext_sample_dir,
                           "--seq-len", 32, "--batch-size", 3, "--out", tmp_path / "r", "-q")
    assert_one_line_error(code, err, "--batch-size 3 is the global batch, split over 2 ranks: it must be a multiple "
                                     "of 2")
    assert not (tmp_path / "r").exists()
