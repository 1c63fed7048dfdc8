"""What each inference engine runs: the weight bits and column layouts of its formats, one table shared by the
planner (``plan --target``) and the exporters.

A target maps each (bits, column layout) it can load to the name of the format that stores it. The planner's
column candidates are asymmetric (a float16 scale and an integer zero point per group, `qanalyze.quant.columns`),
so a target lists a pair when its engine runs that many bits in groups of that many columns; where the engine's
own format differs in detail, the table says so in the format name rather than hiding it:

- ``gptq`` (GPTQ checkpoints as GPTQModel and vLLM load them): 2, 3, 4 and 8 bits, groups of 32, 64, 128 or per
  row, with zero points (``qzeros``).
- ``torchao``: ``Int4WeightOnlyConfig`` (4 bits, groups of 32, 64 or 128, scales and zero points) and
  ``Int8WeightOnlyConfig`` (8 bits, one symmetric scale per row: the planner's 8-bit per-row candidate is
  asymmetric, a slightly smaller error than the engine's).
- ``gguf`` (llama.cpp): its weight types by name (`qanalyze.quant.ggml`): the legacy blocks of 32 (Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0) and the k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256, so only for rows of a
  multiple of 256 columns, where llama.cpp itself would fall back to a legacy type), each costed at its exact
  bytes and quantized by its own rules.
- ``compressed-tensors`` (``pack-quantized``, as vLLM loads it): 4 and 8 bits, groups of 32, 64, 128 or per row.
- ``any``: every candidate.

A target also says whether its engine fuses q/k/v and gate/up into one tensor (`Target.fuses`): vLLM-style
kernels do, so plans for ``gptq``, ``torchao`` and ``compressed-tensors`` (and ``any``, to be safe) tie them by
default; llama.cpp does not, so ``gguf`` plans do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qanalyze.errors import ConfigError
from qanalyze.quant.ggml_names import GGML_BITS


@dataclass(frozen=True)
class Target:
    """An engine's loadable weight formats: ``formats[(bits, layout)]`` is the format's name; ``None`` formats
    (target ``any``) allow every candidate."""

    name: str
    description: str
    formats: Mapping[tuple[int, str], str] | None
    fuses: bool = True
    """Whether the engine runs the projections it fuses (q/k/v, gate/up) as one tensor, so that they need one
    format: the planner's default ties (`qanalyze.plan.ties`) apply. llama.cpp stores them apart (its own mixes
    give ``attn_v`` more bits than ``attn_q``), so ``gguf`` plans are not tied by default."""

    def allows(self, bits: int, layout: str) -> bool:
        """Whether the engine runs ``bits`` in column ``layout``."""
        return self.formats is None or (bits, layout) in self.formats

    @property
    def layouts(self) -> tuple[str, ...]:
        """The column layouts the engine loads, in the table's order (empty for ``any``: no restriction)."""
        return () if self.formats is None else tuple(dict.fromkeys(layout for _, layout in self.formats))

    def format_name(self, bits: int, layout: str) -> str | None:
        """The engine's name for that format (None for ``any``, or when it has none)."""
        return None if self.formats is None else self.formats.get((bits, layout))


def _grid(bits: tuple[int, ...], layouts: tuple[str, ...], name: str) -> dict[tuple[int, str], str]:
    return {(b, layout): name.format(bits=b, layout=layout) for b in bits for layout in layouts}


TARGETS: dict[str, Target] = {
    "any": Target("any", "every candidate the analysis measured", None),
    "gptq": Target("gptq", "GPTQ checkpoints (GPTQModel, vLLM)",
                   _grid((2, 3, 4, 8), ("g32", "g64", "g128", "row"), "gptq {bits}-bit {layout}")),
    "torchao": Target("torchao", "torchao weight-only configs",
                      {**_grid((4,), ("g32", "g64", "g128"), "Int4WeightOnlyConfig(group_size={layout})"),
                       (8, "row"): "Int8WeightOnlyConfig"}),
    "gguf": Target("gguf", "llama.cpp weight types (legacy blocks of 32, k-quants in super-blocks of 256)",
                   {(bits, name): name for name, bits in GGML_BITS.items()}, fuses=False),
    "compressed-tensors": Target("compressed-tensors", "compressed-tensors pack-quantized (vLLM)",
                                 _grid((4, 8), ("g32", "g64", "g128", "row"), "pack-quantized {bits}-bit {layout}")),
}
"""Every target by name."""


def get_target(name: str) -> Target:
    """The target ``name``; ConfigError listing the known ones."""
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]
