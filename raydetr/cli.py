"""The ``raydetr`` command.

    raydetr demo                                   built-in dataset, local Ray, local MLflow
    raydetr prepare SRC OUT [--format coco|yolo|voc] [--shard-size N] [--row-group-size N]
    raydetr make-synthetic OUT [--train-images N] [--val-images N] [--image-size PX] [--seed S]
    raydetr train [--config FILE] [--resume] [--pretrain-weights F] [--early-stopping] [key=value ...]
    raydetr tune  [--config FILE] [key=value ...]
    raydetr tune  --posthoc RUN [--sigma-rel-range LO HI] [--num-samples N] [--search-alg random|grid]
    raydetr posthoc RUN --sigma-rel S [S ...] | --sigma-rel-range LO HI N [--step K] [--register]
    raydetr register RUN_DIR
    raydetr predict --model URI|DIR IMAGES... --out DIR [--threshold T]
    raydetr evaluate --model URI|DIR --data DATASET [--split val] [--mlflow]
    raydetr convert-checkpoint SRC.pth OUT_DIR [--preset P] [--variant ema|regular]

``key=value`` overrides use dotted config keys (see raydetr/config.py), e.g. ``optim.lr=2e-4
ema.decay=[0.99,0.999] scaling.num_workers=2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from raydetr.config import ConfigError, load_config
from raydetr.presets import RFDETR_PRESETS

# The demo's embedded defaults: small enough for a laptop CPU, large enough to learn.
DEMO_OVERRIDES = [
    "run.name=demo",
    "model.resolution=128",
    "optim.epochs=8",
    "optim.batch_size=8",
    "data.synthetic_train_images=256",
    "data.synthetic_val_images=64",
    "data.multi_scale=false",
    "scaling.num_workers=1",
]


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults: raydetr/config.py")
    p.add_argument("--verbose", action="store_true", help="also show Ray's, Tune's, MLflow's "
                   "and COCOeval's own output (run.verbose=true)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydetr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train on the built-in dataset with local Ray and MLflow")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--verbose", action="store_true", help="also show Ray's, Tune's, MLflow's "
                   "and COCOeval's own output")
    p.add_argument("overrides", nargs="*", metavar="key=value")

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
                   "ema.posthoc.enabled=true (or a trial's Train storage dir)")
    p.add_argument("--sigma-rel", nargs="+", type=float, help="profile widths to evaluate")
    p.add_argument("--sigma-rel-range", nargs=3, metavar=("LO", "HI", "N"),
                   help="N widths log-spaced from LO to HI")
    p.add_argument("--step", type=int, help="optimizer step to reconstruct at (default: last)")
    p.add_argument("--register", action="store_true",
                   help="publish the best profile when it beats the run's winner")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    p = sub.add_parser("register", help="register a finished run's winner in MLflow")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. mlflow.model_name=x")

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
    p.add_argument("--preset", choices=list(RFDETR_PRESETS), help="default: inferred from the keys")
    p.add_argument("--variant", choices=["ema", "regular"],
                   help="default: ema when the file has EMA weights (ema_model, or 1.11's EMA "
                        "callback state), else regular")
    return parser


def _print_fit(result) -> None:
    meta = result.meta
    print(f"\nwinner: {meta['variant']} weights, epoch {meta['epoch']}, "
          f"mAP {meta['metrics']['map'] or 0:.4f} -> {result.winner_dir}")
    if result.registered:
        r = result.registered
        print(f"registered: {r.get('model_uri')} (version {r.get('version')}, alias {r.get('alias')})")
    else:
        print(f"not registered; run `raydetr register {result.run_dir}` once MLflow is reachable")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("raydetr").setLevel(logging.INFO)  # our lines; others' only --verbose
    args = _parser().parse_args(argv)
    if getattr(args, "verbose", False):
        args.overrides = [*args.overrides, "run.verbose=true"]
        logging.getLogger().setLevel(logging.INFO)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # errors meant for users carry their own message
        from raydetr.model.convert import ConvertError
        from raydetr.posthoc_eval import PosthocError
        from raydetr.registry.errors import RegistryError
        from raydetr.train.driver import FitError

        # RegistryError: `raydetr register` on a dir that is not a run, MLflow unreachable.
        known: tuple[type[BaseException], ...] = (FitError, FileNotFoundError, PosthocError,
                                                  ConvertError, RegistryError)
        try:
            from raydetr.data.formats import DatasetError

            known += (DatasetError,)
        except ImportError:
            pass
        if isinstance(exc, known):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "prepare":
        from raydetr.data.parquet import prepare_dataset

        prepare_dataset(Path(args.src), Path(args.out), shard_size=args.shard_size,
                        row_group_size=args.row_group_size,
                        fmt=args.format, overwrite=args.overwrite)
        return 0
    if cmd == "make-synthetic":
        from raydetr.data.synthetic import make_synthetic

        out = make_synthetic(Path(args.out), train_images=args.train_images,
                             val_images=args.val_images, image_size=args.image_size,
                             seed=args.seed)
        print(f"synthetic dataset written to {out}")
        return 0
    if cmd in ("demo", "train"):
        from raydetr.train.driver import fit

        if cmd == "demo":
            cfg = load_config(None, DEMO_OVERRIDES + [f"run.output_dir={args.output_dir}"]
                              + list(args.overrides))
            print("demo: built-in synthetic dataset, local Ray, MLflow at "
                  f"{Path(cfg.run.output_dir).resolve() / 'mlflow.db'}\n"
                  "      overrides: " + " ".join(DEMO_OVERRIDES))
            resume = (Path(cfg.run.output_dir) / cfg.run.name / "tune").exists()
            if resume:
                cfg = load_config(None, DEMO_OVERRIDES + [f"run.output_dir={args.output_dir}",
                                  "run.name=demo-" + _stamp()] + list(args.overrides))
            result = fit(cfg)
        else:
            overrides = list(args.overrides)
            if args.early_stopping:
                overrides.append("early_stopping.enabled=true")
            cfg = load_config(args.config, overrides)
            result = fit(cfg, resume=args.resume, pretrain_weights=args.pretrain_weights)
        _print_fit(result)
        return 0
    if cmd == "tune" and args.posthoc:
        from raydetr.tune.posthoc_search import posthoc_search

        if args.overrides or args.config or args.resume:
            raise ConfigError("tune --posthoc takes no config, overrides or --resume: the run's "
                              "own config is used")
        posthoc_search(Path(args.posthoc), tuple(args.sigma_rel_range), args.num_samples,
                       step=args.step, grid=args.search_alg == "grid")
        return 0
    if cmd == "posthoc":
        from raydetr.posthoc_cmd import command

        return command(args.run, args.sigma_rel, args.sigma_rel_range, args.step,
                       args.register, args.no_mlflow)
    if cmd == "tune":
        from raydetr.tune.search import search

        cfg = load_config(args.config, list(args.overrides))
        search(cfg, resume=args.resume)
        return 0
    if cmd == "register":
        from raydetr.registry.publish import register_run_dir

        mlflow_cfg = load_config(None, list(args.overrides)).mlflow if args.overrides else None
        info = register_run_dir(Path(args.run_dir), mlflow_cfg)
        print(json.dumps(info, indent=2, default=str))
        return 0
    if cmd == "predict":
        from raydetr.predict import predict_command

        return predict_command(args.model, args.images, args.out, args.threshold)
    if cmd == "evaluate":
        from raydetr.evaluate import evaluate_command

        return evaluate_command(args.model, args.data, args.split, args.mlflow)
    if cmd == "convert-checkpoint":
        from raydetr.model.convert import convert_checkpoint

        meta = convert_checkpoint(args.src, args.out_dir, preset=args.preset, variant=args.variant)
        print(f"{meta['model']['preset']} ({meta['variant']} weights, {meta['num_classes']} "
              f"logits, {meta['resolution']} px) -> {args.out_dir}\n"
              f"  raydetr predict --model {args.out_dir} IMAGES... --out DIR")
        return 0
    raise AssertionError(cmd)


def _stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")


if __name__ == "__main__":
    sys.exit(main())
