"""Train DETR-family object detectors with EMA weights on Ray; register, evaluate and use them.

    raydetr demo                                   built-in dataset, local Ray, local MLflow
    raydetr prepare SRC OUT [--format coco|yolo|voc] [--shard-size N] [--row-group-size N]
    raydetr make-synthetic OUT [--train-images N] [--val-images N] [--image-size PX] [--seed S]
    raydetr train [--config FILE] [--resume] [--pretrain-weights F] [--early-stopping] [key=value ...]
    raydetr tune  [--config FILE] [key=value ...]
    raydetr tune  --posthoc RUN [--sigma-rel-range LO HI] [--num-samples N] [--search-alg random|grid]
    raydetr posthoc RUN --sigma-rel S [S ...] | --sigma-rel-range LO HI N [--step K] [--register]
    raydetr register RUN_DIR [key=value ...]          e.g. mlflow.onnx=true
    raydetr predict --model URI|DIR IMAGES... --out DIR [--threshold T]
    raydetr evaluate --model URI|DIR --data DATASET [--split val] [--mlflow]
    raydetr convert-checkpoint SRC.pth OUT_DIR [--preset P] [--variant ema|regular]
    raydetr export MODEL --format onnx [OUT] [--batch dynamic|N] [--resolution R] [--opset K]
                   [--postprocess] [--half] [--variant ema|regular]
    raydetr config [--preset P] [KEY-PREFIX]       every config key: type, default, description

``key=value`` overrides use dotted config keys, e.g. ``optim.lr=2e-4 ema.decay=[0.99,0.999]
scaling.num_workers=2``; ``raydetr config`` lists them all.

This module holds the parsers only. Each command lives in ``raydetr/commands/<module>.py`` as
``run(args) -> int`` and is imported when it runs (``COMMANDS``): an exception to imports at
the top, so that ``raydetr --help`` answers without importing torch, Ray or MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from raydetr import __version__
from raydetr.errors import UserError

# command -> module under raydetr.commands that runs it
COMMANDS = {
    "demo": "train",
    "train": "train",
    "tune": "tune",
    "prepare": "prepare",
    "make-synthetic": "prepare",
    "posthoc": "posthoc",
    "register": "register",
    "predict": "predict",
    "evaluate": "evaluate",
    "convert-checkpoint": "convert",
    "export": "export",
    "config": "config",
}
OVERRIDES_HELP = "dotted config overrides, e.g. optim.lr=2e-4; `raydetr config` lists every key"


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/*.yaml); every key: `raydetr config`")
    p.add_argument("--verbose", action="store_true", help="also show Ray's, Tune's, MLflow's "
                   "and COCOeval's own output (run.verbose=true)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydetr", description=__doc__.split("\n\n")[0],
        epilog="`raydetr COMMAND --help` for a command's arguments; `raydetr config` for every "
        "key=value a config file or override can set.")
    parser.add_argument("--version", action="version", version=f"raydetr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train on the built-in dataset with local Ray and MLflow")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--verbose", action="store_true", help="also show Ray's, Tune's, MLflow's "
                   "and COCOeval's own output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    p = sub.add_parser("prepare", help="validate a COCO/YOLO/VOC dataset, write Parquet shards")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", choices=["coco", "yolo", "voc"], default=None)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--row-group-size", type=int, default=1,
                   help="images per Parquet row group (the unit a training rank reads)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("make-synthetic", help="write a synthetic shapes dataset (COCO layout)")
    p.add_argument("out")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="train on Ray (TorchTrainer), publish the winner to MLflow")
    _train_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run with this run.name")
    p.add_argument("--pretrain-weights", help="start from these weights (head re-initialised "
                   "when the class count differs)")
    p.add_argument("--early-stopping", action="store_true", help="same as early_stopping.enabled=true")

    p = sub.add_parser("tune", help="hyperparameter search (e.g. over ema.decay) with Ray Tune")
    _train_args(p)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--posthoc", metavar="RUN", help="search the post-hoc EMA width sigma_rel of "
                   "a finished run instead (no training; see `raydetr posthoc`)")
    p.add_argument("--sigma-rel-range", nargs=2, type=float, default=[0.02, 0.25],
                   metavar=("LO", "HI"), help="--posthoc: sigma_rel bounds (log-uniform)")
    p.add_argument("--num-samples", type=int, default=8, help="--posthoc: trials")
    p.add_argument("--search-alg", choices=["random", "grid"], default="random",
                   help="--posthoc: random (Tune's BasicVariantGenerator) or a log-spaced grid")
    p.add_argument("--step", type=int, help="--posthoc: reconstruct at this stored step")

    p = sub.add_parser("posthoc", help="reconstruct + evaluate post-hoc EMA profiles of a run")
    p.add_argument("run", help="<run.output_dir>/<run.name> of a run trained with "
                   "ema.posthoc=true (or a trial's Train storage dir)")
    p.add_argument("--sigma-rel", nargs="+", type=float, help="profile widths to evaluate")
    p.add_argument("--sigma-rel-range", nargs=3, metavar=("LO", "HI", "N"),
                   help="N widths log-spaced from LO to HI")
    p.add_argument("--step", type=int, help="optimizer step to reconstruct at (default: last)")
    p.add_argument("--register", action="store_true",
                   help="publish the best profile when it beats the run's winner")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    p = sub.add_parser("register", help="register a finished run's winner in MLflow")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="mlflow.* keys, e.g. mlflow.tracking_uri=http://host:5000 "
                   "mlflow.model_name=x (default: the run's own)")

    p = sub.add_parser("predict", help="detect objects in images")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a winner dir")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.5)

    p = sub.add_parser("evaluate", help="COCO metrics of a model on a dataset split")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="prepared dataset or raw COCO/YOLO/VOC folder")
    p.add_argument("--split", default="val")
    p.add_argument("--mlflow", action="store_true", help="log the metrics to MLflow")

    p = sub.add_parser("convert-checkpoint",
                       help="RF-DETR .pth / 1.11 .ckpt -> model dir (model.safetensors + meta.json)")
    p.add_argument("src", help="RF-DETR checkpoint file, e.g. checkpoint_best_total.pth or "
                               "(RF-DETR 1.11) last.ckpt")
    p.add_argument("out_dir")
    p.add_argument("--preset", help="an rfdetr-* preset (`raydetr config model.preset` lists "
                   "them); default: inferred from the keys")
    p.add_argument("--variant", choices=["ema", "regular"],
                   help="default: ema when the file has EMA weights (ema_model, or 1.11's EMA "
                        "callback state), else regular")

    p = sub.add_parser("export", help="export a model to ONNX (checked against torch)")
    p.add_argument("model", help="model dir, run dir (its winner) or models:/NAME@ALIAS")
    p.add_argument("out", nargs="?", help="default: model.onnx in the model dir (or here)")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size")
    p.add_argument("--resolution", type=int, help="input side in px (default: the model's)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--postprocess", action="store_true", help="top-k decode inside the graph: "
                   "scores, labels, boxes_xyxy (normalised)")
    p.add_argument("--half", action="store_true", help="float16 weights and compute; refused "
                   "when its top detections differ from float32's")
    p.add_argument("--variant", choices=["ema", "regular"], help="default: the model's winner")

    p = sub.add_parser("config", help="every config key with its type, default and description")
    p.add_argument("prefix", nargs="?", default="", metavar="KEY-PREFIX",
                   help="only keys under this section or key, e.g. ema or optim.lr")
    p.add_argument("--preset",
                   help="the defaults under model.preset=P, and which values it changes")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("raydetr").setLevel(logging.INFO)  # our lines; others' only --verbose
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "export" and args.out is None and len(extra) == 1:
        args.out = extra[0]  # `export MODEL --format onnx OUT`: OUT after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "verbose", False):
        args.overrides = [*args.overrides, "run.verbose=true"]
        logging.getLogger().setLevel(logging.INFO)
    try:
        command = importlib.import_module(f"raydetr.commands.{COMMANDS[args.command]}")
        return command.run(args)
    except (UserError, FileNotFoundError) as exc:  # errors meant for users carry their message
        print(f"{getattr(exc, 'kind', 'error')}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `raydetr config | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
