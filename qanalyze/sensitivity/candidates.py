"""The quantized weight of every candidate (bits x group layout) of one module, held as per-row steps.

A candidate's Q(W) is symmetric nearest rounding with one step per group of rows (`quantize_symmetric`):
``Q(w) = clamp(round(w / s), -qmax, qmax) * s``. The steps are all a candidate needs, and they are small
(one number per row), so `CandidateSteps` keeps them for every candidate at once and gives ΔW = Q(W) − W of
any candidate, or of some of its rows (the rows a batch looks up in an embedding table), on demand, without
holding a quantized copy of the weight per candidate. `weighted_errors` sums ``Σ F ⊙ ΔW²`` over every
candidate in cache-sized blocks of rows, as `qanalyze.sensitivity.errors.all_weight_errors` sums ``‖ΔW‖²``.

Column candidates (``g32``, ``g64``, ``g128``, ``row``; `qanalyze.quant.layouts`) are held the same way: their
float16 scales and zero points, ``(rows, groups)`` each, taken from `quantize_columns` with
``ColumnSpec(bits, G, symmetric=False)``; ΔW is recomputed from them with that module's own formulas, so it
equals ``quantize_columns(W, spec).dequantize() − W`` bit for bit. Rows quantize independently in column
groups, so the ΔW of some rows is those rows of the whole ΔW.

GGML types (``Q4_K``, ``Q3_K``...; `qanalyze.quant.ggml`) are held as their int8 codes, scales and minima
(`GGMLQuantized`, a byte per weight), ΔW the dequantized rows minus the weight's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.columns import column_codes, expand_groups, parse_column_layout, quantize_columns
from qanalyze.quant.ggml import GGMLQuantized, get_ggml_type, is_ggml_layout, quantize_ggml
from qanalyze.quant.layouts import column_fits, column_spec, is_column_layout, parse_layout
from qanalyze.quant.primitives import check_bits, mse_clip, qmax, rows_per_group, symmetric_scale

BLOCK_ELEMENTS = 1 << 18
"""`weighted_errors` reads a weight in blocks of rows of about this many elements (see `WEIGHT_ERROR_CHUNK`)."""


class CandidateSteps:
    """Per-row steps of every candidate (bits, group) of one weight (rows = its dim 0).

    ``steps[group][bits]`` is a ``(rows, 1)`` tensor in the weight's compute dtype. Layouts that do not fit
    the weight (a row count that does not divide it, ``head`` without ``head_dim``) are left out, as
    `qanalyze.quant.primitives.weight_errors` leaves them out. ``weight_range`` ``mse`` clips each group at its
    `mse_clip` ratio, the rule the plan and the engine apply.

    ``columns[group][bits]`` holds a column candidate's ``(scale, zero_point)``, each ``(rows, groups)``; it
    applies to a 2-d weight whose input width (dim 1) G divides, at 2 to 8 bits, and takes min/max ranges
    whatever ``weight_range`` (the caller decides which module kinds get column layouts at all:
    `qanalyze.quant.layouts.takes_columns`).
    """

    def __init__(self, weight: torch.Tensor, bits: Sequence[int], groups: Sequence[str | int], *,
                 head_dim: int | None = None, weight_range: str = "max") -> None:
        for b in bits:
            check_bits(b)
        if weight.dim() < 1 or weight.numel() == 0:
            raise ConfigError("a weight must be a non-empty tensor with at least one dimension")
        self.weight = weight.detach()
        self.bits = tuple(bits)
        flat = self.matrix
        row_max = flat.abs().amax(dim=1)
        self.steps: dict[str, dict[int, torch.Tensor]] = {}
        self.columns: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.ggml: dict[str, dict[int, GGMLQuantized]] = {}
        for name in dict.fromkeys(parse_layout(group) for group in groups):
            if is_column_layout(name):
                self._add_columns(name)
                continue
            try:
                per_group = rows_per_group(flat.shape[0], name, head_dim=head_dim)
            except ConfigError:
                continue  # this layout does not fit this weight: not a candidate
            group_max = row_max.amax().reshape(1) if per_group is None else row_max.view(-1, per_group).amax(dim=1)
            self.steps[name] = {}
            for b in self.bits:
                amax = group_max
                if weight_range == "mse":
                    amax = amax * mse_clip(flat, b, rows_per_group=per_group).reshape(-1)
                step = symmetric_scale(amax, b)
                repeat = flat.shape[0] if per_group is None else per_group
                self.steps[name][b] = step.repeat_interleave(repeat).unsqueeze(1)

    def _add_columns(self, name: str) -> None:
        if self.weight.dim() != 2:
            return  # a norm's gain or a convolution kernel has no input columns to group
        fitting = [b for b in self.bits if column_fits(b, name, self.weight.shape[1])]
        if fitting and is_ggml_layout(name):
            self.ggml[name] = {b: quantize_ggml(self.matrix, get_ggml_type(name)) for b in fitting}
        elif fitting:
            self.columns[name] = {}
            for b in fitting:
                found = quantize_columns(self.matrix, column_spec(b, name))
                self.columns[name][b] = (found.scale, found.zero_point)

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as (rows, columns), in float32 (float64 stays float64), the dtype the steps are in."""
        flat = self.weight.reshape(self.weight.shape[0], -1)
        return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()

    def candidates(self) -> Iterator[tuple[int, str]]:
        """Every (bits, group) held, bits outermost, row layouts before column layouts."""
        for b in self.bits:
            for group in self.steps:
                yield b, group
            for held in (self.columns, self.ggml):
                for group, by_bits in held.items():
                    if b in by_bits:
                        yield b, group

    def delta(self, bits: int, group: str, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """ΔW = Q(W) − W of candidate (``bits``, ``group``) as (rows, columns), or of the rows ``rows`` selects."""
        part = self.matrix if rows is None else self.matrix[rows]
        if group in self.columns:
            return self._column_delta(part, bits, group, rows)
        if group in self.ggml:
            found = self.ggml[group][bits]
            if rows is not None:
                found = GGMLQuantized(found.codes[rows], found.scale[rows],
                                      None if found.bias is None else found.bias[rows], found.type)
            return found.dequantize().to(part.dtype).sub_(part)
        step = self.steps[group][bits] if rows is None else self.steps[group][bits][rows]
        limit = qmax(bits)
        return torch.round(part / step).clamp_(-limit, limit).mul_(step).sub_(part)

    def _column_delta(self, part: torch.Tensor, bits: int, group: str,
                      rows: torch.Tensor | slice | None) -> torch.Tensor:
        scale, zero = self.columns[group][bits]
        if rows is not None:
            scale, zero = scale[rows], zero[rows]
        # `quantize_columns`' codes and `ColumnQuantized.dequantize`, elementwise the same operations on a
        # (rows, groups, G) view: (round(w / s) + z clamped to the codes, minus z) times s, then minus w
        count, columns = part.shape
        if columns % scale.shape[1]:
            # a shorter last group (g128p): each group's scale and zero point spread over its own columns
            width = parse_column_layout(group)[0]
            zero = expand_groups(zero.to(scale.dtype), width, columns)
            scale = expand_groups(scale, width, columns)
            codes = column_codes(part, scale, zero, bits)
            return codes.sub_(zero).mul_(scale).sub_(part)
        grouped = part.reshape(count, scale.shape[1], -1)
        zero = zero.unsqueeze(-1).to(scale.dtype)
        scale = scale.unsqueeze(-1)
        codes = column_codes(grouped, scale, zero, bits)
        return codes.sub_(zero).mul_(scale).reshape(count, columns).sub_(part)

    def weighted_errors(self, weights: torch.Tensor) -> dict[int, dict[str, float]]:
        """``{bits: {group: Σ weights ⊙ ΔW²}}`` summed in float64; ``weights`` has the weight's shape."""
        flat = weights.reshape(self.matrix.shape[0], -1)
        sums = {(b, g): torch.zeros((), dtype=torch.float64, device=flat.device) for b, g in self.candidates()}
        block = max(1, BLOCK_ELEMENTS // flat.shape[1])
        for start in range(0, flat.shape[0], block):
            rows = slice(start, start + block)
            factor = flat[rows].to(torch.float64).reshape(-1)
            for b, g in self.candidates():
                difference = self.delta(b, g, rows).to(torch.float64).reshape(-1)
                sums[b, g] += torch.dot(difference * difference, factor)
        return {b: {g: float(sums[b, g]) for b2, g in self.candidates() if b2 == b} for b in self.bits}
