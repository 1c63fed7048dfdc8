"""``int4``: 4-bit training (Xi et al., NeurIPS 2023): Hadamard quantizer with LSQ forward, bit splitting
and leverage-score sampling of the output gradient backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qanalyze.methods.base import MethodConfig, option
from qanalyze.methods.swap import SwapMethod


@dataclass(frozen=True)
class Int4Config(MethodConfig):
    """The int4 mode's settings; validated as `qanalyze.engine.int4.Int4Spec`, which they become."""

    lss: bool = option(False, flag="--lss", secondary="--no-lss",
                       help="leverage score sampling of the rows of the split output gradient (off: keep every "
                            "non-zero row, as the authors' released kernels do; measured more accurate here).")
    lss_input: bool = option(True, flag="--lss-input", secondary="--no-lss-input",
                             help="with --lss: sample the rows of the input-gradient product too (off: only the "
                                  "weight gradient's, so the gradient passed to earlier layers is not sampled).")
    keep_fraction: float = option(0.5, flag="--lss-keep", range=(0, 1, True),
                                  help="with --lss: expected fraction of the split gradient's rows kept (of the rows "
                                       "--lss-budget counts; 0.5 of all rows is the paper's N of 2N).")
    budget: str = option("rows", flag="--lss-budget", choices=("rows", "nonzero"),
                         help="with --lss: --lss-keep is a fraction of all 2N rows of the padded batch (rows, the "
                              "paper's compute budget) or of the non-zero rows only (stricter).")
    block: int | None = option(None, flag="--hq-block", range=(1, 1024, False), type=int,
                               help="Hadamard block size (a power of two; default: chosen per layer on the first "
                                    "batch).")

    def __post_init__(self) -> None:
        self.spec()  # Int4Spec names what is wrong

    def spec(self) -> Any:
        """The engine's `Int4Spec` of these settings."""
        from qanalyze.engine.int4 import Int4Spec

        return Int4Spec(block=self.block, lss=self.lss, keep_fraction=self.keep_fraction, lss_input=self.lss_input,
                        budget=self.budget)


class Int4Method(SwapMethod):
    """Linear layers and embeddings trained at 4 bits; layer norms in float."""

    name = "int4"
    engine_mode = "int4"
    description = ("4-bit training: Hadamard quantizer with LSQ forward, bit splitting and leverage score "
                   "sampling backward")
    config_class = Int4Config
    sweep_role = "reference"

    def sweep_recorded(self, config: MethodConfig) -> dict[str, Any]:
        """sweep.json keeps the int4 settings under ``int4``."""
        return {"int4": config.recorded()}


METHOD = Int4Method()
