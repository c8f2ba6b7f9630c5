"""The command line itself: a light --help, --version, the dispatch table, commands/ importing
at the top, and `raydetr config`."""

from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import raydetr
from raydetr.commands.cli import COMMANDS, build_parser, main
from raydetr.config import Config

COMMANDS_DIR = Path(raydetr.__file__).parent / "commands"
HEAVY = ("torch", "ray", "mlflow")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["config", "--help"],
                                  ["--version"]])
def test_help_imports_no_torch_ray_or_mlflow(argv):
    code = ("import sys\nfrom raydetr.commands.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (HEAVY,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.splitlines()[-1] == "HEAVY []", proc.stdout[-2000:]


def test_help_opens_with_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.startswith("Train DETR-family object detectors"), out
    assert "``" not in out  # no reST markup for a person to read past


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"raydetr {raydetr.__version__}"


def test_every_command_has_a_module_with_run():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for module in set(COMMANDS.values()):
        assert callable(importlib.import_module(f"raydetr.commands.{module}").run), module


def test_commands_import_raydetr_modules_at_the_top():
    """Inside commands/, a function-level import is for a heavy third-party package only."""
    lazy = []
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                lazy += [f"{path.name}:{node.lineno} {n}" for n in names
                         if n.split(".")[0] == "raydetr" or getattr(node, "level", 0)]
    assert not lazy, lazy


# ---- raydetr config --------------------------------------------------------------------------


def test_config_lists_every_key_with_type_default_and_description(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "ema.decay: list[float] = [0.993]\n    Peak decay of each EMA shadow" in out
    assert "optim.schedule: cosine | step = cosine\n" in out
    assert "model.resolution: int | None = null   (null: rtdetr-r18's 384)" in out
    assert "[ema.posthoc]" in out and "ema.posthoc.enabled: bool = false" in out
    for key in Config().model_dump():  # every section
        assert f"\n[{key}] " in f"\n{out}", key


def test_config_prefix_and_preset(capsys):
    assert main(["config", "--preset", "rfdetr-nano", "optim"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model.preset=rfdetr-nano changes these defaults")
    assert "  optim.lr: 0.001 -> 0.0001\n" in out
    assert "optim.lr: float = 0.0001   (preset rfdetr-nano; otherwise 0.001)" in out
    assert "ema." not in out and "loss.cls_loss" not in out  # only the optim section
    assert main(["config", "--preset", "rfdetr-base", "model.resolution"]) == 0
    out = capsys.readouterr().out
    assert "  model.resolution: 384 -> 560\n" in out  # rtdetr-r18 falls back to 384
    assert "model.resolution: int | None = null   (null: rfdetr-base's 560)" in out


def test_config_unknown_prefix_exits_2_listing_sections(capsys):
    assert main(["config", "optimiser"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: no config key or section 'optimiser'")
    assert "optim" in err and "Traceback" not in err
