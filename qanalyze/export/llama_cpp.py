"""``--format llama-cpp``: llama.cpp's GGUF files and ``llama-quantize`` recipes.

Recipe: ``tensor-types.txt``, what ``llama-quantize --tensor-type-file`` reads: whitespace-separated
``pattern=type`` tokens, the pattern a regular expression searched in each GGUF tensor name (llama.cpp
lower-cases it) and the type a GGML type name. Each line anchors one tensor's full name
(``^blk\\.0\\.attn_q\\.weight$=q4_k``), so no pattern also matches ``blk.10``. Modules the plan keeps in float
(and the embeddings and output, which plans never quantize) are pinned to ``f32``: the plan measured its damage
with them in float, and left to ``llama-quantize`` they would take its base type's choice, a model nobody
measured (delete those lines for a smaller file). ``llama-quantize.sh`` holds the command line; its base type
only names the file type, since every tensor is pinned. The file has no comments: llama.cpp reads every
token as a pattern.

Checkpoint: ``model.gguf`` written with the ``gguf`` package, architecture ``llama``: the hyperparameters from the
run's config, the tokenizer (`qanalyze.export.gguf_vocab`), every quantized module in its GGML type as
llama.cpp's exact blocks (`qanalyze.quant.ggml_pack`) and every other tensor (embeddings, norms, float linears)
in F32, so llama.cpp computes with exactly the weights qanalyze evaluated. A run's column codes are stored where a
GGML type does the same arithmetic (symmetric 4-, 5- and 8-bit groups of 32: Q4_0, Q5_0, Q8_0); q_proj and
k_proj rows are permuted as llama.cpp's converter permutes them (its rotary embedding pairs neighbouring rows),
which moves whole rows of blocks and leaves every block as it was; transformers' GGUF loader undoes it.
`LlamaCppExporter.load` is transformers' ``from_pretrained(folder, gguf_file="model.gguf")``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.errors import ConfigError
from qanalyze.export.base import Exporter, ExporterConfig
from qanalyze.export.ggml_layouts import SAME_CODES
from qanalyze.export.gguf_names import check_architecture, gguf_module_name, gguf_tensor_name
from qanalyze.export.layouts import Expressed

if TYPE_CHECKING:
    import numpy as np
    import torch

    from qanalyze.export.source import ExportSource

RECIPE_FILE = "tensor-types.txt"
SCRIPT_FILE = "llama-quantize.sh"
GGUF_FILE = "model.gguf"
FLOAT_TYPE = "f32"
UNPLANNED = ("token_embd", "output")
"""GGUF tensors a plan never quantizes (the embeddings and the LM head), pinned to `FLOAT_TYPE` in the recipe."""

FILE_TYPES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
"""``llama-quantize``'s file type of a GGML type, where the names differ."""


def tensor_types(source: ExportSource, expressed: Expressed) -> dict[str, str]:
    """GGUF tensor name -> lower-case type name, for every module the plan lists, the float ones ``f32``."""
    types = {gguf_module_name(name) + ".weight": layout.ggml or layout.layout
             for name, layout in expressed.layouts.items()}
    types.update({gguf_module_name(name) + ".weight": kind for name, kind in source.other.items()})
    types.update({gguf_module_name(name) + ".weight": FLOAT_TYPE for name in source.floats})
    for name in UNPLANNED:
        types.setdefault(f"{name}.weight", FLOAT_TYPE)
    return {name: kind.lower() for name, kind in types.items()}


def _pattern(name: str) -> str:
    return "^" + name.replace(".", "\\.") + "$"


def _script(types: dict[str, str]) -> str:
    counts = Counter(kind for kind in types.values() if kind != FLOAT_TYPE)
    base = counts.most_common(1)[0][0].upper() if counts else "F32"
    file_type = FILE_TYPES.get(base, base)
    return "\n".join([
        "#!/bin/sh",
        "# Quantize a model with the types of a qanalyze plan (one anchored pattern=type per tensor in",
        f"# {RECIPE_FILE}). The input is the model in float: python convert_hf_to_gguf.py MODEL --outtype f32",
        f"# --outfile model-f32.gguf. Every tensor is pinned, so {file_type} only names the file type;",
        "# add --imatrix FILE to let llama.cpp weigh its k-quant search (the plan measured plain rounding).",
        'set -e',
        f'llama-quantize --tensor-type-file "$(dirname "$0")/{RECIPE_FILE}" "${{1:-model-f32.gguf}}" '
        f'"${{2:-model-plan.gguf}}" {file_type}',
        "",
    ])


