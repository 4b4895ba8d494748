"""Every shipped config file validates against the schema (a typo there would only show on the cluster)."""

from pathlib import Path

import pytest

from vlnflow.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [ROOT / "config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))], ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    config = load_config(path)
    assert config["train"]["deepspeed"] in ("zero2_offload", "zero2", "zero3")


def test_bad_setting_names_the_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  deepspeed: zero4\n")
    with pytest.raises(ConfigError, match="train.deepspeed"):
        load_config(bad)


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("spatial:\n  layers: -2\n")
    with pytest.raises(ConfigError, match="layers"):
        load_config(bad)
