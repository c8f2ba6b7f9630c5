"""Post-hoc EMA sweep of 8 sigma_rels vs an 8-trial Tune search over training (same data, budget).

    .venv/bin/python bench/posthoc.py              # 48 images x 64 px, 4 epochs (bench FIT)
    .venv/bin/python bench/posthoc.py --quick      # 16 images, 2 epochs

Tune:      raydetr.fit.search.search over ema.decay (grid of 8 decays, fifo, one trial at a
           time: on 2 shared cores concurrent trials only compete): 8 full trainings.
Post-hoc:  one training with ema.posthoc.enabled=true (snapshots of sigma_rel 0.05 and 0.10,
           default: ema.posthoc.snapshots per profile over the run), then
           raydetr.fit.posthoc.sweep over 8 sigma_rels log-spaced in [0.03, 0.25] (reconstruct
           on the driver, evaluate as Ray tasks).
Printed: wall times, `post-hoc sweep / Tune sweep wall time: R` (the sweep alone, the target
<= 0.15), the same ratio with the post-hoc run's own training included, and the snapshot
storage in bytes per epoch (float32, and bf16 = half), and per run next to what the former
default (4 per epoch + each epoch's end) writes for the same run. MLflow off. Ray is started
here with address="local" so no other Ray cluster on the machine is used.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DECAYS = [0.9, 0.95, 0.97, 0.98, 0.99, 0.993, 0.996, 0.999]


def _init_ray() -> None:
    import os

    import ray

    common.shutdown_ray()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2) + 1,
             include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--sigma-rel-range", nargs=2, type=float, default=[0.03, 0.25])
    args = p.parse_args(argv)

    from raydetr.config import load_config
    from raydetr.ema.posthoc import list_snapshots, snapshot_bytes, snapshot_steps
    from raydetr.fit.driver import fit
    from raydetr.fit.posthoc import sigma_rel_grid, sweep
    from raydetr.fit.search import search

    work = common.workdir_of(args) / "posthoc"
    sizes = common.fit_sizes(args)
    prepared = common.synthetic_prepared(work, train_images=sizes["train_images"],
                                         val_images=sizes["val_images"],
                                         image_size=sizes["resolution"])
    base = common.fit_overrides(prepared, sizes, args.threads)

    # 1) Tune over training: 8 trainings.
    tune_cfg = load_config(None, [*base, f"run.output_dir={work}", "run.name=tune",
                                  "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
                                  f"tune.search_space={{ema.decay: {{grid: {DECAYS}}}}}"])
    _init_ray()
    t0 = time.perf_counter()
    tune_res = search(tune_cfg)
    tune_wall = time.perf_counter() - t0
    common.shutdown_ray()

    # 2) One training that records snapshots, then the post-hoc sweep.
    ph_cfg = load_config(None, [*base, f"run.output_dir={work}", "run.name=posthoc",
                                "ema.posthoc.enabled=true"])
    _init_ray()
    t0 = time.perf_counter()
    fit_res = fit(ph_cfg)
    train_wall = time.perf_counter() - t0
    sigma_rels = sigma_rel_grid(*args.sigma_rel_range, 8)
    t0 = time.perf_counter()
    sw = sweep(fit_res.run_dir, sigma_rels, use_mlflow=False)
    sweep_wall = time.perf_counter() - t0
    common.shutdown_ray()

    snap_dir = fit_res.train_dir / "posthoc"
    snaps = list_snapshots(snap_dir)
    n_bytes = snapshot_bytes(snap_dir)
    per_epoch = n_bytes / sizes["epochs"]
    # Today's default before issue 24 (every steps_per_epoch // 4 steps and at every epoch's
    # end, float32): the same files, counted at those steps.
    total_steps = max(s.step for s in snaps)
    spe = total_steps // sizes["epochs"]
    today_steps = set(snapshot_steps(total_steps, max(1, spe // 4))) | {
        spe * e for e in range(1, sizes["epochs"] + 1)}
    per_file = n_bytes / len(snaps)
    today_bytes = per_file * len(today_steps) * len({s.sigma_rel for s in snaps})
    ratio = sweep_wall / tune_wall
    ratio_incl = (train_wall + sweep_wall) / tune_wall

    common.print_table(
        f"Post-hoc sweep ({len(sigma_rels)} sigma_rels) vs Tune over ema.decay "
        f"({len(tune_res.rows)} trials): {sizes['train_images']} images x "
        f"{sizes['resolution']} px, {sizes['epochs']} epochs",
        ["approach", "wall s", "trainings"],
        [["Tune search over training (8 decays)", tune_wall, len(tune_res.rows)],
         ["post-hoc: the training with snapshots", train_wall, 1],
         ["post-hoc: sweep (reconstruct + 8 evals)", sweep_wall, 0]])
    common.print_table("Post-hoc profiles", ["sigma_rel", "map", "map50", "fit residual"],
                       [[r["sigma_rel"], r["map"], r["map50"], r["profile_residual"]]
                        for r in sw.rows])
    best_tune = max(max(r["best_map_ema"] or -1.0, r["best_map"]) for r in tune_res.rows)
    print(f"best mAP: Tune (any decay, any epoch) {best_tune:.4f}; post-hoc (last step) "
          f"{sw.best['map']:.4f} at sigma_rel {sw.best['sigma_rel']:g}")
    print(f"snapshots: {len(snaps)} files, {n_bytes} bytes, {per_epoch:.0f} bytes per epoch "
          f"(float32; ema.posthoc.bf16=true halves it)")
    print(f"post-hoc snapshot bytes per run: now {n_bytes} ({len(snaps)} files, "
          f"ema.posthoc.snapshots per profile); today's default (4 per epoch + each epoch's end) "
          f"{today_bytes:.0f} ({len(today_steps) * 2} files) over these {sizes['epochs']} epochs")
    print(f"post-hoc (training + sweep) / Tune sweep wall time: {ratio_incl:.3f}")
    print(f"post-hoc sweep / Tune sweep wall time: {ratio:.3f}")
    summary = [
        common.summary_row("post-hoc sweep / Tune sweep wall time (8 vs 8)", ratio, "<= 0.15",
                           ratio <= 0.15, "x"),
        common.summary_row("post-hoc snapshot bytes per epoch", per_epoch, "info", None, "B"),
        common.summary_row("post-hoc snapshot bytes per run (today's default: "
                           f"{today_bytes:.3g} B)", n_bytes, "info", None, "B"),
    ]
    common.write_json("posthoc", args, {
        "sizes": sizes, "decays": DECAYS, "sigma_rels": sigma_rels,
        "tune_wall_s": tune_wall, "posthoc_train_wall_s": train_wall,
        "posthoc_sweep_wall_s": sweep_wall, "ratio_sweep_over_tune": ratio,
        "ratio_train_plus_sweep_over_tune": ratio_incl,
        "snapshot_files": len(snaps), "snapshot_bytes": n_bytes,
        "snapshot_bytes_per_epoch": per_epoch, "today_default_snapshot_bytes": today_bytes,
        "today_default_snapshot_files": len(today_steps) * 2,
        "posthoc_rows": sw.rows, "tune_rows": [
            {k: v for k, v in r.items() if k not in ("history", "train_dir")}
            for r in tune_res.rows],
        "summary": summary})


if __name__ == "__main__":
    common.run(main)
