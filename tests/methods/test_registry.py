"""The method registry: a method defined in this file is registered, trained and evaluated through the
CLI like a built-in one, and its config's own validation refuses bad settings with exit 2."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from qanalyze.cli import main
from qanalyze.errors import ConfigError
from qanalyze.methods import (
    METHODS,
    LoadedRun,
    Method,
    MethodConfig,
    Prepared,
    get_method,
    option,
    register,
    unregister,
)


@dataclass(frozen=True)
class ShrinkConfig(MethodConfig):
    """How much the toy method shrinks the task head before training."""

    factor: float = option(0.5, flag="--shrink-factor", type=float, help="multiply the task head by this.")
    label: str = option("toy", choices=("toy", "other"), help="a name recorded with the run.")

    def __post_init__(self) -> None:
        if not 0 < self.factor <= 1:
            raise ConfigError(f"shrink factor must lie in (0, 1], not {self.factor}")


class ShrinkMethod(Method):
    """Shrinks the classifier's weight, trains everything, saves a float model: the smallest real method."""

    name = "shrink"
    description = "toy: shrink the task head, then fine-tune in float"
    config_class = ShrinkConfig
    plan_use = "none"
    sweep_role = None

    def prepare(self, model, plan, config, *, seed):
        with torch.no_grad():
            model.classifier.weight.mul_(config.factor)
        return Prepared()

    def save(self, run, model, tokenizer, plan, config, prepared):
        from qanalyze.models import save_model

        save_model(model, tokenizer, run)

    def load_run(self, run, device, num_labels=None):
        from qanalyze.models import load_model

        loaded = load_model(str(run), num_labels=num_labels)
        return LoadedRun(loaded.model, loaded.tokenizer, Prepared(), quantized=False)


@pytest.fixture
def shrink():
    method = register(ShrinkMethod())
    yield method
    unregister(method.name)


def _train_args(model, data, out, *extra):
    return ["train", str(model), "--mode", "shrink", "--task", "sst2", "--data", str(data), "--out", str(out),
            "--max-train-examples", "32", "--max-eval-examples", "16", "--max-length", "24", "--max-steps", "2",
            "--batch-size", "16", "--quiet", *extra]


def test_a_method_registered_here_trains_and_evaluates_through_the_cli(capfd, tmp_path, tiny_bert_dir, glue_dir,
                                                                       shrink):
    assert main(["train", "--help"]) == 0
    help_text = capfd.readouterr().out
    assert "shrink options (--mode shrink)" in help_text and "--shrink-factor" in help_text
    out = tmp_path / "run"
    code = main(_train_args(tiny_bert_dir, glue_dir, out, "--shrink-factor", "0.25", "--label", "other"))
    _, err = capfd.readouterr()
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["mode"] == "shrink"
    assert record["settings"]["mode_options"] == {"factor": 0.25, "label": "other"}
    code = main(["evaluate", str(out), "--max-eval-examples", "16", "--quiet"])
    stdout, err = capfd.readouterr()
    assert code == 0, err
    saved = json.loads((out / "eval-sst2-dev.json").read_text())
    assert saved["model"]["mode"] == "shrink" and f"accuracy {saved['metrics']['accuracy']:.4f}" in stdout


def test_the_toy_configs_own_check_refuses_through_the_cli(capfd, tmp_path, tiny_bert_dir, glue_dir, shrink):
    out = tmp_path / "bad"
    code = main(_train_args(tiny_bert_dir, glue_dir, out, "--shrink-factor", "3"))
    _, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines == ["error: shrink factor must lie in (0, 1], not 3.0"], err
    assert not out.exists()


def test_an_option_of_another_method_is_refused(capfd, tmp_path, tiny_bert_dir, glue_dir, shrink):
    code = main(_train_args(tiny_bert_dir, glue_dir, tmp_path / "x", "--lss"))
    _, err = capfd.readouterr()
    assert code == 2 and "--lss applies to --mode int4 only" in err


def test_registry_names_and_refusals():
    assert list(METHODS)[:6] == ["fp32", "qat", "int", "ptq-dynamic", "int4", "qdylora"]
    with pytest.raises(ConfigError, match="unknown mode 'nope'; known: fp32"):
        get_method("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register(ShrinkMethod()) and register(ShrinkMethod())
    unregister("shrink")
    with pytest.raises(ConfigError, match="has no setting lsss"):
        get_method("int4").make_config({"lsss": True})


def test_method_registry_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, qanalyze.methods; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == "False"
