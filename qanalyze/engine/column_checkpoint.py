"""The packed checkpoint of a post-training (``rtn``, ``gptq``) run: column-group codes, and a loader.

A PTQ run directory holds, beside ``metrics.json`` and the logs:

- ``config.json`` and the tokenizer files (what ``from_config`` needs to build the model);
- ``plan.json``: the plan the run followed; ``ptq.json``: the method, its settings, every module's errors
  and seconds (`qanalyze.ptq.quantize.PTQRecord`), and ``reference``, the model it was quantized from;
- ``weights.safetensors`` (`qanalyze.engine.packing`): for every quantized linear module ``NAME``, its codes
  packed to their bits with their float16 scales as ``NAME.weight`` (``(out, in)`` codes, ``(out, groups)``
  scales; signed when symmetric, unsigned ``0..2**bits-1`` when asymmetric), and when asymmetric its zero
  points as ``NAME.weight_zero`` (``(out, groups)``, unsigned, packed to the same bits, an empty scale).
  The per-tensor ``meta`` holds ``group_size`` (0: one group per row), ``scheme`` and ``partial_last``;
- a module in a GGML type (``Q4_K``...; `qanalyze.quant.ggml`) as three plain tensors: ``NAME.weight.ggml_codes``
  (int8 codes), ``NAME.weight.ggml_scale`` and, for the types with minima, ``NAME.weight.ggml_bias`` (float32, one
  per block: the products llama.cpp forms from its integer sub-block scales), the type named in the file's
  metadata ``ggml_types`` (a JSON object). They are the values, not llama.cpp's bytes: ``qanalyze export
  --format llama-cpp`` writes those;
- ``extra.safetensors``: every other tensor of the state dict in float32 (embeddings, norms, biases), an
  output embedding tied to the input one stored once.

`load_column_run` rebuilds the model and sets each quantized weight to ``(q − z) · s``, exactly what the
run evaluated (`qanalyze.quant.columns.ColumnQuantized.dequantize`): weight-only quantization runs in float.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from qanalyze.engine.packing import PackedTensor, load_packed, save_packed
from qanalyze.errors import ConfigError, RecordError
from qanalyze.models import _quiet_transformers, is_causal_lm_config
from qanalyze.quant.columns import ColumnQuantized, ColumnSpec
from qanalyze.quant.ggml import GGMLQuantized, get_ggml_type
from qanalyze.records import BitPlan, atomic_path, atomic_write_text

PLAN_FILE = "plan.json"
PTQ_FILE = "ptq.json"
WEIGHTS_FILE = "weights.safetensors"
EXTRA_FILE = "extra.safetensors"
ZERO_SUFFIX = "_zero"
GGML_PARTS = ("ggml_codes", "ggml_scale", "ggml_bias")
GGML_METADATA = "ggml_types"


def _packed(quantized: ColumnQuantized) -> dict[str, PackedTensor]:
    spec = quantized.spec
    meta = {"group_size": spec.group_size or 0, "scheme": "symmetric" if spec.symmetric else "asymmetric",
            "partial_last": int(spec.partial_last)}
    parts = {"": PackedTensor(q=quantized.q, scale=quantized.scale.to(torch.float16), bits=spec.bits,
                              signed=spec.symmetric, meta=meta)}
    if quantized.zero_point is not None:
        parts[ZERO_SUFFIX] = PackedTensor(q=quantized.zero_point, scale=torch.empty(0, dtype=torch.float16),
                                          bits=spec.bits, signed=False, meta={"role": "zero_point"})
    return parts


def _unpacked(key: str, packed: PackedTensor, zero: PackedTensor | None) -> ColumnQuantized:
    meta = packed.meta
    symmetric = meta.get("scheme") == "symmetric"
    if symmetric != (zero is None):
        raise RecordError(f"{key}: scheme {meta.get('scheme')} but {'a' if zero is not None else 'no'} zero point")
    spec = ColumnSpec(packed.bits, int(meta.get("group_size", 0)) or None, symmetric=symmetric,
                      partial_last=bool(meta.get("partial_last", 0)))
    return ColumnQuantized(q=packed.q, scale=packed.scale.float(), zero_point=None if zero is None else zero.q,
                           spec=spec)


def save_column_run(run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan,
                    quantized: dict[str, ColumnQuantized | GGMLQuantized], record: dict[str, Any], *,
                    exclude: frozenset[str] = frozenset()) -> None:
    """Write the packed checkpoint of ``model``, whose modules ``quantized`` names hold the codes, into ``run``,
    with ``record`` (the PTQ record, JSON-ready) as ``ptq.json``. State-dict keys in ``exclude`` are not stored
    (a trained run's engine buffers, which the plain model it reloads into has not)."""
    weights: dict[str, PackedTensor | torch.Tensor] = {}
    covered: set[str] = set()
    ggml_types: dict[str, str] = {}
    for name, codes in quantized.items():
        covered.add(f"{name}.weight")
        if isinstance(codes, GGMLQuantized):
            ggml_types[name] = codes.type.name
            for part, value in zip(GGML_PARTS, (codes.codes, codes.scale, codes.bias)):
                if value is not None:
                    weights[f"{name}.weight.{part}"] = value.contiguous()
            continue
        for suffix, part in _packed(codes).items():
            weights[f"{name}.weight{suffix}"] = part
    extra: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    for key, value in model.state_dict(keep_vars=False).items():
        if key in covered or key in exclude or not value.is_floating_point():
            continue
        if value.data_ptr() in stored:  # a tied output embedding: from_config ties it again
            continue
        stored.add(value.data_ptr())
        extra[key] = value.detach().float().cpu().contiguous()
    plan.save(run / PLAN_FILE)
    atomic_write_text(run / PTQ_FILE, json.dumps(record, indent=1) + "\n")
    save_packed(run / WEIGHTS_FILE, weights, {"format": "qanalyze/columns/v1", GGML_METADATA: json.dumps(ggml_types)})
    with atomic_path(run / EXTRA_FILE) as tmp:
        safetensors.torch.save_file(extra, str(tmp))
    model.config.save_pretrained(run)
    tokenizer.save_pretrained(run)


def is_column_run(run: Path) -> bool:
    """True when ``run`` holds a PTQ checkpoint written by `save_column_run`."""
    return all((run / name).is_file() for name in (PLAN_FILE, PTQ_FILE, WEIGHTS_FILE, EXTRA_FILE))


def load_column_run(run: str | Path, *, device: str | torch.device = "cpu") -> tuple[
        torch.nn.Module, Any, dict[str, Any], dict[str, ColumnQuantized | GGMLQuantized]]:
    """Rebuild the model of a PTQ run: float parts from ``extra``, each quantized weight ``(q − z) · s`` from
    its packed codes. Returns (model in eval mode, tokenizer, ptq.json's record, the codes by module)."""
    run = Path(run)
    if not is_column_run(run):
        raise RecordError(f"{run} holds no PTQ checkpoint ({PLAN_FILE}, {PTQ_FILE}, {WEIGHTS_FILE}, {EXTRA_FILE})")
    try:
        record = json.loads((run / PTQ_FILE).read_text())
    except (OSError, ValueError) as error:
        raise RecordError(f"{run / PTQ_FILE} is not readable JSON ({error})") from None
    tensors, metadata = load_packed(run / WEIGHTS_FILE)
    with _quiet_transformers(hide_progress=True):
        config = AutoConfig.from_pretrained(str(run), local_files_only=True)
        auto = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModelForSequenceClassification
        model = auto.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(str(run), local_files_only=True)
    codes: dict[str, ColumnQuantized | GGMLQuantized] = _ggml_codes(run, tensors, metadata)
    for key, packed in tensors.items():
        if key.endswith(ZERO_SUFFIX) or key.rsplit(".", 1)[-1] in GGML_PARTS:
            continue
        if not isinstance(packed, PackedTensor):
            raise RecordError(f"{run / WEIGHTS_FILE}: {key} is not a packed weight")
        zero = tensors.get(key + ZERO_SUFFIX)
        codes[key.removesuffix(".weight")] = _unpacked(key, packed, zero if isinstance(zero, PackedTensor) else None)
    state = safetensors.torch.load_file(str(run / EXTRA_FILE))
    for name, quantized in codes.items():
        state[f"{name}.weight"] = quantized.dequantize().float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {key for key in missing if getattr(config, "tie_word_embeddings", False) and key.endswith("lm_head.weight")}
    missing = [key for key in missing if key not in tied and not key.endswith("position_ids")]
    if missing or unexpected:
        raise RecordError(f"the checkpoint in {run} does not fit its config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    model.to(device).eval()
    return model, tokenizer, record, codes


def _ggml_codes(run: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> dict[str, GGMLQuantized]:
    """The modules stored in GGML types (`save_column_run`), by name."""
    try:
        types = json.loads(metadata.get(GGML_METADATA, "{}"))
        found = {}
        for name, type_name in types.items():
            parts = [tensors.get(f"{name}.weight.{part}") for part in GGML_PARTS]
            if parts[0] is None or parts[1] is None:
                raise RecordError(f"{run / WEIGHTS_FILE}: {name} is stored as {type_name} without its codes and scales")
            found[name] = GGMLQuantized(codes=parts[0], scale=parts[1], bias=parts[2], type=get_ggml_type(type_name))
        return found
    except (ValueError, AttributeError, ConfigError) as error:
        raise RecordError(f"{run / WEIGHTS_FILE}: unreadable {GGML_METADATA} ({error})") from None
