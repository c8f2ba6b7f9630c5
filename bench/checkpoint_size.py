"""Checkpoints: what a full ``epoch_NNNN`` weighs, part by part, vs the stripped winner; write time.

    .venv/bin/python bench/checkpoint_size.py                  # rtdetr-r18 preset
    .venv/bin/python bench/checkpoint_size.py --presets rtdetr-r18 rtdetr-r34 --repeats 3

For each preset this builds the model, its ModelEma (``--decays`` shadows), AdamW after one real
optimizer step (so its moments exist), fills both best-weights files, and times
``raydetr.train.checkpoint.write_checkpoint`` (state.pt via torch.save + hard-linked best files
+ bests.json) into fresh folders. Then ``raydetr.fit.postfit.strip_winner`` makes the
published winner (model.safetensors + meta.json) from it. Each part of state.pt is sized by
serialising it alone (torch.save into memory). RF-DETR reports ~3x from stripping model+EMA+
optimizer; ours also carries the two best files (written once per improvement, hard-linked).
"""

from __future__ import annotations

import io
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _nbytes(obj: Any) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def bench_preset(preset: str, decays: list[float], repeats: int, work: Path) -> dict[str, Any]:
    import torch

    from raydetr.config import Config
    from raydetr.ema.ema import ModelEma
    from raydetr.ema.shadow import Shadow
    from raydetr.fit.postfit import strip_winner
    from raydetr.model.build import build
    from raydetr.train.checkpoint import (
        Bests,
        BestWeightsCache,
        rng_state,
        update_bests,
        write_checkpoint,
    )
    from raydetr.train.optim import build_lr_scheduler, build_optimizer

    cfg = Config()
    cfg.model.preset = preset
    cfg.model.resolution = 64  # the step below only has to create the optimizer state
    cfg.ema.decay = list(decays)
    torch.manual_seed(0)
    classes = ["a", "b", "c"]
    model, criterion, _ = build(cfg.model, cfg.loss, len(classes))
    ema = ModelEma(model, decays=cfg.ema.decay)
    optimizer = build_optimizer(model, cfg.optim, cfg.model.preset)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, 10)
    images = torch.randn(2, 3, 64, 64)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]),
                "image_id": torch.tensor(i), "orig_size": torch.tensor([64, 64])} for i in range(2)]
    criterion(model(images, targets), targets)["loss"].backward()
    optimizer.step()
    scheduler.step()
    ema.update(model)

    cache = BestWeightsCache(work / f"cache-{preset}")
    bests = Bests()
    t0 = time.perf_counter()
    update_bests(bests, cache, epoch=1, map_regular=0.1, map_ema=0.2, shadow=Shadow(0, decays[0], decays[0]),
                 regular_weights=model.state_dict, ema_weights=lambda: ema.shadow_state_dict(0))
    best_write_s = time.perf_counter() - t0
    history = [{"epoch": 1, "map": 0.1, "map_ema": 0.2, "map50": 0.0, "map75": 0.0, "mar": 0.0,
                "map50_ema": 0.0, "map75_ema": 0.0, "mar_ema": 0.0}]
    state = {"model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
             "scaler": None, "epoch": 1, "step": 1, "early_stopping": {"counter": 0},
             "rng": rng_state(), "history": history, "classes": classes,
             "config": cfg.to_dict()}
    parts = {k: _nbytes(state[k]) for k in ("model", "ema", "optimizer")}
    parts["other state (sched, rng, history, config)"] = _nbytes(
        {k: v for k, v in state.items() if k not in ("model", "ema", "optimizer")})

    write_s = []
    ckpt = work / f"ckpt-{preset}"
    for i in range(repeats):
        d = work / f"ckpt-{preset}-{i}"
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        write_checkpoint(d, state=state, bests=bests, cache=cache)
        write_s.append(time.perf_counter() - t0)
        if i == 0:
            d.rename(ckpt)
        else:
            shutil.rmtree(d)
    files = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())}
    stripped = strip_winner(ckpt, work / f"winner-{preset}", dataset="bench")
    winner_files = {p.name: p.stat().st_size for p in sorted((work / f"winner-{preset}").iterdir())}
    n_params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "parameters": n_params, "ema_shadows": len(decays),
            "state_parts_bytes": parts, "checkpoint_files_bytes": files,
            "checkpoint_bytes": stripped.checkpoint_bytes, "winner_files_bytes": winner_files,
            "winner_bytes": stripped.winner_bytes,
            "full_over_stripped": stripped.checkpoint_bytes / stripped.winner_bytes,
            "state_pt_over_stripped": files["state.pt"] / stripped.winner_bytes,
            "write_checkpoint_s": write_s, "best_files_write_s": best_write_s,
            "write_mb_per_s": files["state.pt"] / 1e6 / common.median(write_s)}


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__, fits=False)
    p.add_argument("--presets", nargs="+", default=["rtdetr-r18"])
    p.add_argument("--decays", nargs="+", type=float, default=[0.993])
    p.add_argument("--repeats", type=int, default=None, help="timed writes (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = common.workdir_of(args) / "checkpoint_bench"
    work.mkdir(parents=True, exist_ok=True)
    rows_out = [bench_preset(pr, args.decays, args.repeats or (1 if args.quick else 3), work)
                for pr in args.presets]
    for r in rows_out:
        full = r["checkpoint_bytes"]
        table = [[f"state.pt: {k}", v / 1e6, f"{v / full:.1%}"]
                 for k, v in r["state_parts_bytes"].items()]
        table += [[f"file {k}", v / 1e6, f"{v / full:.1%}"]
                  for k, v in r["checkpoint_files_bytes"].items()]
        table += [["full checkpoint (all files)", full / 1e6, "100%"],
                  ["stripped winner (model.safetensors + meta.json)", r["winner_bytes"] / 1e6,
                   f"{r['winner_bytes'] / full:.1%}"]]
        common.print_table(
            f"Checkpoint of preset {r['preset']} ({r['parameters'] / 1e6:.2f} M parameters, "
            f"{r['ema_shadows']} EMA shadow(s)): full / stripped = {r['full_over_stripped']:.2f}x "
            f"(state.pt alone {r['state_pt_over_stripped']:.2f}x)", ["part", "MB", "share"], table)
        common.print_table(
            "write_checkpoint timing", ["measure", "value"],
            [["write_checkpoint s (median)", common.median(r["write_checkpoint_s"])],
             ["  runs", " ".join(f"{x:.3f}" for x in r["write_checkpoint_s"])],
             ["state.pt MB/s", r["write_mb_per_s"]],
             ["both best files, written once per improvement, s", r["best_files_write_s"]]])
    first = rows_out[0]
    summary = [
        common.summary_row(f"checkpoint full/stripped bytes ({first['preset']})",
                           first["full_over_stripped"], "info (RF-DETR ~3x)", None, "x"),
        common.summary_row(f"write_checkpoint seconds ({first['preset']})",
                           common.median(first["write_checkpoint_s"]), "info", None, "s"),
    ]
    common.write_json("checkpoint_size", args, {"presets": rows_out, "summary": summary})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
