"""Issue 2 target: FP32 fine-tuning of minilm-l6 on SST-2 reaches >= 85 % dev accuracy in <= 5 minutes.

Settings from the issue: 8,000 training examples (subset by seed), 1 epoch, batch 32, max length
64, learning rate 1e-4, full dev set (872). The wall time counts everything a user waits for:
data loading, model loading, training, evaluation and saving.

Baseline in the same run (``--baseline``): a plain PyTorch loop over the same examples and settings
(AdamW, linear schedule, no checkpoints, no logs), so the ratio shows what qanalyze's loop costs.

    .venv/bin/python benchmarks/finetune_sst2.py --baseline
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

import qanalyze
from qanalyze.data import collate, encode
from qanalyze.engine.evaluate import evaluate

BUDGET_SECONDS = 300.0
TARGET_ACCURACY = 0.85


def run_qanalyze(data_dir: str, examples: int, out: Path, seed: int) -> tuple[float, float]:
    start = time.perf_counter()
    data = qanalyze.load_task("sst2", data_dir, max_train_examples=examples, seed=seed)
    torch.manual_seed(seed)
    loaded = qanalyze.load_model("minilm-l6", num_labels=2)
    config = qanalyze.TrainConfig(epochs=1, batch_size=32, lr=1e-4, max_length=64, seed=seed, save_every=10**6)
    record = qanalyze.train(loaded, data, config, out, overwrite=True)
    return record.metrics["accuracy"], time.perf_counter() - start


def run_plain(data_dir: str, examples: int) -> tuple[float, float]:
    start = time.perf_counter()
    data = qanalyze.load_task("sst2", data_dir, max_train_examples=examples, seed=0)
    torch.manual_seed(0)
    loaded = qanalyze.load_model("minilm-l6", num_labels=2)
    model, tok = loaded.model, loaded.tokenizer
    train_enc = encode(data.train, tok, max_length=64)
    dev_enc = encode(data.dev, tok, max_length=64)
    steps = (len(train_enc) + 31) // 32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, round(0.06 * steps), steps)
    order = torch.randperm(len(train_enc), generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    for i in range(steps):
        batch = collate(train_enc, order[i * 32 : (i + 1) * 32], tok)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    accuracy = evaluate(model, tok, dev_enc, data.task).metrics["accuracy"]
    return accuracy, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/glue"))
    parser.add_argument("--examples", type=int, default=8000)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (subset, order, head init)")
    parser.add_argument("--baseline", action="store_true", help="also time a plain PyTorch loop (seed 0)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"torch threads {torch.get_num_threads()}, {args.examples} SST-2 training examples, 1 epoch, "
          f"seeds {seeds}")
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            accuracy, seconds = run_qanalyze(args.data, args.examples, Path(tmp) / "run", seed)
        results.append((accuracy, seconds))
        print(f"qanalyze finetune, seed {seed}: dev accuracy {accuracy:.4f}, wall {seconds:.1f} s", flush=True)
    accuracies = [a for a, _ in results]
    seconds = max(s for _, s in results)
    accuracy = statistics.mean(accuracies)
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    print(f"mean dev accuracy {accuracy:.4f} (std {spread:.4f} over {len(seeds)} seeds)")
    print(f"  accuracy / target {TARGET_ACCURACY}: {accuracy / TARGET_ACCURACY:.3f}  "
          f"({'met' if accuracy >= TARGET_ACCURACY else 'MISSED'})")
    print(f"  slowest wall / budget {BUDGET_SECONDS:.0f} s: {seconds / BUDGET_SECONDS:.3f}  "
          f"({'met' if seconds <= BUDGET_SECONDS else 'MISSED'})")
    if args.baseline:
        base_accuracy, base_seconds = run_plain(args.data, args.examples)
        accuracy, seconds = results[0]
        print(f"plain PyTorch loop: dev accuracy {base_accuracy:.4f}, wall {base_seconds:.1f} s")
        print(f"  qanalyze (seed {seeds[0]}) / plain wall time: {seconds / base_seconds:.3f}; "
              f"accuracy difference {100 * (accuracy - base_accuracy):+.2f} pt")


if __name__ == "__main__":
    main()
