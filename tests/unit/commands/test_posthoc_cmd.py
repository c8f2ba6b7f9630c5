"""`raydetr posthoc` argument handling and run lookup errors (no Ray, no training)."""

from __future__ import annotations

import pytest

from raydetr.commands.cli import main
from raydetr.fit.posthoc import PosthocError, open_run, sigma_rel_grid


def test_sigma_rel_grid_is_log_spaced_with_both_ends():
    grid = sigma_rel_grid(0.02, 0.2, 3)
    assert grid[0] == 0.02 and grid[-1] == 0.2
    assert grid[1] == pytest.approx((0.02 * 0.2) ** 0.5, rel=1e-5)
    assert sigma_rel_grid(0.05, 0.05, 1) == [0.05]
    with pytest.raises(PosthocError, match="sigma-rel-range"):
        sigma_rel_grid(0.1, 0.3, 4)


def test_open_run_errors_name_the_path(tmp_path):
    with pytest.raises(PosthocError, match="not a raydetr run directory"):
        open_run(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(PosthocError, match=r"ema.posthoc.enabled=true"):
        open_run(tmp_path)
    (tmp_path / "train" / "posthoc").mkdir()
    with pytest.raises(PosthocError, match="holds no snapshots"):
        open_run(tmp_path)


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["posthoc", str(tmp_path)]) == 2
    assert "--sigma-rel" in capsys.readouterr().err
    assert main(["posthoc", str(tmp_path), "--sigma-rel", "0.3"]) == 2
    assert "(0, 0.28)" in capsys.readouterr().err
    assert main(["tune", "--posthoc", str(tmp_path), "optim.lr=1"]) == 2
    assert "takes no config" in capsys.readouterr().err
