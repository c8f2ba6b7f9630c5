"""Every shipped config loads; overrides and errors behave."""

from pathlib import Path

import pytest

from raydetr.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert path.read_text().lstrip().startswith("#"), "each config's header says how to launch it"
    assert cfg.optim.epochs > 0


def test_configs_exist():
    assert len(CONFIGS) >= 3


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "ema.decays=[0.99,0.999]", "scaling.use_gpu=true"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.ema.all_decays == [0.99, 0.999]
    assert cfg.scaling.use_gpu is True


def test_unknown_key_names_key_and_known_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*lr_encoder"):
        load_config(None, ["optim.lrr=1"])


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"ema.decay"):
        load_config(None, ["ema.decay=1.5"])
    with pytest.raises(ConfigError, match=r"model.resolution"):
        load_config(None, ["model.resolution=100"])


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
