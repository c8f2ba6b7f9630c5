"""A 3-decay Tune search over ema.decay vs one run with 3 EMA shadows: same map_ema, 1/3 the cost.

    .venv/bin/python bench/tune_vs_shadows.py                 # 64 images x 64 px, 3 epochs
    .venv/bin/python bench/tune_vs_shadows.py --quick         # 16 images, 2 epochs
    .venv/bin/python bench/tune_vs_shadows.py --resolution 128 --train-images 64

Same seed and data for both:
  Tune:    raydetr.fit.search.search, tune.scheduler=fifo,
           tune.search_space={ema.decay: {grid: [d1, d2, d3]}}  (3 full trainings)
  shadows: raydetr.fit.driver.fit with ema.decay=[d1, d2, d3]  (1 training, 3 shadows)
MLflow off. Because the EMA never feeds back into training, both must give the same numbers.
Compared per decay: best map_ema over the epochs, map_ema / map50_ema of every epoch, the
train loss of every epoch, and the EMA weights in the last checkpoint (bit for bit).
Augmentation is off by default (hflip_prob=0, crop_prob=0, multi_scale=false; --augment turns
it on): the loader seeds every batch's augmentation on its own (raydetr.data.loader), so
augmented runs are reproducible too, but without augmentation the comparison isolates the EMA
from anything the data path does.
Trials run one at a time by default (--concurrent to let Tune choose): on 2 shared cores
concurrent trials only compete for the same CPUs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _ema_shadows(ckpt: Path, cfg, n_classes: int) -> list[dict[str, Any]]:
    """Every EMA shadow's state dict from a checkpoint's state.pt."""
    from raydetr.ema.ema import ModelEma
    from raydetr.model.build import build
    from raydetr.train.checkpoint import read_state

    state = read_state(ckpt)
    model, _, _ = build(cfg.model, cfg.loss, n_classes)
    ema = ModelEma(model, decays=cfg.ema.decay)
    ema.load_state_dict(state["ema"])
    return [ema.shadow_state_dict(i) for i in range(len(ema.decays))]


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--decays", nargs="+", type=float, default=[0.99, 0.993, 0.999])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--train-images", type=int, default=None, help="default 64, quick 16")
    p.add_argument("--epochs", type=int, default=None, help="default 3, quick 2")
    p.add_argument("--concurrent", action="store_true", help="Tune's own max_concurrent_trials")
    p.add_argument("--augment", action="store_true",
                   help="keep flips / crops / multi-scale on")
    args = p.parse_args(argv)
    import torch

    from raydetr.config import load_config
    from raydetr.fit.driver import fit
    from raydetr.fit.search import search
    from raydetr.train.checkpoint import latest_checkpoint

    work = common.workdir_of(args) / "tune_vs_shadows"
    sizes = dict(train_images=args.train_images or (16 if args.quick else 64), val_images=16,
                 epochs=args.epochs or (2 if args.quick else 3), resolution=args.resolution,
                 batch_size=4)
    prepared = common.synthetic_prepared(work, train_images=sizes["train_images"],
                                         val_images=sizes["val_images"],
                                         image_size=max(64, args.resolution))
    aug = {} if args.augment else {"data__hflip_prob": 0.0, "data__crop_prob": 0.0,
                                   "data__multi_scale": False}
    base = common.fit_overrides(prepared, sizes, args.threads, **aug)
    decays = list(args.decays)

    tune_ov = [*base, f"run.output_dir={work}", "run.name=tune", "tune.scheduler=fifo",
               f"tune.search_space={{ema.decay: {{grid: {decays}}}}}"]
    if not args.concurrent:
        tune_ov.append("tune.max_concurrent_trials=1")
    tune_cfg = load_config(None, tune_ov)
    common.shutdown_ray()
    t0 = time.perf_counter()
    res = search(tune_cfg)
    tune_wall = time.perf_counter() - t0
    common.shutdown_ray()

    sh_cfg = load_config(None, [*base, f"run.output_dir={work}", "run.name=shadows",
                                f"ema.decay={decays}"])
    t0 = time.perf_counter()
    fit_res = fit(sh_cfg)
    shadow_wall = time.perf_counter() - t0
    common.shutdown_ray()
    import json

    sh_hist = json.loads((fit_res.run_dir / "history.json").read_text())
    n_classes = fit_res.meta.num_classes
    sh_weights = _ema_shadows(latest_checkpoint(fit_res.run_dir / "train"), sh_cfg, n_classes)

    rows, per_decay = [], {}
    for row in res.rows:
        d = float(row["params"]["ema.decay"])
        i = decays.index(d)
        th = row["history"]
        t_best = max(float(h["map_ema"]) for h in th)
        s_best = max(float(h[f"map_ema@{d}"]) for h in sh_hist)
        t_curve = [(float(h["map_ema"]), float(h["map50_ema"])) for h in th]
        s_curve = [(float(h[f"map_ema@{d}"]), float(h[f"map50_ema@{d}"])) for h in sh_hist]
        t_loss = [float(h["train_loss"]) for h in th]
        s_loss = [float(h["train_loss"]) for h in sh_hist]
        trial_cfg = load_config(None, [*base, f"ema.decay={d}"])
        t_weights = _ema_shadows(latest_checkpoint(row["train_dir"]), trial_cfg, n_classes)[0]
        w_equal = all(torch.equal(t_weights[k], sh_weights[i][k]) for k in t_weights)
        per_decay[str(d)] = {"tune_best_map_ema": t_best, "shadows_best_map_ema": s_best,
                             "tune_curve": t_curve, "shadows_curve": s_curve,
                             "tune_train_loss": t_loss, "shadows_train_loss": s_loss,
                             "best_equal": t_best == s_best, "curves_equal": t_curve == s_curve,
                             "loss_equal": t_loss == s_loss, "ema_weights_equal": w_equal}
        rows.append([d, t_best, s_best, t_best == s_best, t_curve == s_curve, t_loss == s_loss,
                     w_equal])
    rows.sort()
    common.print_table(
        f"Tune grid over ema.decay ({len(res.rows)} trials) vs 1 run with {len(decays)} shadows: "
        f"{sizes['train_images']} images x {sizes['resolution']} px, {sizes['epochs']} epochs, "
        f"seed 0, augmentation {'on' if args.augment else 'off'}",
        ["decay", "best map_ema (Tune)", "best map_ema (shadows)", "equal?",
         "map/map50 per epoch equal?", "train loss equal?", "EMA weights bit-equal?"], rows)
    if all(v["tune_best_map_ema"] == 0 for v in per_decay.values()):
        print("note: every map_ema is 0 at these tiny settings; the loss and weight columns are "
              "the sensitive checks (try --resolution 128 --epochs 6)")
    speed = tune_wall / shadow_wall
    common.print_table("Wall time", ["approach", "seconds", "trainings"],
                       [["Tune search (fifo, trials " + ("concurrent" if args.concurrent
                                                          else "one at a time") + ")",
                         tune_wall, len(res.rows)],
                        ["single run, ema.decay list", shadow_wall, 1],
                        ["Tune / shadows", speed, ""]])
    all_equal = all(v["best_equal"] and v["ema_weights_equal"] for v in per_decay.values())
    summary = [
        common.summary_row("Tune vs shadows: same map_ema + EMA weights per decay",
                           "yes" if all_equal else "NO", "yes", all_equal),
        common.summary_row("Tune wall / shadows wall (3 decays)", speed, "~3 (> 1)", speed > 1,
                           "x"),
    ]
    common.write_json("tune_vs_shadows", args, {"sizes": sizes, "decays": decays,
                                                "augment": args.augment,
                                                "tune_wall_s": tune_wall,
                                                "shadows_wall_s": shadow_wall,
                                                "per_decay": per_decay, "summary": summary})


if __name__ == "__main__":
    try:
        main()
    finally:
        common.shutdown_ray()
