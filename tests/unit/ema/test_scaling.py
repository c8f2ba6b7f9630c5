"""EMA batch scaling: 1 and 2 workers at the same ema.reference_batch average the same images."""

from __future__ import annotations

import pytest

from raydetr.config import ConfigError, load_config
from raydetr.ema.scaling import scale_for_batch


def _weight_on_images_ago(decay: float, batch: int, images: int) -> float:
    return decay ** (images / batch)  # weight kept on the model `images` images ago


@pytest.mark.parametrize("decay", [0.99, 0.993, 0.9999])
def test_one_and_two_workers_average_the_same_images(decay):
    per_worker, ref = 4, 4
    one = scale_for_batch([decay], 100, per_worker * 1, ref)
    two = scale_for_batch([decay], 100, per_worker * 2, ref)
    assert one.decays == [decay] and one.tau == 100
    assert two.decays[0] == pytest.approx(decay**2) and two.tau == 50
    for images in (8, 400, 4000):
        assert _weight_on_images_ago(one.decays[0], 4, images) == pytest.approx(
            _weight_on_images_ago(two.decays[0], 8, images), rel=1e-12)
    # The averaging window 1 / (1 - d) in images is the same to first order.
    w1, w2 = 4 / (1 - one.decays[0]), 8 / (1 - two.decays[0])
    assert w2 == pytest.approx(w1, rel=2 * (1 - decay))
    assert "k = 8/4 = 2" in two.describe()


def test_unset_reference_batch_changes_nothing():
    s = scale_for_batch([0.99, 0.999], 100, 32, None)
    assert s.decays == [0.99, 0.999] and s.k == 1.0 and "not scaled" in s.describe()


def test_config_validation():
    cfg = load_config(None, ["ema.reference_batch=8", "ema.posthoc.enabled=true"])
    assert cfg.ema.reference_batch == 8 and cfg.ema.posthoc.sigma_rels == [0.05, 0.10]
    with pytest.raises(ConfigError, match="ema.reference_batch"):
        load_config(None, ["ema.reference_batch=0"])
    with pytest.raises(ConfigError, match="ema.posthoc.sigma_rels"):
        load_config(None, ["ema.posthoc.sigma_rels=[0.05]"])
    with pytest.raises(ConfigError, match="ema.posthoc.sigma_rels"):
        load_config(None, ["ema.posthoc.sigma_rels=[0.05,0.3]"])
    with pytest.raises(ConfigError, match="ema.posthoc.every_steps"):
        load_config(None, ["ema.posthoc.every_steps=0"])
