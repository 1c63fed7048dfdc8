"""What ``qanalyze export`` reads: a plan file (an exporter writes the engine's recipe) or a post-training run
directory (an exporter writes a checkpoint holding the run's exact codes).

Only runs holding a packed column checkpoint (`qanalyze.engine.column_checkpoint`: ``rtn``, ``gptq``, and
training runs of column plans that save one) are exported: their integer codes, float16 scales and zero points
are what every format stores. Other runs (int, int4 learned step sizes, QDyLoRA) have no column layout and are
refused by mode. Modules planned or quantized in a llama.cpp (GGML) type rather than column groups are kept
apart (``other``): only an exporter that declares `Exporter.ggml_types` stores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.errors import ConfigError, InputError, RecordError
from qanalyze.export.layouts import ModuleLayout, layout_from_entry
from qanalyze.quant.ggml_names import is_ggml_layout

if TYPE_CHECKING:
    import torch

@dataclass
class ExportSource:
    """A plan or a run, as the exporters read it.

    ``layouts``: every quantized linear module's layout (from the plan's entries, or from the run's codes);
    ``floats``: modules kept in float that hold a 2-d weight (what a format's ignore list names); ``other``:
    modules in a layout that is not a column group (a llama.cpp type such as ``Q4_K``), name -> layout; for a
    run, also the rebuilt ``model`` (each quantized weight as the run evaluated it), its ``tokenizer`` and
    ``codes`` (`ColumnQuantized`, or the engine's record of a llama.cpp type for the ``other`` modules).
    """

    path: Path
    kind: str
    layouts: dict[str, ModuleLayout]
    floats: tuple[str, ...]
    other: dict[str, str] = field(default_factory=dict)
    mode: str | None = None
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    codes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_run(self) -> bool:
        """True for a run directory (a checkpoint is written), False for a plan (a recipe is written)."""
        return self.kind == "run"


def read_source(path: str | Path) -> ExportSource:
    """Read ``path``: a plan.json file or an rtn/gptq run directory; InputError naming what it is otherwise."""
    source = Path(path)
    if source.is_file():
        return _read_plan(source)
    if source.is_dir():
        return _read_run(source)
    raise InputError(f"{source} does not exist; export takes a plan.json or a run directory of quantize")


def _read_plan(path: Path) -> ExportSource:
    from qanalyze.records import BitPlan

    plan = BitPlan.load(path)
    shapes = plan.model["modules"]
    layouts: dict[str, ModuleLayout] = {}
    floats: list[str] = []
    other: dict[str, str] = {}
    for name, entry in plan.entries.items():
        shape = tuple(shapes.get(name, ()))
        if not entry.quantized:
            if len(shape) == 2:
                floats.append(name)
            continue
        if is_ggml_layout(entry.column_group):
            other[name] = entry.column_group
            continue
        if len(shape) != 2:
            raise ConfigError(f"the plan quantizes {name}, whose weight is not 2-d {list(shape)}; the export "
                              "formats store linear layers")
        layouts[name] = layout_from_entry(name, entry.weight_bits, entry.column_group, entry.group, entry.scheme,
                                          (int(shape[0]), int(shape[1])))
    return ExportSource(path, "plan", layouts, tuple(floats), other)


def _read_run(run: Path) -> ExportSource:
    from qanalyze.engine.column_checkpoint import is_column_run, load_column_run
    from qanalyze.ptq.quantize import linear_modules
    from qanalyze.quant.columns import ColumnQuantized
    from qanalyze.quant.ggml import GGMLQuantized
    from qanalyze.records import RunRecord
    from qanalyze.rundir import METRICS_FILE

    mode = RunRecord.load(run / METRICS_FILE).mode if (run / METRICS_FILE).is_file() else None
    if mode is None or not is_column_run(run):
        what = f"a {mode} run without a packed column checkpoint" if mode else "not a finished run directory"
        raise ConfigError(f"{run} is {what}; export takes plan files and the column checkpoints of rtn and gptq "
                          "runs (qanalyze quantize)")
    try:
        model, tokenizer, _, codes = load_column_run(run)
    except (OSError, ValueError) as error:
        raise RecordError(f"{run}: cannot read its checkpoint ({error})") from None
    layouts = {name: ModuleLayout(name, q.spec.bits, q.spec.group_size, q.spec.symmetric, tuple(q.q.shape))
               for name, q in codes.items() if isinstance(q, ColumnQuantized)}
    other = {name: q.type.name for name, q in codes.items() if isinstance(q, GGMLQuantized)}
    floats = tuple(name for name in linear_modules(model) if name not in codes)
    return ExportSource(run, "run", layouts, floats, other, mode=mode, model=model, tokenizer=tokenizer,
                        codes=codes)
