"""One rank's stage of a LLaMA-style causal LM split by decoder layers, loaded without the rest of the model.

A model too big for one process is cut into ``size`` contiguous stages (`split_layers`): rank 0 holds the
input embedding and the first layers, middle ranks a range of layers, the last rank its layers, the final norm,
the LM head and the loss. `load_stage` builds the whole model's skeleton on the meta device (no memory), drops
every module another rank owns, allocates what is left and fills it from the folder's safetensors files,
reading only this stage's tensors.

A tied LM head (``tie_word_embeddings``: the head's weight is the input embedding table) is held by the last
rank as a copy of ``model.embed_tokens.weight`` when the last rank is not rank 0; its parameter is then
measured as the table's second use (`qanalyze.sensitivity.pipeline` adds the contributions of both uses on
rank 0).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qanalyze.errors import ConfigError
from qanalyze.models import ModuleInfo, inventory

MODEL_TYPES = ("llama",)
"""``config.json`` model types whose checkpoints `load_stage` splits (LlamaForCausalLM and its look-alikes)."""

EMBEDDING = "model.embed_tokens"
"""The input embedding's module name; with tied embeddings also the LM head's weight in the report."""

HEAD = "lm_head"


@dataclass(frozen=True)
class StageSplit:
    """Which part of a model of ``layers`` decoder layers rank ``rank`` of ``size`` holds: layers
    ``start`` to ``stop`` (exclusive), plus the embedding on the first rank and the final norm, head and loss on
    the last."""

    rank: int
    size: int
    layers: int
    start: int
    stop: int

    @property
    def first(self) -> bool:
        """Whether this stage embeds the input ids (rank 0)."""
        return self.rank == 0

    @property
    def last(self) -> bool:
        """Whether this stage ends in the final norm, the LM head and the loss."""
        return self.rank == self.size - 1

    def owns(self, name: str) -> bool:
        """Whether the module (or parameter) ``name`` of the whole model belongs to this stage."""
        if name.startswith("model.layers."):
            return self.start <= int(name.split(".")[2]) < self.stop
        if name.startswith(EMBEDDING):
            return self.first
        return self.last  # model.norm, lm_head


def split_layers(layers: int, size: int, rank: int) -> StageSplit:
    """Rank ``rank``'s share of ``layers`` decoder layers cut into ``size`` contiguous stages as even as they
    go (the first ``layers mod size`` stages one layer more). ConfigError when there are more ranks than
    layers."""
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"rank {rank} of {size} ranks is not a pipeline position")
    if size > layers:
        raise ConfigError(f"a pipeline of {size} ranks needs at least {size} decoder layers (one per rank); the "
                          f"model has {layers}")
    base, extra = divmod(layers, size)
    start = rank * base + min(rank, extra)
    return StageSplit(rank, size, layers, start, start + base + (rank < extra))


class Stage:
    """This rank's part of the model (`load_stage`): ``model`` is the whole model's skeleton with only this
    stage's modules in it (the others are empty), ``split`` what it owns, ``infos`` the whole model's
    quantizable modules (`qanalyze.models.inventory`, as one process lists them), ``tied`` whether the LM head
    reuses the embedding table. The three ``embed`` / ``layers`` / ``head`` steps are the model's own forward
    cut at the stage's ends."""

    def __init__(self, model: nn.Module, split: StageSplit, infos: list[ModuleInfo], tied: bool) -> None:
        """Store a stage `load_stage` has built."""
        self.model, self.split, self.infos, self.tied = model, split, infos, tied
        self.config = model.config

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the parameters this rank holds (a shared parameter once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def weights(self) -> dict[str, nn.Parameter]:
        """Module name -> weight of every quantizable module of the whole model whose weight this stage holds,
        in model order. With a tied head on a last rank that is not rank 0, the head's copy of the table is
        listed under `EMBEDDING`: it is that module's weight, used a second time."""
        modules = dict(self.model.named_modules())
        found = {info.name: modules[info.name].weight for info in self.infos
                 if self.split.owns(info.name) and info.name in modules}
        if self.lends_table:
            found[EMBEDDING] = self.model.lm_head.weight
        return found

    @property
    def lends_table(self) -> bool:
        """Whether this rank's LM head is a copy of the tied table rank 0 holds (tied, last, not first): what is
        measured of that copy is sent to rank 0 and added to the table's own."""
        return self.tied and self.split.last and not self.split.first

    @property
    def receives_table(self) -> bool:
        """Whether this rank holds the tied table whose head copy the last rank lends (tied, first, not last)."""
        return self.tied and self.split.first and not self.split.last

    def embed(self, input_ids: Tensor) -> Tensor:
        """The input embeddings of ``input_ids`` (first stage only)."""
        return self.model.model.embed_tokens(input_ids)

    def layers(self, hidden: Tensor) -> Tensor:
        """This stage's decoder layers applied to ``hidden`` (batch, length, hidden size): causal attention
        over unpadded windows, positions from 0, as the whole model's forward runs them."""
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=positions)
        rotary = self.model.model.rotary_emb(hidden, position_ids=positions)
        for index in range(self.split.start, self.split.stop):
            hidden = self.model.model.layers[index](hidden, attention_mask=mask, position_embeddings=rotary,
                                                    position_ids=positions)
        return hidden

    def logits(self, hidden: Tensor) -> Tensor:
        """The next-token logits from the last layer's ``hidden`` (last stage only): the final norm and the LM
        head."""
        return self.model.lm_head(self.model.model.norm(hidden))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The next-token loss of ``labels`` from ``logits`` (last stage only), as ``LlamaForCausalLM`` computes
        it (it shifts the labels itself)."""
        return self.model.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)

    def head(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """The next-token loss of ``labels`` from the last layer's ``hidden`` (last stage only)."""
        return self.loss(self.logits(hidden), labels)


