"""User mistakes exit 2 with one message naming the file / key / URI, never a traceback."""

from __future__ import annotations

import pytest

from raydetr.commands.cli import main


@pytest.mark.parametrize("argv, names", [
    (["train", "data.path={tmp}/nope", "mlflow.enabled=false", "run.output_dir={tmp}"],
     "nope"),
    (["train", "optim.nope=1"], "optim.nope"),
    (["train", "optim.lr=1e-4", "optim.lr_encoder=-1"], "from argument 'optim.lr_encoder=-1'"),
    (["config", "--preset", "rfdetr-nano", "emma"], "no config key or section 'emma'"),
    (["train", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    (["train", "ema.schedule=no_such_schedule"], "ema.schedule"),
    (["train", "model.preset=nano"], "rtdetr-r18"),
    (["register", "{tmp}"], "model.safetensors"),
    (["evaluate", "--model", "{tmp}/no-model", "--data", "{tmp}"], "no-model"),
    (["predict", "--model", "{tmp}/no-model", "{tmp}", "--out", "{tmp}/out"], "holds no images"),
    (["convert-checkpoint", "{tmp}/none.pth", "{tmp}/out"], "none.pth"),
    (["posthoc", "{tmp}", "--sigma-rel", "0.05"], "{tmp}"),
    (["prepare", "{tmp}/no-dataset", "{tmp}/out"], "no-dataset"),
])
def test_user_mistakes_exit_2_naming_the_culprit(argv, names, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert names.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err
