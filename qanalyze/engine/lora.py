"""QDyLoRA building blocks: a frozen quantized base with dynamic-rank LoRA adapters.

QDyLoRA (Rajabzadeh et al., EMNLP 2024 industry) puts DyLoRA adapters (Valipour et al., EACL 2023)
on a frozen quantized model. Each optimizer step draws a rank ``b`` in 1..r and trains the adapters
truncated to their first ``b`` rows of A and columns of B, scaled by ``alpha / b``; afterwards the
adapters can be cut at any rank without retraining, so one run serves every rank::

    y = x W_baseᵀ + bias + (alpha / b) · (x A[:b]ᵀ) B[:, :b]ᵀ

``W_base`` is the original weight quantized (the plan's bits and groups, or NF4) and dequantized to
float: a frozen buffer, never a Parameter. In DyLoRA's "frozen" update mode only row ``b-1`` of A and
column ``b-1`` of B receive gradients at rank ``b`` (the lower ranks were learnt when they were
drawn); in "all" mode the whole truncated adapter does.

`apply_qdylora` holds the policy: which modules get adapters (regexes on names), how bases are
quantized, what stays trainable (the adapters and the task head only). `RankSampler` draws the rank
of each step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qanalyze.engine.functions import TensorSpec, quantize_weight, weight_clip
from qanalyze.errors import ConfigError
from qanalyze.models import NORM_KINDS, ModuleInfo, head_dim, inventory, module_generator, parent_module
from qanalyze.plan.architecture import check_plan
from qanalyze.plan.entries import QuantizedEntry
from qanalyze.quant.nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from qanalyze.quant.primitives import Quantized, is_positive_int, module_weight_range, rows_per_group
from qanalyze.records import BitPlan

UPDATE_MODES = ("frozen", "all")
"""DyLoRA's update modes: only the sampled rank's row / column ("frozen"), or the whole truncation."""

BASES = ("plan", "nf4")
"""How the base weight of an adapted module is quantized: as the plan says, or QLoRA's NF4."""

DEFAULT_HEAD = (r"(?:^|\.)classifier(?:\.|$)", r"(?:^|\.)score$")
"""Module names of task heads (BERT / RoBERTa ``classifier``, GPT-2 ``score``): trained in full."""

DEFAULT_SCHEME = "symmetric"
"""Quantizer of a plan entry that names none: max-calibrated scales, as QLoRA's absmax."""

_SPEC_BITS = 16
"""Activation and gradient bits of the specs built here: only the weight is quantized."""