def _llama_permuted(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows ``(heads * 2 * half, ...)`` of one projection in llama.cpp's order: within each head, the rows of
    each rotary pair's first halves interleaved with their second halves."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type", "default") != "default":
        raise ConfigError(f"llama-cpp writes plain rotary embeddings, not rope type {parameters.get('rope_type')!r}")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_hyperparameters(writer: Any, config: Any, name: str) -> None:
    """The ``llama.*`` keys of Hugging Face config ``config``."""
    check_architecture(getattr(config, "model_type", None))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _quantized(name: str, codes: Any, layout: Any) -> Any:
    """The run's codes of module ``name`` as a `GGMLQuantized` (column codes only in a `SAME_CODES` type, checked
    to dequantize to the same values)."""
    import torch

    from qanalyze.quant.columns import ColumnQuantized
    from qanalyze.quant.ggml import GGML_TYPES, GGMLQuantized

    if not isinstance(codes, ColumnQuantized):
        return codes
    kind = None if layout is None else layout.ggml
    if kind not in SAME_CODES or codes.zero_point is not None:
        raise ConfigError(f"llama-cpp cannot store the codes of {name} in a llama.cpp type; quantize with a plan "
                          "made with --target gguf")
    quantized = GGMLQuantized(codes=codes.q.to(torch.int8), scale=codes.scale.float(), bias=None,
                              type=GGML_TYPES[kind])
    if not torch.equal(quantized.dequantize(), codes.dequantize().float()):
        raise ConfigError(f"llama-cpp: {name}'s codes in {kind} would not give the weights the run evaluated")
    return quantized


def gguf_tensors(source: ExportSource, expressed: Expressed) -> dict[str, tuple[np.ndarray, Any]]:
    """GGUF name -> (array, raw GGML type or None for F32), in the state dict's order."""
    import numpy as np
    from gguf import GGMLQuantizationType

    from qanalyze.quant.ggml_pack import pack_ggml

    assert source.model is not None
    config = source.model.config
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": config.num_key_value_heads or config.num_attention_heads}
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head" not in source.codes
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for key, value in source.model.state_dict().items():
        module = key.rpartition(".")[0]
        if tied and module == "lm_head":
            continue
        name = gguf_tensor_name(key)
        if module in source.codes and key.endswith(".weight"):
            quantized = _quantized(module, source.codes[module], expressed.layouts.get(module))
            try:
                array, raw = pack_ggml(quantized), GGMLQuantizationType[quantized.type.name]
            except ValueError as error:
                raise ConfigError(f"llama-cpp cannot store {module}: {error}") from None
        else:
            array, raw = value.detach().cpu().float().numpy(), None
        kind = name.split(".")[-2]
        if kind in heads and name.endswith(".weight"):
            array = _llama_permuted(array, heads[kind])
        tensors[name] = (np.ascontiguousarray(array), raw)
    return tensors


class LlamaCppExporter(Exporter):
    """llama.cpp: ``llama-quantize`` tensor-type recipes and GGUF checkpoints."""

    name = "llama-cpp"
    target = "gguf"
    description = "llama.cpp GGUF files and llama-quantize --tensor-type-file recipes"
    requires = ("gguf",)
    ggml_types = True

    def recipe(self, source: ExportSource, expressed: Expressed, config: ExporterConfig) -> dict[str, str]:
        """``tensor-types.txt`` (one anchored ``pattern=type`` a line) and ``llama-quantize.sh``."""
        types = tensor_types(source, expressed)
        lines = "".join(f"{_pattern(name)}={kind}\n" for name, kind in types.items())
        return {RECIPE_FILE: lines, SCRIPT_FILE: _script(types)}

    def checkpoint(self, source: ExportSource, expressed: Expressed, staging: Path,
                   config: ExporterConfig) -> dict[str, Any]:
        """``model.gguf``; returns the types' tensor counts and the bytes beyond the tensors' own."""
        import gguf

        from qanalyze.export.gguf_vocab import gguf_vocab

        assert source.model is not None
        model_config = source.model.config
        tensors = gguf_tensors(source, expressed)
        writer = gguf.GGUFWriter(str(staging / GGUF_FILE), "llama")
        write_hyperparameters(writer, model_config, source.path.name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = gguf_vocab(source.tokenizer, model_config.vocab_size)
        vocab.write(writer)
        for name, (array, raw) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = sum(array.nbytes for array, _ in tensors.values())
        types = Counter("F32" if raw is None else raw.name for _, raw in tensors.values())
        return {"file": GGUF_FILE, "tensor_types": dict(sorted(types.items())), "tokenizer": vocab.model,
                "pre_tokenizer": vocab.pre,
                "metadata_bytes": (staging / GGUF_FILE).stat().st_size - data}

    def load(self, path: Path) -> torch.nn.Module:
        """transformers' GGUF loader: ``from_pretrained(path, gguf_file="model.gguf")``, float32, eval mode."""
        import torch
        from transformers import AutoModelForCausalLM

        from qanalyze.models import _quiet_transformers

        with _quiet_transformers(hide_progress=True):
            return AutoModelForCausalLM.from_pretrained(str(path), gguf_file=GGUF_FILE, dtype=torch.float32,
                                                        local_files_only=True).eval()

    def overhead_bytes(self, expressed: Expressed) -> int:
        """The GGML types' bytes beyond the column layouts the plan costed (none for Q4_0, Q5_0, Q8_0, which
        store a group of 32 in the same bytes; a snapped layout's extra). The file's header, metadata,
        tokenizer and alignment are export.json's ``metadata_bytes``; its float tensors are F32, as plans cost
        them."""
        extra_bits = 0
        for layout in expressed.layouts.values():
            if layout.ggml is not None:
                extra_bits += layout.storage_bits - replace(layout, ggml=None).storage_bits
        return extra_bits // 8


EXPORTER = LlamaCppExporter()
