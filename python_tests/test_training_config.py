"""Trainer configs: file (JSON/TOML) + command line through HfArgumentParser, types, ranges,
cross-field rules, one error listing every problem, and the config hash."""
import dataclasses
import json

import pytest

from xlt_fast.training import ConfigError, TrainerConfig, arg, config_hash, load_config, replace, validate
from xlt_fast.training.config import config_help


@dataclasses.dataclass
class DemoConfig(TrainerConfig):
    variant: str = arg("plain", "plain or fancy")
    lr: float = arg(1e-3, "learning rate", gt=0)
    epochs: int = arg(4, "epochs", ge=1, le=100)
    mode: "Mode" = arg("a", "mode")  # noqa: F821 (resolved below)
    flag: bool = arg(True, "a switch")
    priors: list[str] = arg(["source"], "list field")

    def check(self):
        problems = super().check()
        if self.mode == "b" and self.epochs > 10:
            problems.append("epochs: mode b needs epochs <= 10")
        return problems


from typing import Literal  # noqa: E402

Mode = Literal["a", "b"]


def test_defaults_file_then_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 0.5\nepochs = 7\nmode = "b"\npriors = ["peaked:law:0.5"]\n')
    cfg = load_config(DemoConfig, path, ["--epochs", "9", "--no_flag"])
    assert (cfg.lr, cfg.epochs, cfg.mode, cfg.flag, cfg.priors) == (0.5, 9, "b", False, ["peaked:law:0.5"])
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"lr": 1, "flag": False}))
    cfg = load_config(DemoConfig, j, ["--flag", "--priors", "0.5", "0.5"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.flag is True and cfg.priors == ["0.5", "0.5"]
    assert load_config(DemoConfig).epochs == 4


def test_every_problem_in_one_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"lr": "1e-5", "epoks": 3, "mode": "c"}))
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, path, ["--epochs", "0", "--seed", "x", "--bogus", "1"])
    text = str(err.value)
    problems = err.value.problems
    assert len(problems) == 6, text
    assert f"lr (from {path}): expected a number, got '1e-5' (write numbers without quotes)" in text
    assert f"epoks ({path}): unknown field; did you mean 'epochs'?" in text
    assert f"mode (from {path}): expected one of 'a', 'b', got 'c'" in text
    assert "epochs (from the command line): must be >= 1, got 0" in text
    assert "seed (from the command line): cannot read 'x' as int" in text
    assert "bogus (the command line): unknown field" in text


def test_cross_field_rule_and_range(tmp_path):
    with pytest.raises(ConfigError, match="mode b needs epochs <= 10"):
        load_config(DemoConfig, None, ["--mode", "b", "--epochs", "20"])
    with pytest.raises(ConfigError, match="lr: must be > 0, got 0.0"):
        validate(DemoConfig(lr=0.0))
    with pytest.raises(ConfigError, match="epochs: expected an integer, got 2.5"):
        validate(DemoConfig(epochs=2.5))


def test_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "lr": 0.1,\n  "epochs": \n}')
    with pytest.raises(ConfigError, match=r"broken.json, line 4, column 1"):
        load_config(DemoConfig, path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(DemoConfig, tmp_path / "missing.toml")
    (tmp_path / "c.yaml").write_text("lr: 1")
    with pytest.raises(ConfigError, match="expected a .json or .toml file"):
        load_config(DemoConfig, tmp_path / "c.yaml")


def test_hash_ignores_run_only_fields():
    a = DemoConfig()
    assert config_hash(a) == config_hash(replace(a, output_dir="/x", log_every=3, progress=False))
    assert config_hash(a) != config_hash(replace(a, lr=0.1))
    assert config_hash(a) != config_hash(replace(a, seed=1))


def test_help_lists_fields_with_defaults():
    text = config_help(DemoConfig)
    assert "--lr LR" in text and "learning rate (default: 0.001)" in text and "--no_flag" in text