@dataclass(frozen=True)
class LoRAConfig:
    """Settings of QDyLoRA adapters.

    ``rank``: the largest rank r (the adapters serve 1..r); ``alpha``: the scale numerator (the
    update is scaled by alpha / rank); ``targets``: regexes searched in module names, the nn.Linear
    modules that match get adapters; ``update``: "frozen" or "all" (see the module docstring);
    ``base``: "plan" (the plan's bits and groups; float where the plan has no entry or no plan is
    given) or "nf4" (blocks of ``nf4_block_size``, with ``double_quant`` optional); ``dropout``: on
    the adapter's input; ``head``: regexes of the task-head modules that stay trainable.
    """

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    update: str = "frozen"
    base: str = "plan"
    double_quant: bool = False
    nf4_block_size: int = 64
    dropout: float = 0.0
    head: tuple[str, ...] = DEFAULT_HEAD

    def __post_init__(self) -> None:
        if not is_positive_int(self.rank):
            raise ConfigError(f"LoRA rank must be a positive integer, not {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0 \
                or not math.isfinite(self.alpha):
            raise ConfigError(f"LoRA alpha must be a positive number, not {self.alpha!r}")
        for field_name in ("targets", "head"):
            _check_patterns(field_name, getattr(self, field_name))
        if not self.targets:
            raise ConfigError("LoRA targets must name at least one module pattern")
        if self.update not in UPDATE_MODES:
            raise ConfigError(f"unknown LoRA update {self.update!r}; known: {', '.join(UPDATE_MODES)}")
        if self.base not in BASES:
            raise ConfigError(f"unknown LoRA base {self.base!r}; known: {', '.join(BASES)}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"double_quant must be True or False, not {self.double_quant!r}")
        if self.double_quant and self.base != "nf4":
            raise ConfigError("double_quant applies to the NF4 base only (base='nf4')")
        if not is_positive_int(self.nf4_block_size):
            raise ConfigError(f"nf4_block_size must be a positive integer, not {self.nf4_block_size!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be a number in [0, 1), not {self.dropout!r}")


def _check_patterns(field_name: str, patterns: object) -> None:
    # a bare string would be taken as a tuple of one-character patterns, and a list would make the
    # frozen config mutable: both are refused rather than silently converted
    if not isinstance(patterns, tuple) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"LoRA {field_name} must be a tuple of non-empty regex strings, not {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"LoRA {field_name} pattern {pattern!r} is not a valid regex: {exc}") from None


@dataclass(frozen=True)
class LoRAAdapter:
    """An adapter cut at one rank, for export: ``delta W = scaling · B @ A``, A ``(rank, in)``,
    B ``(out, rank)``, ``scaling = alpha / rank``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """The adapter's rank (rows of A)."""
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The weight update ``scaling · B @ A``, shape ``(out, in)``: add it to the base to merge."""
        return self.scaling * (self.B @ self.A)


PackedBase = Quantized | NF4Tensor
"""The quantized form of a base weight: the plan's integer codes and scales, or NF4 codes and scales."""


class DyLoRALinear(nn.Module):
    """A linear layer with a frozen (dequantized) base weight and a dynamic-rank LoRA adapter.

    The base weight and bias are buffers named ``weight`` and ``bias`` (the state-dict keys of the
    original layer, holding the dequantized values), so nothing trains them; ``lora_A`` (r x in,
    Kaiming-uniform from ``generator``) and ``lora_B`` (out x r, zeros, so the adapted layer starts
    equal to its base) are the Parameters. ``rank`` (1..r, r by default) selects the truncation.
    ``packed`` is the quantized base (None: the float weight, unquantized); ``generator`` also
    draws the dropout masks.
    """

    def __init__(self, linear: nn.Linear, config: LoRAConfig, generator: torch.Generator, *,
                 packed: PackedBase | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"DyLoRALinear wraps an nn.Linear, not {type(linear).__name__}")
        weight = linear.weight
        if not isinstance(generator, torch.Generator) or generator.device.type != weight.device.type:
            raise ConfigError(f"DyLoRALinear needs a torch.Generator on the weight's device ({weight.device})")
        base = weight.detach().clone() if packed is None else packed.dequantize().to(weight.dtype)
        if base.shape != weight.shape:
            raise ConfigError(f"the packed base has shape {tuple(base.shape)}, the weight {tuple(weight.shape)}")
        self.register_buffer("weight", base)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rank, self.alpha, self.update, self.dropout = config.rank, config.alpha, config.update, config.dropout
        self.generator = generator
        self._packed = packed
        self._rank = config.rank
        a = torch.empty(config.rank, linear.in_features, dtype=weight.dtype, device=weight.device)
        # a = sqrt(5): nn.Linear's and peft's init, a uniform bound of 1 / sqrt(in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, config.rank, dtype=weight.dtype,
                                               device=weight.device))

    @property
    def rank(self) -> int:
        """The rank the forward pass uses, 1..max_rank."""
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        if not is_positive_int(value) or value > self.max_rank:
            raise ConfigError(f"adapter rank must be an integer from 1 to {self.max_rank}, not {value!r}")
        self._rank = value

    @property
    def scaling(self) -> float:
        """``alpha / rank`` at the current rank (DyLoRA scales by the truncated rank)."""
        return self.alpha / self._rank

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B truncated to the current rank, with gradients only where the update mode allows."""
        b = self._rank
        a, bm = self.lora_A[:b], self.lora_B[:, :b]
        if self.update == "frozen":
            # Split into a detached and a live part rather than masking gradients with a hook: the cut is
            # local to this forward pass (no hook to register, keep in step with the rank, or remove),
            # autograd then gives exact zeros to every other row / column, and the values are unchanged.
            a = torch.cat([self.lora_A[: b - 1].detach(), self.lora_A[b - 1 : b]], dim=0)
            bm = torch.cat([self.lora_B[:, : b - 1].detach(), self.lora_B[:, b - 1 : b]], dim=1)
        return a, bm

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0:
            return x
        # drawn from the module's generator (nn.Dropout would use the global random state)
        keep = torch.rand(x.shape, generator=self.generator, dtype=x.dtype, device=x.device) >= self.dropout
        return x * keep / (1 - self.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        base = nn.functional.linear(x, self.weight, self.bias)
        return base + self.scaling * nn.functional.linear(nn.functional.linear(self._dropout(x), a), b)

    def truncated(self, rank: int | None = None) -> LoRAAdapter:
        """The adapter cut at ``rank`` (the current rank by default), detached copies, for export."""
        rank = self._rank if rank is None else rank
        if not is_positive_int(rank) or rank > self.max_rank:
            raise ConfigError(f"adapter rank must be an integer from 1 to {self.max_rank}, not {rank!r}")
        return LoRAAdapter(A=self.lora_A[:rank].detach().clone(), B=self.lora_B[:, :rank].detach().clone(),
                           scaling=self.alpha / rank)

    def packed_base(self) -> PackedBase | None:
        """The quantized base weight (codes and scales) for saving; None when the base is float.

        Kept as built (on the device the weight was on then): the buffer ``weight`` is its dequantized value.
        """
        return self._packed

    def extra_repr(self) -> str:
        base = "float" if self._packed is None else ("nf4" if isinstance(self._packed, NF4Tensor)
                                                     else f"W{self._packed.bits}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self._rank}/"
                f"{self.max_rank}, alpha={self.alpha}, update={self.update}, base={base}")


def adapters(model: nn.Module) -> dict[str, DyLoRALinear]:
    """Every DyLoRALinear of ``model`` by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, DyLoRALinear)}