def llama_config(folder: Path) -> Any:
    """The transformers config of the model in ``folder`` with eager attention (its double backward is what
    Hessian products need). ConfigError for a folder without config.json or a model that is not LLaMA-style."""
    path = folder / "config.json"
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"pipelined analysis needs a model folder with config.json; cannot read {path}: "
                          f"{' '.join(str(exc).split())}") from None
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"pipelined analysis splits LLaMA-style decoders ({', '.join(MODEL_TYPES)}); {folder} "
                          f"holds a model of type {model_type!r}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")


def load_stage(model_dir: str | Path, rank: int, size: int) -> Stage:
    """Rank ``rank``'s stage of the model in ``model_dir`` split over ``size`` ranks, in float32 on the CPU,
    holding only its own parameters.

    ConfigError for a folder that is not a LLaMA-style causal LM's, one without safetensors files, more ranks
    than decoder layers, or files that lack one of the stage's tensors.
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    folder = Path(model_dir)
    config = llama_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"pipelined analysis reads safetensors files; {folder} has none (save the model with "
                          "save_pretrained first)")
    split = split_layers(config.num_hidden_layers, size, rank)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    infos = inventory(model)  # the whole model's, before the other stages' modules go
    for index in range(config.num_hidden_layers):
        if not split.start <= index < split.stop:
            model.model.layers[index] = nn.Module()
    if not split.first:
        model.model.embed_tokens = None
    if not split.last:
        model.model.norm, model.lm_head = None, None
    model.model.rotary_emb = None  # its frequencies are computed, not loaded: made again below on the CPU
    model.to_empty(device="cpu")
    model.float()
    if tied and split.first and split.last:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty allocates the two uses apart
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    _fill(model, files, tied)
    model.eval()
    model.requires_grad_(False)
    return Stage(model, split, infos, tied)


def _fill(model: nn.Module, files: list[Path], tied: bool) -> None:
    # Only this stage's tensors are read: safe_open maps the file and copies the named tensors alone.
    from safetensors import safe_open

    wanted = dict(model.named_parameters())
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(path), framework="pt")) for path in files]
        where = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 - not a dict
        for name, param in wanted.items():
            key = f"{EMBEDDING}.weight" if tied and name == f"{HEAD}.weight" and name not in where else name
            if key not in where:
                raise ConfigError(f"the safetensors files of the model lack {key}")
            tensor = where[key].get_tensor(key)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ConfigError(f"{key} has shape {tuple(tensor.shape)} in the files, {tuple(param.shape)} in "
                                  "the config")
            with torch.no_grad():
                param.copy_(tensor)

