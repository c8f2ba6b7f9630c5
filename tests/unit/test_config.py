"""Every shipped config loads; overrides and errors behave."""

from pathlib import Path

import pytest

from raydetr.config import ConfigError, build_config, load_config

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


def test_old_preset_names_fail_naming_the_new_one():
    for old, new in (("nano", "rtdetr-r18"), ("small", "rtdetr-r34"), ("medium", "rtdetr-r50")):
        with pytest.raises(ConfigError, match=f"renamed to '{new}'.*rfdetr-{old}"):
            load_config(None, [f"model.preset={old}"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, ["model.preset=rfdetr-huge"])


def test_rfdetr_resolution_rule_and_family_defaults():
    with pytest.raises(ConfigError, match="multiple of 56"):
        load_config(None, ["model.preset=rfdetr-base", "model.resolution=576"])
    assert load_config(None, ["model.preset=rfdetr-base", "model.resolution=560"])
    cfg = load_config(None, ["model.preset=rfdetr-nano", "optim.lr=3e-4"])
    # RF-DETR's recipe where the user set nothing; explicit values win
    assert (cfg.optim.lr, cfg.optim.lr_encoder, cfg.optim.warmup_steps) == (3e-4, 1.5e-4, 0)
    assert cfg.loss.cls_loss == "ia_bce" and cfg.model.num_denoising == 0
    # round trip (checkpoints store the config) keeps them
    assert build_config(cfg.to_dict()) == cfg
    assert load_config(None, []).loss.cls_loss == "varifocal"


def test_config_resolution_rule_is_the_models_patch_times_windows():
    from raydetr.config import RFDETR_PRESETS as NAMES
    from raydetr.config import resolution_multiple
    from raydetr.model.rfdetr.presets import RFDETR_PRESETS, resolution_step

    assert set(NAMES) == set(RFDETR_PRESETS)
    assert all(resolution_multiple(p) == resolution_step(p) for p in RFDETR_PRESETS)