def set_rank(model: nn.Module | Mapping[str, DyLoRALinear], rank: int) -> None:
    """Set ``rank`` on every adapter of ``model`` (a model, or `apply_qdylora`'s mapping), e.g. to
    evaluate at a fixed rank. Raises ConfigError when there is none or the rank is out of range."""
    found = adapters(model) if isinstance(model, nn.Module) else dict(model)
    if not found:
        raise ConfigError("the model has no DyLoRA adapters (run apply_qdylora first)")
    for module in found.values():
        module.rank = rank


def trainable_parameters(model: nn.Module, rank: int) -> int:
    """Parameters ``model`` trains with its adapters cut at ``rank``: rank x (in + out) per adapter, plus
    every other trainable parameter (the task head)."""
    found = adapters(model)
    adapter_ids = {id(p) for module in found.values() for p in (module.lora_A, module.lora_B)}
    others = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids)
    return others + sum(min(rank, m.max_rank) * (m.in_features + m.out_features) for m in found.values())


class RankSampler:
    """Draws the rank of each optimizer step, uniformly in 1..r, from an explicit ``torch.Generator``.

    ``step()`` draws a rank and sets it on every adapter; call it once per optimizer step, before the
    forward pass. All adapters must share r. The generator can be saved to resume the same draws.
    """

    def __init__(self, model: nn.Module | Mapping[str, DyLoRALinear], generator: torch.Generator) -> None:
        if not isinstance(generator, torch.Generator):
            raise ConfigError(f"RankSampler needs a torch.Generator, not {type(generator).__name__}")
        self.adapters = adapters(model) if isinstance(model, nn.Module) else dict(model)
        if not self.adapters:
            raise ConfigError("the model has no DyLoRA adapters (run apply_qdylora first)")
        ranks = {module.max_rank for module in self.adapters.values()}
        if len(ranks) != 1:
            raise ConfigError(f"the adapters have different maximum ranks {sorted(ranks)}; one sampler needs one r")
        self.max_rank: int = ranks.pop()
        self.generator = generator

    def draw(self) -> int:
        """A rank uniform in 1..max_rank (one draw from the generator; nothing is set)."""
        return int(torch.randint(1, self.max_rank + 1, (), generator=self.generator, device=self.generator.device))

    def step(self) -> int:
        """Draw a rank, set it on every adapter, and return it."""
        rank = self.draw()
        set_rank(self.adapters, rank)
        return rank


