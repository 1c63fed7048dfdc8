"""``gptq``: post-training GPTQ (Frantar et al. 2023) of every planned linear weight in its column groups,
calibrated layer by layer on the task's training windows or examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qanalyze.errors import ConfigError
from qanalyze.methods.base import MethodConfig, option
from qanalyze.methods.weight_ptq import WeightPTQConfig, WeightPTQMethod


@dataclass(frozen=True)
class GPTQMethodConfig(WeightPTQConfig):
    """GPTQ's settings (`qanalyze.ptq.gptq.GPTQConfig`) and its calibration."""

    calib_windows: int = option(128, flag="--calib-windows", type=int, range=(1, None, False),
                                help="calibration windows (task lm) or examples drawn from the training split "
                                     "(seeded by --seed; all of them when there are fewer).")
    damp: float = option(0.01, flag="--damp", range=(0, None, False),
                         help="dampening added to diag H, as a fraction of its mean (raised tenfold once, with a "
                              "warning, when H is still not positive definite).")
    act_order: bool = option(False, flag="--act-order", secondary="--no-act-order",
                             help="quantize columns by descending diag H, with static groups (scales fixed first).")
    block_size: int = option(128, flag="--gptq-block", type=int, range=(1, None, False),
                             help="columns per lazy block update.")
    calib_batch: int = option(4, flag="--calib-batch", type=int, range=(1, None, False),
                              help="calibration windows per forward pass (memory, not results).")

    def __post_init__(self) -> None:
        self.gptq()  # GPTQConfig names what is wrong

    def gptq(self) -> Any:
        """The `GPTQConfig` of these settings."""
        from qanalyze.ptq.gptq import GPTQConfig

        return GPTQConfig(damp=self.damp, block_size=self.block_size, act_order=self.act_order)


class GPTQMethod(WeightPTQMethod):
    """Each linear layer's weight quantized column by column with its rounding error spread by the inverse of
    the layer Hessian ``2XᵀX``, the inputs taken from the model whose earlier layers are already quantized."""

    name = "gptq"
    ptq_name = "gptq"
    description = "post-training GPTQ of the planned weights in column groups, calibrated on the task's data"
    config_class = GPTQMethodConfig

    def ptq_config(self, config: MethodConfig) -> Any:
        """The config's `GPTQConfig`."""
        assert isinstance(config, GPTQMethodConfig)
        return config.gptq()

    def quantize_options(self, config: MethodConfig) -> dict[str, Any]:
        """Calibration windows per forward."""
        assert isinstance(config, GPTQMethodConfig)
        return {"batch_size": config.calib_batch}

    def calibration(self, data: Any, config: MethodConfig, seed: int) -> Any:
        """``calib_windows`` windows (or examples) of ``data``, drawn without replacement by ``seed``."""
        assert isinstance(config, GPTQMethodConfig)
        if data is None:
            raise ConfigError("gptq needs calibration data (--task and --data)")
        from qanalyze.ptq.calibrate import draw_calibration

        return draw_calibration(data, config.calib_windows, seed=seed)


METHOD = GPTQMethod()
