"""SmolLM2-135M on WikiText-2: qanalyze's perplexity against a plain transformers loop over the same windows,
and what the GGUF source costs (conversion once, then the cached reload).

1. Converts the `smollm2-135m` GGUF into a fresh cache folder (``--cache``, default a new temporary folder, so
   the conversion is timed) and loads it again from the cache.
2. `qanalyze.verbs.evaluate_run` (what `qanalyze evaluate smollm2-135m --task lm --data DATA` runs) on
   ``--windows`` windows of ``--seq-len`` tokens of test.txt.
3. A plain loop: the converted folder loaded with `AutoModelForCausalLM`, test.txt tokenized here (no special
   tokens), cut into windows and subset by the documented rule (`torch.randperm` with a generator seeded
   ``--seed``, kept in order), and ``exp(sum(loss_i * (L-1)) / sum(L-1))`` of ``model(input_ids=w, labels=w).loss``.
Prints both perplexities and their ratio (target: within 0.1 %).

    .venv/bin/python benchmarks/lm_evaluate.py --windows 8
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]


def plain_perplexity(folder: str, text_file: Path, windows: int, seq_len: int, seed: int) -> tuple[float, int]:
    """Perplexity of the converted model by a plain transformers loop, and the number of windows."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False,
                                 verbose=False)["input_ids"])
    count = ids.numel() // seq_len
    chunks = ids[: count * seq_len].view(count, seq_len)
    if windows < count:
        chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:windows].sort().values
        chunks = chunks[chosen]
    weighted, tokens = 0.0, 0
    with torch.inference_mode():
        for window in chunks:
            loss = model(input_ids=window[None], labels=window[None]).loss
            weighted += float(loss) * (seq_len - 1)
            tokens += seq_len - 1
    return math.exp(weighted / tokens), len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext-2"))
    parser.add_argument("--cache", default=None, help="Cache folder (default: a new temporary one, so the "
                                                      "conversion is timed).")
    args = parser.parse_args()
    os.environ["QANALYZE_CACHE"] = args.cache or tempfile.mkdtemp(prefix="qanalyze-cache-")

    from qanalyze.models import load_model
    from qanalyze.verbs import evaluate_run

    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    convert_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    reload_seconds = time.perf_counter() - start
    print(f"GGUF -> safetensors (first load, conversion included): {convert_seconds:.1f} s; cached reload "
          f"{reload_seconds:.2f} s; cache {loaded.identity['converted']}")

    if args.seq_len != 512:
        raise SystemExit("evaluate_run takes the lm task's default seq_len (512) until the CLI passes --seq-len")
    start = time.perf_counter()
    result = evaluate_run("smollm2-135m", task="lm", data=args.data, max_eval_examples=args.windows,
                          seed=args.seed, batch_size=8)
    ours = result.record.metrics["perplexity"]
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain, count = plain_perplexity(loaded.identity["converted"], Path(args.data) / "test.txt", args.windows,
                                    args.seq_len, args.seed)
    plain_seconds = time.perf_counter() - start
    print(f"qanalyze evaluate: perplexity {ours:.4f} on {result.record.examples} windows of {args.seq_len} "
          f"({ours_seconds:.1f} s, loading and tokenizing included)")
    print(f"plain transformers loop: perplexity {plain:.4f} on {count} windows ({plain_seconds:.1f} s)")
    print(f"ratio qanalyze / plain: {ours / plain:.6f} (|1 - ratio| = {abs(1 - ours / plain):.2e}; target < 1e-3)")


if __name__ == "__main__":
    main()