def _base_spec(name: str, entry: QuantizedEntry, info: ModuleInfo, model: nn.Module) -> TensorSpec:
    """The weight quantization a plan entry asks for (its bits, groups and scheme)."""
    try:
        rows = None
        if info.kind not in NORM_KINDS:
            rows = rows_per_group(info.shape[0], entry.group, head_dim=head_dim(model, info))
        return TensorSpec(weight_bits=entry.weight_bits, activation_bits=_SPEC_BITS, gradient_bits=_SPEC_BITS,
                          rows_per_group=None if rows == info.shape[0] else rows,
                          quantizer=entry.scheme or DEFAULT_SCHEME,
                          weight_range=module_weight_range(info.kind, entry.weight_range))
    except ConfigError as exc:
        raise ConfigError(f"plan module {name}: {exc}") from None


def _fake_quantize_(module: nn.Module, info: ModuleInfo, spec: TensorSpec) -> None:
    """Replace ``module.weight``'s values by their quantized-dequantized values (in place, on purpose)."""
    weight = module.weight
    matrix = weight.t() if info.transposed else weight
    values = quantize_weight(matrix, spec, weight_clip(matrix, spec)).dequantize().to(weight.dtype)
    with torch.no_grad():
        weight.copy_(values.t() if info.transposed else values)


def adapted_modules(model: nn.Module, targets: tuple[str, ...]) -> set[str]:
    """The names of the nn.Linear modules whose name matches a pattern of ``targets`` (they get adapters);
    ConfigError naming the patterns when none does."""
    chosen = {name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and _matches(name, targets)}
    if not chosen:
        raise ConfigError(f"no nn.Linear module name matches the LoRA targets {', '.join(targets)}")
    return chosen


def apply_qdylora(model: nn.Module, plan: BitPlan | None, config: LoRAConfig, seed: int = 0) -> dict[str, DyLoRALinear]:
    """Turn ``model`` (in place) into a QDyLoRA model; return the adapters by module name.

    Every nn.Linear whose name matches a pattern of ``config.targets`` becomes a `DyLoRALinear`, its
    base quantized as ``config.base`` says (the plan entry's bits, groups and scheme, or NF4). Every
    other module the plan quantizes has its weight replaced by the quantized-dequantized values.
    Then every parameter is frozen except the adapters and the task head (``config.head``); the
    head is trained in float even if the plan quantizes it. Each adapter's generator (on its
    weight's device) is seeded from ``seed`` and the module's position. Raises ConfigError naming
    the patterns when no nn.Linear matches, and for a plan of another architecture.
    """
    infos = {info.name: info for info in inventory(model)}
    if plan is not None:
        check_plan(plan, {info.name: list(info.shape) for info in infos.values()})
    named = list(model.named_modules())
    chosen = adapted_modules(model, config.targets)

    built: dict[str, DyLoRALinear] = {}
    for index, (name, module) in enumerate(named):
        info = infos.get(name)  # None for a module with no weight of its own (a container, a tied weight)
        entry = plan.entry(name) if plan is not None and info is not None else None
        spec = _base_spec(name, entry, info, model) if isinstance(entry, QuantizedEntry) else None
        if name in chosen:
            if config.base == "nf4":
                packed = nf4_quantize(module.weight, config.nf4_block_size, config.double_quant)
            else:
                packed = None if spec is None else quantize_weight(module.weight, spec,
                                                                   weight_clip(module.weight, spec))
            generator = module_generator(seed, index, module.weight.device)
            built[name] = DyLoRALinear(module, config, generator, packed=packed)
            parent, child = parent_module(model, name)
            setattr(parent, child, built[name])
        elif spec is not None and not _matches(name, config.head):
            _fake_quantize_(module, info, spec)
        elif config.base == "nf4" and isinstance(module, nn.Linear) and not _matches(name, config.head):
            # an NF4 base is the whole frozen base in NF4 (QLoRA), not only the modules with adapters
            with torch.no_grad():
                module.weight.copy_(nf4_dequantize(nf4_quantize(module.weight.detach(), config.nf4_block_size,
                                                                config.double_quant)).to(module.weight.dtype))

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, DyLoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
        elif _matches(name, config.head):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return built


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    # re caches compiled patterns, so searching by string costs no recompilation
    return any(re.search(pattern, name) for pattern in patterns)
