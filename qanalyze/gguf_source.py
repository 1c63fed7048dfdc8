"""GGUF files as a model source: dequantize once through transformers' GGUF support, keep the result.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, which needs the `gguf`
package) and dequantizes every tensor to float32; for SmolLM2-135M that takes 20 to 80 s, so the
float model and its tokenizer are saved once as a plain safetensors folder under the cache
(``$QANALYZE_CACHE``, else ``~/.cache/qanalyze``), in ``gguf/<sha256 of the file>/``. The folder is
written under a temporary name and renamed into place, so a killed conversion leaves no folder
that looks finished, and two processes converting the same file both end with a complete one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from qanalyze.errors import ModelFormatError

CACHE_ENV = "QANALYZE_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/qanalyze``)."""

_HASH_CHUNK = 1 << 20
_MAGIC = b"GGUF"
# GGUF spells a few architectures differently from transformers' model types
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
_DONE = "config.json"  # the target folder only ever appears whole (by rename), so this marks a finished one


def cache_root() -> Path:
    """The cache folder: ``$QANALYZE_CACHE`` when set, else ``~/.cache/qanalyze``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "qanalyze"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` a GGUF file declares; ModelFormatError when it is no GGUF file."""
    with path.open("rb") as handle:
        if handle.read(4) != _MAGIC:
            raise ModelFormatError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    import gguf  # imported here: only GGUF sources need it

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except (ValueError, OSError, IndexError) as err:
        raise ModelFormatError(f"{path}: cannot read its GGUF header: {err}") from err
    if not isinstance(architecture, str) or not architecture:
        raise ModelFormatError(f"{path}: its GGUF header names no general.architecture")
    return architecture


def check_loadable(path: Path, architecture: str) -> None:
    """ModelFormatError naming ``architecture`` unless transformers can load it as a causal language model."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = _GGUF_MODEL_TYPES.get(architecture, architecture)
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if model_type not in supported and architecture not in supported:
        raise ModelFormatError(
            f"{path}: GGUF architecture '{architecture}' cannot be loaded by transformers "
            f"{transformers.__version__} (it reads {', '.join(sorted(supported))})"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelFormatError(f"{path}: GGUF architecture '{architecture}' is not a causal language model")


def converted_folder(path: Path, digest: str | None = None) -> Path:
    """The float32 safetensors folder (model and tokenizer) of the GGUF file ``path``, made on first use.

    ``digest`` is the file's SHA-256 when the caller has it already. Raises ModelFormatError naming the
    architecture when transformers cannot load the file as a causal language model.
    """
    digest = digest or file_sha256(path)
    target = cache_root() / "gguf" / digest
    if (target / _DONE).is_file():
        return target
    architecture = gguf_architecture(path)
    check_loadable(path, architecture)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=target.parent))
    try:
        _convert(path, architecture, work)
        try:
            work.rename(target)
        except OSError:
            # another process finished the same conversion first: its folder is as good as ours
            if not (target / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(path: Path, architecture: str, out: Path) -> None:
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               local_files_only=True)
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ModelFormatError(f"{path}: cannot load its GGUF architecture '{architecture}': {first}") from err
    # The weights are plain float32 tensors now; the GGUF quantizer transformers leaves attached only
    # forbids saving them (it could not write GGUF back).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
