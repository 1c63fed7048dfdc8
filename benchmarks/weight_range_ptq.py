"""What the weight range rule alone is worth: weight-only post-training quantization of an FP32 fine-tuned model
with a plan's bits and row groups, ranges set by the max rule and by MSE clipping, dev metric of each.

No training and no activation quantization: every planned module's weight is replaced by its quantized values
(symmetric, nearest rounding, the plan's groups), once with max|w| mapped to the largest code and once with each
group clipped at its `mse_clip` ratio. Prints the dev metric of FP32 and both rules, and the summed squared weight
error of each.

    .venv/bin/python benchmarks/weight_range_ptq.py --model runs/bench/sst2-fp32 --plan runs/bench/plan-3bit.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qanalyze
from qanalyze.data import encode
from qanalyze.engine.evaluate import evaluate
from qanalyze.models import head_dim, inventory
from qanalyze.quant.primitives import fake_quantize, rows_per_group
from qanalyze.records import BitPlan

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs/bench/sst2-fp32"))
    parser.add_argument("--plan", required=True)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    data = qanalyze.load_task(args.task, args.data, max_train_examples=1, seed=0)
    loaded = qanalyze.load_model(args.model, num_labels=data.task.num_labels)
    model = loaded.model.eval()
    dev = encode(data.dev, loaded.tokenizer, max_length=args.max_length)
    plan = BitPlan.load(args.plan)
    infos = {info.name: info for info in inventory(model)}
    originals = {name: model.get_submodule(name).weight.detach().clone()
                 for name, entry in plan.modules.items() if not entry.get("float")}
    metric = data.task.metrics[0]
    print(f"{args.model} on {args.task} dev ({len(dev)} examples), plan {args.plan}: "
          f"{plan.totals['weight_bits_mean']:.3f} mean weight bits over {len(originals)} modules", flush=True)
    print(f"fp32: {metric} {evaluate(model, loaded.tokenizer, dev, data.task).metrics[metric] * 100:.2f}", flush=True)
    results = {}
    for rule in ("max", "mse"):
        start, error = time.perf_counter(), 0.0
        with torch.no_grad():
            for name, weight in originals.items():
                entry, info = plan.modules[name], infos[name]
                rows = rows_per_group(weight.shape[0], entry["group"], head_dim=head_dim(model, info))
                rows = None if rows == weight.shape[0] else rows
                values = fake_quantize(weight, entry["weight_bits"], rows_per_group=rows, weight_range=rule)
                error += float((values.double() - weight.double()).square().sum())
                model.get_submodule(name).weight.copy_(values)
        seconds = time.perf_counter() - start
        value = evaluate(model, loaded.tokenizer, dev, data.task).metrics[metric] * 100
        results[rule] = (value, error)
        print(f"{rule} ranges: {metric} {value:.2f}, summed ||Q(W) - W||^2 {error:.1f} (quantized in {seconds:.1f} s)",
              flush=True)
    print(f"mse against max: {results['mse'][0] - results['max'][0]:+.2f} pt, squared error "
          f"{results['max'][1] / results['mse'][1]:.2f}x lower")


if __name__ == "__main__":
    main()
