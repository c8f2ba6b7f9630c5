"""``train_loop_per_worker``: what each Ray Train worker runs.

Per epoch: train (DDP; EMA updated after every optimizer step) -> evaluate the regular weights
and every EMA shadow on this worker's share of the val split (one decode, one forward per
variant) -> gather detections to rank 0 -> COCOeval there -> rank 0 writes ``epoch_NNNN``
-> every rank calls ``ray.train.report``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raydetr.config import Config, build_config, preset_family, resolution_multiple
from raydetr.train.checkpoint import (
    Bests,
    BestWeightsCache,
    read_bests,
    read_state,
    rng_state,
    set_rng_state,
    update_bests,
    write_checkpoint,
)

log = logging.getLogger("raydetr.train")

METRIC_KEYS = ("map", "map50", "map75", "mar")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_pretrained(model: torch.nn.Module, path: str) -> list[str]:
    """Start from weights (a winner / converted dir, model.safetensors, a checkpoint's state.pt,
    or an RF-DETR .pth: see raydetr.model.convert.pretrained_state_dict).

    Tensors whose shape still differs (the class head of a raydetr model trained on other
    classes) keep their fresh initialisation. Returns what was done, for the log.
    """
    from raydetr.model.convert import pretrained_state_dict

    incoming, notes = pretrained_state_dict(path, model)
    own = model.state_dict()
    unknown = sorted(set(incoming) - set(own))
    if len(unknown) > len(own) // 2:
        raise ValueError(
            f"--pretrain-weights {path}: {len(unknown)} of its keys are not in this model "
            f"(e.g. {unknown[:3]}); is it a model of the same preset?"
        )
    reinit = [k for k, v in incoming.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in incoming.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return notes + (["re-initialised: " + ", ".join(reinit)] if reinit else [])


def _gather_records(records: dict[str, list[dict]], rank: int, world: int):
    if world == 1:
        return records
    gathered: list[Any] = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank != 0:
        return None
    merged: dict[str, list[dict]] = {k: [] for k in records}
    for part in gathered:
        for k, v in part.items():
            merged[k].extend(v)
    return merged


def _format_line(m: dict[str, Any], epochs: int, es: dict[str, Any] | None) -> str:
    parts = [
        f"epoch {m['epoch'] + 1}/{epochs}",
        f"loss {m['train_loss']:.4f}",
        f"mAP {m['map']:.4f} (best {m['best_map']:.4f} @{m['best_map_epoch'] + 1})",
    ]
    if "map_ema" in m:
        parts.append(
            f"mAP_ema {m['map_ema']:.4f} (best {m['best_map_ema']:.4f} @{m['best_map_ema_epoch'] + 1})"
        )
    if es is not None:
        parts.append(f"early-stop {es['counter']}/{es['patience']}")
    parts.append(f"{m['images_per_s']:.1f} img/s")
    parts.append(f"lr {m['lr']:.2e}")
    return "  ".join(parts)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    from raydetr.data.loader import make_collate, rfdetr_scales
    from raydetr.ema.ema import ModelEma
    from raydetr.eval.coco import coco_metrics
    from raydetr.model.build import build, resolve_model_config
    from raydetr.train.engine import predict_records, train_one_epoch
    from raydetr.train.optim import build_lr_scheduler, build_optimizer
    from raydetr.tune.early_stopping import EarlyStopping, monitored_value

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg: Config = build_config(loop_config["cfg"], "train_loop_config")
    classes: list[str] = loop_config["classes"]
    train_images: int = loop_config["train_images"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    device = ray.train.torch.get_device()
    amp_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.optim.amp) else None
    resolution = resolve_model_config(cfg.model)["resolution"]
    # RF-DETR's multi-scale sizes are its own (steps of patch x windows); None: ours
    train_scales = (rfdetr_scales(resolution, resolution_multiple(cfg.model.preset))
                    if preset_family(cfg.model.preset) == "rfdetr" else None)

    seed_everything(cfg.run.seed)  # identical init on every rank
    model, criterion, postprocessor = build(cfg.model, cfg.loss, len(classes))
    if loop_config.get("pretrain_weights"):
        notes = load_pretrained(model, loop_config["pretrain_weights"])
        if rank == 0:
            log.info("pretrain weights %s loaded; %s", loop_config["pretrain_weights"],
                     "; ".join(notes) or "every tensor as is")
    model.to(device)
    criterion.to(device)

    decays = cfg.ema.all_decays
    ema = None
    if cfg.ema.enabled:
        ema = ModelEma(
            model, decay=cfg.ema.decay, tau=cfg.ema.tau, decays=cfg.ema.decays,
            schedule=cfg.ema.schedule, schedule_kwargs=cfg.ema.schedule_kwargs,
            average_buffers=cfg.ema.average_buffers, device=cfg.ema.device,
            nan_guard=cfg.ema.nan_guard,
        )
    # Every worker streams the same seeded global batches (batch_size x world) and decodes only
    # its own slice: a reproducible split (a restarted run equals an uninterrupted one). With
    # several workers the last partial global batch is dropped (reshuffled every epoch).
    global_batch = cfg.optim.batch_size * world
    batches_per_epoch = (train_images // global_batch) if world > 1 else math.ceil(
        train_images / global_batch)
    if batches_per_epoch == 0:
        raise ValueError(
            f"{train_images} training images cannot fill one global batch of {global_batch} "
            f"(optim.batch_size {cfg.optim.batch_size} x {world} workers): lower either")
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.optim.grad_accum_steps)
    optimizer = build_optimizer(model, cfg.optim, cfg.model.preset)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, steps_per_epoch)
    # The Tune scheduler makes the stop decision; rank 0 mirrors its counter for the log line
    # and keeps it in the checkpoint, so a resumed run shows the same counter.
    es = EarlyStopping(patience=cfg.early_stopping.patience,
                       min_delta=cfg.early_stopping.min_delta,
                       skip_epochs=cfg.early_stopping.skip_epochs)

    start_epoch, step = 0, 0
    bests = Bests()
    history: list[dict[str, Any]] = []
    cache = BestWeightsCache(Path(tempfile.mkdtemp(prefix="raydetr-best-"))) if rank == 0 else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = read_state(Path(ckpt_dir))
            model.load_state_dict(state["model"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            start_epoch, step = state["epoch"] + 1, state["step"]
            history = list(state["history"])
            bests = read_bests(Path(ckpt_dir))
            vars(es).update(state["early_stopping"])
            set_rng_state(state["rng"])
            if cache is not None:
                cache.seed_from(Path(ckpt_dir))
        if rank == 0:
            log.info("resumed from %s: continuing at epoch %d (EMA updates so far: %s)",
                     checkpoint.path, start_epoch + 1, ema.updates if ema else "-")

    if rank == 0:
        eff = cfg.optim.batch_size * cfg.optim.grad_accum_steps * world
        log.info(
            "effective batch %d = batch_size %d x grad_accum_steps %d x workers %d; "
            "%d optimizer steps/epoch; device %s%s; EMA decays %s",
            eff, cfg.optim.batch_size, cfg.optim.grad_accum_steps, world, steps_per_epoch,
            device, " (bf16)" if amp_dtype else "", decays if ema else "off",
        )

    # rtdetr: every parameter is in the graph on every step (the model keeps the denoising
    # embedding in it even for batches without boxes), so DDP needs no unused-parameter search.
    # rfdetr: RF-DETR's layout has parameters no step uses (the ViT's mask_token; base's last
    # block, whose output is discarded), so DDP must look for them.
    ddp_model = ray.train.torch.prepare_model(
        model, move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": preset_family(cfg.model.preset)
                                  == "rfdetr"})
    eval_models: dict[str, torch.nn.Module] = {"regular": model}
    ema_names = {d: f"ema@{d}" for d in decays}
    if ema is not None:
        for d in decays:
            eval_models[ema_names[d]] = copy.deepcopy(model).eval()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.optim.epochs):
        # Reseed per (seed, epoch, rank): ranks consume randomness at different rates (e.g.
        # denoising noise per box), so this, not one saved state, makes restarts exact.
        seed_everything(cfg.run.seed * 1_000_003 + epoch * 1_009 + rank)
        batches = train_shard.iter_torch_batches(
            batch_size=global_batch,
            drop_last=world > 1,
            collate_fn=make_collate(train=True, resolution=resolution, data_cfg=cfg.data,
                                    seed=cfg.run.seed, epoch=epoch, rank=rank, world=world,
                                    shard="slice", scales=train_scales),
            local_shuffle_buffer_size=max(8 * global_batch, 256),
            local_shuffle_seed=cfg.run.seed * 100003 + epoch,
            prefetch_batches=2,
        )
        model.train()
        stats = train_one_epoch(
            ddp_model, criterion, batches, optimizer, lr_scheduler, device=device, epoch=epoch,
            grad_accum_steps=cfg.optim.grad_accum_steps, clip_max_norm=cfg.optim.clip_max_norm,
            ema=ema, amp_dtype=amp_dtype, log_every=cfg.run.log_every_steps,
        )
        step += stats["steps"]
        _maybe_inject_fault(loop_config.get("fault_inject"), epoch, rank)

        # Evaluate: regular + every EMA shadow, one decode per batch.
        t_eval = time.perf_counter()
        if ema is not None:
            for i, d in enumerate(decays):
                ema.load_into(eval_models[ema_names[d]], i)
        model.eval()
        val_batches = (
            b for b in val_shard.iter_torch_batches(
                batch_size=max(cfg.optim.batch_size, 8) * world,
                collate_fn=make_collate(train=False, resolution=resolution, data_cfg=cfg.data,
                                        seed=0, epoch=0, rank=rank, world=world,
                                        shard="image_id"),
            ) if b is not None
        )
        records = predict_records(eval_models, postprocessor, val_batches, device, amp_dtype)
        records = _gather_records(records, rank, world)

        metrics: dict[str, Any] = {}
        if rank == 0:
            results = {name: coco_metrics(recs, classes) for name, recs in records.items()}
            metrics = _epoch_metrics(results, ema_names, stats, epoch, step, ema, decays)
            metrics["eval_seconds"] = time.perf_counter() - t_eval
            update_bests(
                bests, cache, epoch=epoch, map_regular=metrics["map"],
                map_ema=metrics.get("map_ema"), ema_decay=metrics.get("map_ema_decay"),
                regular_weights=model.state_dict,
                ema_weights=partial(ema.shadow_state_dict, decays.index(metrics["map_ema_decay"]))
                if ema is not None else None,
            )
            metrics.update(
                best_map=bests.regular.map, best_map_epoch=bests.regular.epoch,
                best_map_ema=bests.ema.map if ema else -1.0, best_map_ema_epoch=bests.ema.epoch,
            )
            es.update(monitored_value(metrics, use_ema=cfg.early_stopping.use_ema,
                                      ema_enabled=cfg.ema.enabled), epoch)
            metrics["early_stopping_counter"] = es.counter
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            log.info(_format_line(metrics, cfg.optim.epochs,
                                  vars(es) if cfg.early_stopping.enabled else None))

        ckpt_obj = None
        if rank == 0:
            ckpt_dir = Path(tempfile.mkdtemp(prefix=f"raydetr-epoch_{epoch:04d}-"))
            write_checkpoint(
                ckpt_dir,
                state={
                    "model": model.state_dict(),
                    "ema": ema.state_dict() if ema else None,
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": None,  # bf16 autocast needs no grad scaler
                    "epoch": epoch, "step": step,
                    "early_stopping": dict(vars(es)),
                    "rng": rng_state(),
                    "history": history,
                    "classes": classes,
                    "config": cfg.to_dict(),
                },
                bests=bests, cache=cache,
            )
            ckpt_obj = ray.train.Checkpoint.from_directory(str(ckpt_dir))
        ray.train.report(
            metrics, checkpoint=ckpt_obj, checkpoint_dir_name=f"epoch_{epoch:04d}",
            delete_local_checkpoint_after_upload=True,
        )

    if rank == 0:
        return {"epochs": len(history), "bests": bests.to_dict()}
    return None


def _maybe_inject_fault(spec: str | None, epoch: int, rank: int) -> None:
    """Test hook (``RAYDETR_FAULT_INJECT=epoch:rank:marker_file`` in the driver's environment):
    that rank dies with ``os._exit`` after training that epoch, once (the marker file remembers),
    to exercise FailureConfig restarts and ``--resume``."""
    if not spec:
        return
    at_epoch, at_rank, marker = spec.split(":", 2)
    if epoch == int(at_epoch) and rank == int(at_rank) and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} after training epoch {epoch}\n")
        log.warning("fault injection: rank %d exits during epoch %d", rank, epoch + 1)
        os._exit(1)


def _epoch_metrics(results, ema_names, stats, epoch, step, ema, decays) -> dict[str, Any]:
    reg = results["regular"]
    m: dict[str, Any] = {"epoch": epoch, "step": step}
    m.update({k: float(reg[k]) for k in METRIC_KEYS})
    if ema is not None:
        per_decay = {d: results[ema_names[d]] for d in decays}
        best_d = max(decays, key=lambda d: per_decay[d]["map"])
        m.update({f"{k}_ema": float(per_decay[best_d][k]) for k in METRIC_KEYS})
        if len(decays) > 1:
            for d in decays:
                m[f"map_ema@{d}"] = float(per_decay[d]["map"])
                m[f"map50_ema@{d}"] = float(per_decay[d]["map50"])
        m["map_ema_decay"] = best_d
        m["ema_decay"] = float(ema.current_decays()[0])
    m["train_loss"] = float(stats["train_loss"])
    m["lr"] = float(stats["lr"])
    m["images_per_s"] = float(stats["images_per_s"])
    m["train_seconds"] = float(stats["seconds"])
    return m
