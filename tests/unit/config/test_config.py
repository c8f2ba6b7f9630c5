"""Every shipped config loads; overrides and errors behave."""

from pathlib import Path

import pytest
import torch

from raydetr.config import ConfigError, build_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])


def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert path.read_text().lstrip().startswith("#"), "each config's header says how to launch it"
    assert cfg.optim.epochs > 0


def test_configs_exist():
    assert len(CONFIGS) >= 3


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "ema.decay=[0.99,0.999]", "scaling.use_gpu=true"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.ema.decay == [0.99, 0.999]
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


# Defect 2 (issue 11): every EMA schedule problem fails at load_config, naming the key.


@pytest.mark.parametrize("overrides, message", [
    (["ema.schedule=nope"], r"ema.schedule.*unknown EMA schedule 'nope'"),
    (["ema.schedule=rfdetr", "ema.schedule_kwargs={taux: 3}"],
     r"ema.schedule_kwargs.*unexpected keyword argument 'taux'"),
    (["ema.schedule=timm", "ema.schedule_kwargs={gamma: -1}"], r"ema.schedule.*gamma must be > 0"),
    (["ema.schedule=rdt_missing_mod:fn"], r"ema.schedule.*cannot import module 'rdt_missing_mod'"),
])


def test_ema_schedule_checked_at_load(overrides, message):
    from raydetr.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_exp_schedule_gets_total_steps_from_the_run():
    """exp needs total_steps; the worker supplies it (steps/epoch x epochs), so the config
    loads without it, and ModelEma passes it on."""
    from raydetr.ema.ema import ModelEma

    cfg = load_config(None, ["ema.schedule=exp"])
    ema = ModelEma(torch.nn.Linear(2, 2), decays=cfg.ema.decay, schedule="exp", total_steps=500)
    assert ema.schedule_kwargs["total_steps"] == 500


# Defect 3: one source of truth for the decays; a search over an overridden key is an error.


def test_decay_scalar_is_shorthand_and_decays_is_gone():
    from raydetr.config import ConfigError

    assert load_config(None, ["ema.decay=0.99"]).ema.decay == [0.99]
    assert load_config(None, ["ema.decay=[0.9,0.99]"]).ema.decay == [0.9, 0.99]
    with pytest.raises(ConfigError, match="'ema.decays' is now ema.decay"):
        load_config(None, ["ema.decays=[0.9,0.99]"])


def test_default_decay_search_reaches_every_trial():
    """The default search space (ema.decay grid) changes the decays each trial trains."""
    from raydetr.config import with_overrides

    base = load_config(None, ["ema.decay=[0.9,0.95]"])
    trials = [with_overrides(base, {"ema.decay": d}).ema.decay for d in (0.99, 0.993, 0.999)]
    assert trials == [[0.99], [0.993], [0.999]]


def test_search_over_overridden_key_is_an_error():
    from raydetr.config import ConfigError
    from raydetr.fit.search import _check_keys

    cfg = load_config(None, ["ema.enabled=false"])  # default space: ema.decay grid
    with pytest.raises(ConfigError, match=r"ema.decay \(ema.enabled is false\)"):
        _check_keys(cfg)
    cfg = load_config(None, ["ema.schedule_kwargs={tau: 5}",
                             "tune.search_space={ema.tau: {grid: [10, 20]}}"])
    with pytest.raises(ConfigError, match=r"ema.tau \(ema.schedule_kwargs.tau overrides it\)"):
        _check_keys(cfg)


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
    from raydetr.config.presets import RFDETR_PRESETS as NAMES
    from raydetr.config.presets import resolution_multiple
    from raydetr.model.rfdetr.presets import RFDETR_PRESETS, resolution_step

    assert set(NAMES) == set(RFDETR_PRESETS)
    assert all(resolution_multiple(p) == resolution_step(p) for p in RFDETR_PRESETS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)


def test_shipped_configs_need_nothing_outside_the_clone(path):
    """A user's clone has no ../shared: no shipped config may point outside the repository."""
    data_path = load_config(path).data.path
    assert data_path is None or not (data_path.startswith("..") or data_path.startswith("/")), (
        f"{path.name}: data.path {data_path} is outside the repository")


# ---- shorthand, where a bad value came from, descriptions ------------------------------------


def test_enabled_shorthand_for_sections_with_a_switch(tmp_path):
    cfg = load_config(None, ["ema.posthoc=true", "mlflow=false", "early_stopping=true"])
    assert (cfg.ema.posthoc.enabled, cfg.mlflow.enabled, cfg.early_stopping.enabled) == (
        True, False, True)
    # The section's other keys stay, set before or after the shorthand.
    cfg = load_config(None, ["ema.posthoc.sigma_rels=[0.03,0.2]", "ema.posthoc=true"])
    assert cfg.ema.posthoc.enabled and cfg.ema.posthoc.sigma_rels == [0.03, 0.2]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("ema:\n  posthoc: true\n  decay: 0.99\n")
    cfg = load_config(yaml_file, ["ema.posthoc.every_steps=7"])
    assert (cfg.ema.posthoc.enabled, cfg.ema.posthoc.every_steps) == (True, 7)
    assert load_config(yaml_file, ["ema.posthoc=false"]).ema.posthoc.enabled is False
    # Not a section with a switch: a bool there is still a type error, named.
    with pytest.raises(ConfigError, match="optim: Input should be a valid dictionary"):
        load_config(None, ["optim=true"])


def test_errors_name_the_argument_or_file_the_value_came_from(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=1e-4", "ema.decay=1.5", "scaling.num_workers=2"])
    text = str(err.value)
    assert "ema.decay: " in text and "from argument 'ema.decay=1.5')" in text
    assert "optim.lr=1e-4" not in text and "overrides" not in text
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"optim.lr: .*from {yaml_file}\)"):
        load_config(yaml_file)
    # A later argument replaces the file's value, and is then the one named.
    with pytest.raises(ConfigError, match=r"from argument 'optim.lr=-2'\)"):
        load_config(yaml_file, ["optim.lr=-2"])
    assert load_config(yaml_file, ["optim.lr=2e-4"]).optim.lr == 2e-4
    # A check across keys names every argument that set one of them.
    with pytest.raises(ConfigError, match="from argument 'model.preset=rfdetr-base', "
                                          "argument 'model.resolution=576'"):
        load_config(None, ["model.preset=rfdetr-base", "model.resolution=576"])
    with pytest.raises(ConfigError, match=r"^argument 'optim.nope=1': unknown config key"):
        load_config(None, ["optim.nope=1"])
    with pytest.raises(ConfigError, match=rf"^{yaml_file}: unknown config key 'optim.nope'"):
        yaml_file.write_text("optim:\n  nope: 1\n")
        load_config(yaml_file)
    from raydetr.config import with_overrides

    with pytest.raises(ConfigError, match=r"from trial config ema.decay=2.0\)"):
        with_overrides(load_config(None, []), {"ema.decay": 2.0}, "trial config")


def test_every_key_has_a_description():
    from raydetr.commands.config import iter_fields

    missing = [key for key, _, _, description, _ in iter_fields() if not description]
    assert not missing, f"keys without a description (raydetr config prints it): {missing}"
