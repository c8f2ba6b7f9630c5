"""What each Ray Train worker runs, as a recipe: setup, then per epoch train -> evaluate ->
save_checkpoint -> report -> wait for the scheduler's decision.

    train_loop_per_worker({"cfg": Config, "classes": [...], "train_images": N, ...})

Per epoch: train (DDP; EMA updated after every optimizer step) -> evaluate the regular weights
and every EMA shadow on this worker's share of the val split -> match them to the ground truth
there (COCO's per-image step) -> gather the matches to rank 0 -> accumulate there -> one
:class:`EpochResult` -> rank 0 writes ``epoch_NNNN`` -> every rank calls ``ray.train.report``
-> every rank waits for the scheduler's verdict on that epoch.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydetr.config import Config
from raydetr.config.presets import (
    eval_settings,
    is_segmentation,
    preset_family,
    resolution_multiple,
)
from raydetr.data.collate import rfdetr_scales
from raydetr.data.loader import SplitReader, steps_per_epoch
from raydetr.ema.ema import ModelEma
from raydetr.ema.posthoc import PosthocTracker, snapshot_every
from raydetr.ema.scaling import scale_for_batch
from raydetr.ema.schedules import register_schedule
from raydetr.model.build import build, resolve_model_config
from raydetr.record import EpochResult, deciding_metric, epoch_number, metric_keys, score_of
from raydetr.stopping.decisions import wait_decision
from raydetr.stopping.rule import monitored_value, replay
from raydetr.train.checkpoint import (
    BestWeightsCache,
    best_cache_dir,
    read_state,
    update_bests,
    write_checkpoint,
)
from raydetr.train.engine import train_one_epoch
from raydetr.train.evaluation import MaskMatcher, ShadowEvaluator, evaluate_matches
from raydetr.train.memory import keep_freed_memory
from raydetr.train.optim import build_lr_scheduler, build_optimizer
from raydetr.train.pretrained import load_pretrained
from raydetr.train.state import TrainState
from raydetr.train.teacher import Teacher, teacher_records

log = logging.getLogger("raydetr.train")


@dataclass
class WorkerArgs:
    """``train_loop_config``: the parsed Config object itself (Ray pickles pydantic models)."""

    cfg: Config
    classes: list[str]
    train_images: int
    prepared: str  # the prepared dataset (local path or pyarrow filesystem URI)
    run_key: str  # the Train run's storage path: names the best-weights cache
    pretrain_weights: str | None = None
    fault_inject: str | None = None
    trial_id: str | None = None
    decision_board: str | None = None  # raydetr.stopping.decisions board, when a scheduler stops
    schedule_fn: Any = None  # an import-path EMA schedule, shipped by value by the driver
    teacher: Any = None  # raydetr.train.teacher.TeacherSpec when distill.teacher is set


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Recipe:
    def __init__(self, args: WorkerArgs) -> None:
        import ray.train
        import ray.train.torch


        self.args, self.cfg = args, args.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.cfg.scaling.torch_threads:
            torch.set_num_threads(self.cfg.scaling.torch_threads)
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            keep_freed_memory()  # no per-step page faults for the big activations (~7% of a step)
        self.amp_dtype = (torch.bfloat16 if self.device.type == "cuda" and self.cfg.optim.amp
                          else None)
        self.resolution = resolve_model_config(self.cfg.model)["resolution"]
        # RF-DETR's multi-scale sizes are its own (steps of patch x windows); None: ours
        self.train_scales = (rfdetr_scales(self.resolution, resolution_multiple(self.cfg.model.preset))
                             if preset_family(self.cfg.model.preset) == "rfdetr" else None)
        self.cache = None
        if self.rank == 0:
            # A fixed folder per run: an earlier attempt's leftovers are not this run's bests
            # (the checkpoint's own best files are copied in by setup_state).
            shutil.rmtree(best_cache_dir(args.run_key), ignore_errors=True)
            self.cache = BestWeightsCache(best_cache_dir(args.run_key))

    # ------------------------------------------------------------------ setup
    def setup_data(self) -> None:
        """Readers and the step arithmetic. Each worker reads only its rows of a seeded global
        shuffle (raydetr.data.loader): a restarted run equals an uninterrupted one. With several
        workers the last partial global batch is dropped (different rows every epoch)."""
        import ray


        cfg, world = self.cfg, self.world
        self.global_batch = cfg.optim.batch_size * world
        n = self.args.train_images
        batches = steps_per_epoch(n, cfg.optim.batch_size, world)
        if batches == 0:
            raise ValueError(
                f"{n} training images cannot fill one global batch of {self.global_batch} "
                f"(optim.batch_size {cfg.optim.batch_size} x {world} workers): lower either")
        self.steps_per_epoch = math.ceil(batches / cfg.optim.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        masks = is_segmentation(cfg.model.preset)  # a detection preset never reads masks
        self.train_data = SplitReader(self.args.prepared, cfg.data.train_split, cfg.data,
                                      masks=masks)
        self.val_data = SplitReader(self.args.prepared, cfg.data.val_split, cfg.data, masks=masks)
        log.info("rank %d of %d on node %s", self.rank, world,
                  ray.get_runtime_context().get_node_id())

    def setup_model(self) -> None:

        seed_everything(self.cfg.run.seed)  # identical init on every rank
        self.model, self.criterion, self.postprocessor = build(
            self.cfg.model, self.cfg.loss, len(self.args.classes))
        if self.args.pretrain_weights:
            reinit, source = load_pretrained(self.model, self.args.pretrain_weights)
            if self.rank == 0:
                log.info("pretrain weights: %s; re-initialised: %s", source, reinit or "nothing")
        self.model.to(self.device)
        self.criterion.to(self.device)

    def ema_scaling(self):
        """The decays and tau this run uses: as configured, or scaled to the effective batch
        when ``ema.reference_batch`` is set (raydetr.ema.scaling)."""

        c = self.cfg
        return scale_for_batch(c.ema.decay, c.ema.tau,
                               c.optim.batch_size * c.optim.grad_accum_steps * self.world,
                               c.ema.reference_batch)

    def make_ema(self, model: torch.nn.Module):

        e, scaled = self.cfg.ema, self.ema_scaling()
        return ModelEma(model, tau=scaled.tau, shadows=scaled.shadows(), schedule=e.schedule,
                        schedule_kwargs=e.schedule_kwargs, average_buffers=e.average_buffers,
                        device=e.device, nan_guard=e.nan_guard,
                        total_steps=self.total_steps)

    def setup_state(self) -> None:
        """Optimizer, LR schedule, EMA -> TrainState, restored from Ray's checkpoint if any."""
        import ray.train


        if self.args.schedule_fn is not None:  # import-path schedule: this process may lack it
            register_schedule(self.cfg.ema.schedule)(self.args.schedule_fn)
        optimizer = build_optimizer(self.model, self.cfg.optim, self.cfg.model.preset)
        self.state = TrainState(
            self.model, optimizer, build_lr_scheduler(optimizer, self.cfg.optim,
                                                      self.steps_per_epoch),
            ema=self.make_ema(self.model) if self.cfg.ema.enabled else None,
            ema_factory=self.make_ema, posthoc=self.make_posthoc())
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                self.state.load_state_dict(read_state(Path(ckpt_dir)))
                if self.cache is not None:
                    self.cache.seed_from(Path(ckpt_dir))
            if self.rank == 0:
                log.info("resumed from %s: continuing at epoch %d (EMA updates so far: %s)",
                         checkpoint.path, self.state.next_epoch,
                         self.state.ema.updates if self.state.ema else "-")
        # rtdetr: every parameter is in the graph on every step (the denoising embedding stays in
        # it even for batches without boxes), so DDP needs no unused-parameter search. rfdetr:
        # RF-DETR's layout has parameters no step uses (the ViT's mask_token; base's last block,
        # whose output is discarded), so DDP must look for them.
        self.ddp_model = ray.train.torch.prepare_model(
            self.model, move_to_device=False,
            parallel_strategy_kwargs={
                "find_unused_parameters": preset_family(self.cfg.model.preset) == "rfdetr"})

        self.evaluator = ShadowEvaluator(self.model, self.state.ema)
        self.teacher, self.teacher_map = self.setup_teacher(), None

    def setup_teacher(self):
        """The frozen teacher (once per worker; never in DDP, the EMA or a checkpoint)."""
        if self.args.teacher is None:
            return None
        return Teacher.load(self.args.teacher, self.cfg.distill, len(self.args.classes),
                            self.criterion, self.device, self.amp_dtype, ema=self.state.ema,
                            student=self.model)

    def measure_teacher(self) -> float | None:
        """The teacher's own mAP on this val split (rank 0; None elsewhere and for ``ema``)."""
        records = teacher_records(self.teacher, self.val_batches())
        if records is None:
            return None
        _, max_dets = eval_settings(self.cfg.model.preset)
        res, _ = evaluate_matches({"teacher": records}, self.args.classes, self.rank, self.world,
                                  max_dets=(1, 10, max_dets))
        return None if res is None else float(res["teacher"]["map"])

    def make_posthoc(self):
        """Rank 0's post-hoc EMA tracker (the weights are the same on every rank), writing into
        ``<this run's Train storage>/posthoc`` next to the epoch checkpoints; None when off."""
        if not self.cfg.ema.posthoc.enabled or self.rank != 0:
            return None
        import ray.train


        ph = self.cfg.ema.posthoc
        storage = ray.train.get_context().get_storage()
        if getattr(storage.storage_filesystem, "type_name", "local") != "local":
            raise ValueError("ema.posthoc needs run.output_dir on a local or shared (NFS) file "
                             f"system; this run stores to {storage.storage_filesystem.type_name}")
        every = ph.every_steps or snapshot_every(self.total_steps, ph.snapshots)
        return PosthocTracker(self.model, ph.sigma_rels, every,
                              Path(storage.experiment_fs_path) / "posthoc", bf16=ph.bf16,
                              device=self.cfg.ema.device)

    def log_header(self) -> None:
        c = self.cfg
        eff = c.optim.batch_size * c.optim.grad_accum_steps * self.world
        log.info("effective batch %d = batch_size %d x grad_accum_steps %d x workers %d; "
                 "%d optimizer steps/epoch; device %s%s; %s",
                 eff, c.optim.batch_size, c.optim.grad_accum_steps, self.world,
                 self.steps_per_epoch, self.device, " (bf16)" if self.amp_dtype else "",
                 self.ema_scaling().describe() if self.state.ema else "EMA off")
        ph = self.state.posthoc
        if ph is not None:
            n_bytes = ph.run_nbytes(self.total_steps)
            log.info("post-hoc EMA: sigma_rels %s, a snapshot every %d steps and at step %d: "
                     "%d files, %d bytes (%.2f GB, %s) into %s", ph.sigma_rels, ph.every_steps,
                     self.total_steps, n_bytes // ph.snapshot_nbytes(), n_bytes, n_bytes / 1e9,
                     "bf16" if ph.bf16 else "float32", ph.out_dir)

    # ------------------------------------------------------------------ per epoch
    def train_batches(self, epoch: int):
        """This rank's training batches of ``epoch`` (the one place the loader is chosen)."""
        c = self.cfg
        return self.train_data.train_batches(seed=c.run.seed, epoch=epoch, rank=self.rank,
                                             world=self.world, batch_size=c.optim.batch_size,
                                             resolution=self.resolution, scales=self.train_scales,
                                             grad_accum_steps=c.optim.grad_accum_steps)

    def val_batches(self):
        return self.val_data.eval_batches(rank=self.rank, world=self.world,
                                          batch_size=max(self.cfg.optim.batch_size, 8),
                                          resolution=self.resolution)

    def train_epoch(self, index: int) -> dict[str, float]:
        """Train the epoch of 0-based ``index`` (it seeds the shuffle and the RNGs)."""

        # Reseed per (seed, epoch, rank): ranks consume randomness at different rates, so this,
        # not one saved state, makes restarts exact.
        seed_everything(self.cfg.run.seed * 1_000_003 + index * 1_009 + self.rank)
        s, o = self.state, self.cfg.optim
        on_step = None
        if s.posthoc is not None:  # global step = steps before this epoch + steps in it
            steps_before = s.step

            def on_step(model, steps, finite):
                s.posthoc.after_step(model, steps_before + steps, finite)
        self.model.train()
        stats = train_one_epoch(
            self.ddp_model, self.criterion, self.train_batches(index), s.optimizer,
            s.lr_scheduler, device=self.device, epoch=epoch_number(index),
            grad_accum_steps=o.grad_accum_steps,
            clip_max_norm=o.clip_max_norm, ema=s.ema, amp_dtype=self.amp_dtype,
            log_every=self.cfg.run.log_every_steps, on_step=on_step, distill=self.teacher)
        s.step += stats["steps"]
        if s.posthoc is not None and s.step == self.total_steps:
            s.posthoc.snapshot(s.step)  # the run's last step has one, whatever every_steps is
        return stats

    def evaluate(self, epoch: int, stats: dict[str, float]) -> EpochResult | None:
        """Every variant on the val split; rank 0 returns the record of epoch number ``epoch``."""

        t0 = time.perf_counter()
        self.model.eval()
        num_select, max_dets = eval_settings(self.cfg.model.preset)  # RF-DETR: 300, 500
        segm = is_segmentation(self.cfg.model.preset)  # masks too; mask mAP decides
        masks = MaskMatcher(self.args.classes, (1, 10, max_dets)) if segm else None  # per batch
        records = self.evaluator.predict(self.postprocessor, self.val_batches(), self.device,
                                         self.amp_dtype, top_k=num_select, on_masks=masks)
        predict_seconds = time.perf_counter() - t0
        # each rank matches its own images; rank 0 accumulates (raydetr.eval.distributed)
        res, coco_seconds = evaluate_matches(records, self.args.classes, self.rank, self.world,
                                             max_dets=(1, 10, max_dets), segm=segm, masks=masks)
        if res is None:
            return None
        eval_seconds = time.perf_counter() - t0  # predict + match + gather + accumulate
        keys, metric = metric_keys(segm), deciding_metric(segm)
        regular = {k: float(res["regular"][k]) for k in keys}
        s, ema = self.state, self.state.ema
        per_shadow = ({sh: {k: float(res[sh.label][k]) for k in keys}
                       for sh in ema.shadows} if ema is not None else {})
        best = max(per_shadow, key=lambda sh: per_shadow[sh][metric]) if per_shadow else None
        map_ema = per_shadow[best][metric] if best is not None else None
        update_bests(
            s.bests, self.cache, epoch=epoch, map_regular=regular[metric], map_ema=map_ema,
            shadow=best, regular_weights=self.model.state_dict,
            ema_weights=(partial(ema.shadow_state_dict, best.index)
                         if best is not None else None))
        es = self.cfg.early_stopping
        monitored = monitored_value(regular[metric], map_ema, use_ema=es.use_ema)
        pairs = [(int(h["epoch"]), float(h["monitored"])) for h in s.history]
        rule = replay([*pairs, (epoch, monitored)], es.patience, es.min_delta, es.skip_epochs)
        train = {"train_loss": stats["train_loss"], "lr": stats["lr"],
                 "images_per_s": stats["images_per_s"], "train_seconds": stats["seconds"],
                 "eval_seconds": eval_seconds, "eval_predict_seconds": predict_seconds,
                 "eval_max_dets": max_dets, **coco_seconds}
        if "distill_loss" in stats:
            train["distill_loss"] = stats["distill_loss"]
        if self.teacher_map is not None:
            train["teacher_map"] = self.teacher_map
        return EpochResult(
            epoch=epoch, step=s.step, regular=regular, ema=per_shadow, bests=s.bests,
            score=score_of(regular[metric], map_ema, self.cfg.tune.metric), monitored=monitored,
            train=train, ema_decay_now=(float(ema.current_decays()[0]) if ema else None),
            early_stopping_counter=rule.counter, metric=metric)

    def save_checkpoint(self, result: EpochResult):
        """Rank 0 writes ``epoch_NNNN`` (resume state + both bests); others return None."""
        import ray.train

        if self.rank != 0:
            return None
        out = Path(tempfile.mkdtemp(prefix=f"raydetr-epoch_{result.epoch:04d}-"))
        state = {**self.state.state_dict(), "classes": self.args.classes,
                 "config": self.cfg.to_dict()}
        if self.args.teacher is not None:  # what taught this student (never its weights)
            state["teacher"] = self.args.teacher.record()
        write_checkpoint(out, state=state, bests=self.state.bests, cache=self.cache)
        return ray.train.Checkpoint.from_directory(str(out))

    def wait_for_decision(self, epoch: int) -> None:
        """Start no epoch after a STOP: wait until the scheduler has decided on this one."""
        if self.args.decision_board is None or self.args.trial_id is None:
            return

        if wait_decision(self.args.decision_board, self.args.trial_id, epoch) == "STOP":
            log.info("early stop after epoch %d: waiting for Tune to end the trial", epoch)
            while True:  # Tune kills this trial; training must not go on meanwhile
                time.sleep(1.0)

    def run(self) -> dict[str, Any] | None:
        import ray.train

        self.setup_data()
        self.setup_model()
        self.setup_state()
        if self.teacher is not None:
            self.teacher_map = self.measure_teacher()
            if self.teacher_map is not None:
                log.info("distill: teacher %s mAP %.4f on this val split", self.args.teacher.uri,
                         self.teacher_map)
        if self.rank == 0:
            self.log_header()
        epochs = self.cfg.optim.epochs
        patience = self.cfg.early_stopping.patience if self.cfg.early_stopping.enabled else None
        for index in range(self.state.epoch, epochs):  # state.epoch: epochs finished
            epoch = epoch_number(index)  # every record, name and message below uses this number
            stats = self.train_epoch(index)
            _maybe_inject_fault(self.args.fault_inject, epoch, self.rank)
            result = self.evaluate(epoch, stats)
            metrics: dict[str, Any] = {}
            self.state.epoch = epoch
            if result is not None:
                metrics = result.to_report()
                self.state.history.append(result.to_report(with_record=False))
                log.info(result.format_line(epochs, patience))
            ray.train.report(metrics, checkpoint=self.save_checkpoint(result) if result else None,
                             checkpoint_dir_name=f"epoch_{epoch:04d}",
                             delete_local_checkpoint_after_upload=True)
            if epoch < epochs:
                self.wait_for_decision(epoch)
        if self.rank == 0:
            return {"epochs": len(self.state.history), "bests": self.state.bests.to_dict()}
        return None

    def cleanup(self) -> None:
        if self.cache is not None:
            shutil.rmtree(self.cache.root, ignore_errors=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = Recipe(WorkerArgs(**loop_config))
    try:
        return recipe.run()
    finally:  # a STOP kills the workers before this: the driver removes the cache then
        recipe.cleanup()


def _maybe_inject_fault(spec: str | None, epoch: int, rank: int) -> None:
    """Test hook (``RAYDETR_FAULT_INJECT=epoch:rank:marker_file`` in the driver's environment):
    that rank dies with ``os._exit`` after training epoch number ``epoch`` (from 1), once (the
    marker file remembers), to exercise FailureConfig restarts and ``--resume``."""
    if not spec:
        return
    at_epoch, at_rank, marker = spec.split(":", 2)
    if epoch == int(at_epoch) and rank == int(at_rank) and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} after training epoch {epoch}\n")
        log.warning("fault injection: rank %d exits during epoch %d", rank, epoch)
        os._exit(1)
