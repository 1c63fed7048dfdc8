"""GPTQModel's GPTQ on the same calibration and evaluation windows as `benchmarks/ptq_smollm2.py` (the reference
its perplexity is compared with). Runs in a separate virtual environment that has `gptqmodel` (it needs
torch >= 2.14.1, the project pins 2.13.0), so it imports nothing from qanalyze:

    python -m venv /tmp/gptqvenv && /tmp/gptqvenv/bin/pip install gptqmodel==7.7.0
    /tmp/gptqvenv/bin/python benchmarks/ptq_gptqmodel_reference.py --model FOLDER --calib calib.pt \
        --eval eval.pt --bits 4 --group-size 128 --out result.json

``calib.pt`` / ``eval.pt`` hold (windows, seq_len) token ids. The settings match plain GPTQ as qanalyze runs it:
damp 0.01, no act-order, no act-group-aware ordering, no static groups, no MSE clipping, and
``true_sequential=False`` (every linear of a layer calibrated on the layer's inputs, as qanalyze does).
Perplexity is ``exp`` of the token-weighted mean NLL of positions 1..L-1, the definition `evaluate_lm` uses.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL over positions 1..L-1 of every window), one window at a time."""
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            tokens += window.numel() - 1
    return math.exp(total / tokens)


def densify(model: torch.nn.Module) -> torch.nn.Module:
    """Every GPTQModel quantized linear replaced by a float32 `torch.nn.Linear` holding the weight its own
    ``dequantize_weight()`` gives: the same function, scored at float speed (its torch kernel dequantizes on
    every call, about a minute for one 128-token window at 4 bits on 2 cores)."""
    for name, module in list(model.named_modules()):
        if not hasattr(module, "dequantize_weight") or not hasattr(module, "qweight"):
            continue
        # (in, out): the torch kernel's forward is x @ dequantize_weight()
        weight = module.dequantize_weight(num_itr=module.g_idx.shape[0] // module.in_features).float().T
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    return model.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the converted SmolLM2 folder (safetensors)")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig

    calib = torch.load(args.calib)
    windows = torch.load(args.eval)
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=False,
                            act_group_aware=False, static_groups=False, damp_percent=args.damp, mse=0.0,
                            true_sequential=False, device="cpu")
    start = time.perf_counter()
    model = GPTQModel.load(args.model, quantize_config=config, dtype=torch.float32)
    dataset = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    model.quantize(dataset, batch_size=1)
    quantize_seconds = time.perf_counter() - start
    # after quantize() the in-memory model's weights are offloaded and packed: score the saved checkpoint,
    # reloaded with the pure-torch kernel (the one that runs on a CPU)
    folder = tempfile.mkdtemp(prefix="gptqmodel-")
    model.save(folder)
    del model
    start = time.perf_counter()
    reloaded = GPTQModel.load(folder, device="cpu", backend="torch")
    dense = densify(reloaded.model.eval())
    ppl = perplexity(dense, windows)
    result = {"gptqmodel_perplexity": ppl, "quantize_seconds": quantize_seconds,
              "eval_seconds": time.perf_counter() - start, "bits": args.bits, "group_size": args.group_size,
              "sym": args.sym, "calibration_windows": len(calib), "eval_windows": len(windows)}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
