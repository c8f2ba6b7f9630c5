"""Distillation: does a teacher trained longer make an rtdetr-r18 student better at equal steps?

Single process, no Ray (CPU-cheap; the Ray path is tested in tests/integration/test_distill.py):
per dataset, train a teacher (rtdetr-r18, ``--teacher-factor`` x the student's epochs, its own
seed), then for each seed a student without and with ``distill.teacher`` (the same data order,
initialisation, steps and EMA), through raydetr's own train_one_epoch / Teacher / DistillLoss.
Every model is evaluated on the val split with COCOeval at the end: regular weights (mAP) and
the EMA (mAP_ema). The teacher's step-time cost is the median seconds per optimizer step of
the distilled students over that of the plain ones (the sides alternate per seed; the machine is
shared, so read it as a rough factor). The teacher and the plain students do not depend on the
distillation settings: both are kept in ``--cache`` and reused by later runs with the same
dataset / epochs / sizes / seeds (a reused plain row's s/step is from its own run;
``--fresh-plain`` retrains them). Before the students, the teacher's targets on one epoch of
train batches are summarised (boxes per image before / after the NMS, precision and recall at
IoU 0.5 against the ground truth).

    .venv/bin/python bench/distill.py                      # synthetic + thermal, seeds 0 1
    .venv/bin/python bench/distill.py --quick --datasets synthetic
    .venv/bin/python bench/distill.py --teacher-set labels --additive --weight 1 \
        --unmatched-weight 1 --logit-weight 0                # a perfect teacher, Teach-DETR's form
    .venv/bin/python bench/distill.py --feature-weight 0    # the teacher's boxes only

The distillation settings are ``distill``'s defaults unless an option sets them
(``--weight``, ``--score-threshold``, ``--nms-iou``, ``--unmatched-weight``,
``--logit-weight``, ``--feature-weight``: PKD's feature term on the encoder maps).

``--teacher-set ema`` is self-distillation (``distill.teacher=ema``): the student's own first
EMA shadow, of decay ``--ema-teacher-decay`` (0.999), teaches it; the teacher row is then
not used (the teacher is still trained or read from the cache, for the common code path).

``--teacher-set labels`` makes the batch's own ground truth the teacher set (scores 1): a
perfect teacher, which in the shared form (the default: the teacher takes ``distill.weight``
of the decoder's class and box supervision) leaves the student's loss and gradients as they
are, to float rounding, with ``--unmatched-weight 1 --logit-weight 0``; the students it trains
still differ from the plain ones (rounding decorrelates a from-scratch run over 12 epochs), so
its R is this bench's noise floor. The labels have no feature maps: the feature term is off
with them. ``--additive`` runs Teach-DETR's form instead: the teacher's box term, times
``--weight``, on top of the full ground-truth loss.

Prints a table and one line ``distilled student / plain student mAP: R`` per dataset (R is the
mean over seeds of the better of mAP and mAP_ema, distilled over plain); writes
bench/results/distill.json (``--out``) with the command, the configuration and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/convergence.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from raydetr.config import (  # noqa: E402
    DataConfig,
    DistillConfig,  # noqa: E402
    LossConfig,
    ModelConfig,
    OptimConfig,
)
from raydetr.data.loader import iter_local_batches  # noqa: E402
from raydetr.data.parquet import is_prepared, load_info, prepare_dataset  # noqa: E402
from raydetr.ema.ema import ModelEma  # noqa: E402
from raydetr.loss.distill import DistillLoss, teacher_targets  # noqa: E402
from raydetr.model.build import build  # noqa: E402
from raydetr.ops.boxes import box_cxcywh_to_xyxy, box_iou  # noqa: E402
from raydetr.train.engine import evaluate, train_one_epoch  # noqa: E402
from raydetr.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from raydetr.train.teacher import Teacher, TeacherSpec, feature_weight  # noqa: E402

THERMAL = REPO.parent / "shared" / "data" / "thermal-dogs-people"
SCRATCH_LR = 1e-3  # from scratch on CPU (bench/convergence.py)
EMA_DECAY = 0.99


def prepared(dataset: str, cache: Path, quick: bool) -> Path:
    out = cache / f"{dataset}{'-quick' if quick else ''}-prepared"
    if is_prepared(out):
        return out
    if dataset == "synthetic":
        from raydetr.data.synthetic import make_synthetic

        n_train, n_val = (48, 16) if quick else (160, 40)
        src = make_synthetic(cache / f"synthetic{'-quick' if quick else ''}-raw",
                             train_images=n_train, val_images=n_val, image_size=96, seed=0,
                             max_objects=3)
    else:
        src = THERMAL
        if not (src / "data.yaml").is_file():
            sys.exit(f"thermal dataset not found at {src}")
    prepare_dataset(src, out, progress=False)
    return out


class Setup:
    def __init__(self, args, dataset: str) -> None:
        self.data_dir = prepared(dataset, args.cache, args.quick)
        info = load_info(self.data_dir)
        self.classes = info["classes"]
        self.n_train = info["splits"]["train"]["images"]
        self.resolution = args.resolution
        self.model_cfg = ModelConfig(preset="rtdetr-r18", resolution=args.resolution,
                                     num_queries=args.queries)
        self.data_cfg = DataConfig(multi_scale=False)
        self.batch_size = args.batch_size

    def optim(self, epochs: int) -> OptimConfig:
        return OptimConfig(epochs=epochs, batch_size=self.batch_size, lr=SCRATCH_LR,
                           lr_encoder=SCRATCH_LR, warmup_steps=10)

    def train_batches(self, seed: int, epoch: int):
        return iter_local_batches(self.data_dir, "train", batch_size=self.batch_size, train=True,
                                  resolution=self.resolution, data_cfg=self.data_cfg, seed=seed,
                                  epoch=epoch)

    def val_batches(self):
        return iter_local_batches(self.data_dir, "val", batch_size=16, train=False,
                                  resolution=self.resolution, data_cfg=self.data_cfg)


class LabelsTeacher:
    """``--teacher-set labels``: the batch's own ground truth as the teacher set (scores 1,
    one-hot probabilities) through the same DistillLoss: a perfect teacher. Shared (the
    default), it leaves the student's loss as it is, to float rounding (with
    ``--unmatched-weight 1 --logit-weight 0``); added (``--additive``) it counts the decoder's
    loss twice."""

    def __init__(self, loss: DistillLoss, num_classes: int) -> None:
        self.loss, self.num_classes, self.current = loss, num_classes, None

    def batches(self, batches):
        for batch in batches:
            self.current = [{"labels": t["labels"], "boxes": t["boxes"],
                             "scores": torch.ones(len(t["labels"])),
                             "probs": F.one_hot(t["labels"], self.num_classes).float()}
                            for t in batch["targets"]]
            yield batch

    def __call__(self, images, student_outputs):
        return self.loss(student_outputs, self.current)


def train(setup: Setup, epochs: int, seed: int, distill: DistillConfig | None = None,
          teacher_model=None, teacher_set: str = "model", additive: bool = False,
          ema_teacher_decay: float = 0.999) -> dict:
    """Train from scratch; returns the final mAP / mAP_ema, seconds per step and the model.
    ``additive``: Teach-DETR's form, the teacher's term added to the full ground-truth loss
    (decoder share 1, term weight ``distill.weight``) instead of sharing the decoder's.
    ``teacher_set="ema"``: the student's first EMA shadow (decay ``ema_teacher_decay``) is the
    teacher (``distill.teacher=ema``); mAP_ema stays the 0.99 shadow's, as the plain one's."""
    torch.manual_seed(seed)
    model, criterion, post = build(setup.model_cfg, LossConfig(), len(setup.classes))
    optim_cfg = setup.optim(epochs)
    optimizer = build_optimizer(model, optim_cfg)
    steps_per_epoch = -(-setup.n_train // setup.batch_size)
    scheduler = build_lr_scheduler(optimizer, optim_cfg, steps_per_epoch)
    decays = [EMA_DECAY]
    if distill is not None and teacher_set == "ema":
        decays = [ema_teacher_decay, EMA_DECAY]  # shadow 0 teaches
    ema = ModelEma(model, decays=decays, tau=20)
    teacher = None
    n = len(setup.classes)
    if distill is not None and teacher_set == "labels":
        teacher = LabelsTeacher(DistillLoss(criterion, weight=distill.weight,
                                            logit_weight=distill.logit_weight,
                                            unmatched_weight=distill.unmatched_weight), n)
    elif distill is not None and teacher_set == "ema":
        spec = TeacherSpec(uri="ema", model_dir=None, sha256=None, classes=list(setup.classes),
                           class_map=list(range(n)), same_classes=True)
        teacher = Teacher.load(spec, distill, n, criterion, torch.device("cpu"), None, ema=ema,
                               student=model)
    elif distill is not None:
        spec = TeacherSpec(uri="bench:teacher", model_dir=None, sha256=None,
                           classes=list(setup.classes), class_map=list(range(n)),
                           same_classes=True, resolution=setup.resolution)
        teacher = Teacher.from_model(spec, distill, n, criterion, teacher_model[0],
                                     teacher_model[1], torch.device("cpu"), None, student=model)
    if additive:
        criterion.decoder_share = 1.0
    seconds, steps, distill_loss = 0.0, 0, []
    for epoch in range(epochs):
        batches = setup.train_batches(seed, epoch)
        if isinstance(teacher, LabelsTeacher):
            batches = teacher.batches(batches)
        stats = train_one_epoch(model, criterion, batches, optimizer,
                                scheduler, device="cpu", epoch=epoch + 1,
                                clip_max_norm=optim_cfg.clip_max_norm, ema=ema, distill=teacher)
        seconds += stats["seconds"]
        steps += stats["steps"]
        if "distill_loss" in stats:
            distill_loss.append(stats["distill_loss"])
    ema_model = ema.load_into(build(setup.model_cfg, LossConfig(), len(setup.classes))[0],
                              len(decays) - 1)
    metrics = evaluate({"regular": model, "ema": ema_model}, post, setup.val_batches(),
                       setup.classes, "cpu")
    return {"map": round(metrics["regular"]["map"], 4), "map50": round(
        metrics["regular"]["map50"], 4), "map_ema": round(metrics["ema"]["map"], 4),
        "map50_ema": round(metrics["ema"]["map50"], 4), "steps": steps,
        "s_per_step": round(seconds / max(steps, 1), 3),
        "distill_loss_last_epoch": round(distill_loss[-1], 4) if distill_loss else None,
        # the better of the two weights is the one a teacher would be published with
        "model": (ema_model if metrics["ema"]["map"] > metrics["regular"]["map"] else model, post)}


def cached_teacher(args, setup: Setup, dataset: str, epochs: int) -> tuple[dict, tuple]:
    """The teacher (row, (model, postprocessor)); trained once per dataset and settings and kept
    in ``--cache`` (its weights and row), so student variants do not retrain it."""
    key = (f"teacher-{dataset}{'-quick' if args.quick else ''}-e{epochs}-r{setup.resolution}"
           f"-q{args.queries}-b{setup.batch_size}-s100")
    weights, row_file = args.cache / f"{key}.pt", args.cache / f"{key}.json"
    if weights.is_file() and row_file.is_file():
        model, _, post = build(setup.model_cfg, LossConfig(), len(setup.classes))
        model.load_state_dict(torch.load(weights, weights_only=True))
        print(f"[{dataset}] teacher from cache {weights}", flush=True)
        return {**json.loads(row_file.read_text()), "cached": True}, (model, post)
    row = train(setup, epochs, seed=100)
    model = row.pop("model")
    torch.save(model[0].state_dict(), weights)
    row_file.write_text(json.dumps(row))
    return row, model


def teacher_quality(setup: Setup, distill: DistillConfig, teacher_model) -> dict:
    """What the student is taught on one epoch of train batches (seed 0): kept teacher boxes
    (before and after the NMS) and ground-truth boxes per image, and the kept boxes' precision /
    recall at IoU 0.5 (any class; a duplicate of a found box still counts as precise)."""
    n = len(setup.classes)
    model = teacher_model[0].eval()
    cmap = torch.arange(n)
    images = kept = raw = gts = tp_t = tp_g = 0
    for batch in setup.train_batches(0, 0):
        imgs, targets = batch["images"], batch["targets"]
        with torch.no_grad():
            out = model(imgs)
        tt = teacher_targets(out, cmap, n, score_threshold=distill.score_threshold,
                             max_boxes=distill.max_boxes, nms_iou=distill.nms_iou)
        raw += sum(len(t["boxes"]) for t in teacher_targets(
            out, cmap, n, score_threshold=distill.score_threshold, max_boxes=distill.max_boxes))
        for t, g in zip(tt, targets):
            images += 1
            kept += len(t["boxes"])
            gts += len(g["boxes"])
            if len(t["boxes"]) and len(g["boxes"]):
                iou, _ = box_iou(box_cxcywh_to_xyxy(t["boxes"]), box_cxcywh_to_xyxy(g["boxes"]))
                tp_t += int((iou.max(1).values >= 0.5).sum())
                tp_g += int((iou.max(0).values >= 0.5).sum())
    return {"teacher_boxes_per_image_before_nms": round(raw / max(images, 1), 2),
            "teacher_boxes_per_image": round(kept / max(images, 1), 2),
            "gt_boxes_per_image": round(gts / max(images, 1), 2),
            "precision_iou50": round(tp_t / max(kept, 1), 3),
            "recall_iou50": round(tp_g / max(gts, 1), 3)}


def cached_plain(args, setup: Setup, dataset: str, seed: int) -> dict:
    """A plain student's row; it does not depend on the distillation settings, so it is kept
    in ``--cache`` (``--fresh-plain`` retrains it; a cached row's s/step is from its own run)."""
    key = (f"plain-{dataset}{'-quick' if args.quick else ''}-e{args.epochs}-r{setup.resolution}"
           f"-q{args.queries}-b{setup.batch_size}-s{seed}")
    row_file = args.cache / f"{key}.json"
    if row_file.is_file() and not args.fresh_plain:
        return {**json.loads(row_file.read_text()), "cached": True}
    row = train(setup, args.epochs, seed)
    row.pop("model")
    row_file.write_text(json.dumps(row))
    return row


def run_dataset(args, dataset: str) -> dict:
    setup = Setup(args, dataset)
    distill = DistillConfig(teacher="bench:teacher", weight=args.weight,
                            score_threshold=args.score_threshold,
                            unmatched_weight=args.unmatched_weight, nms_iou=args.nms_iou,
                            logit_weight=args.logit_weight, feature_weight=args.feature_weight)
    t0 = time.perf_counter()
    teacher_epochs = args.epochs * args.teacher_factor
    print(f"[{dataset}] teacher: rtdetr-r18 @ {setup.resolution}px, {teacher_epochs} epochs, "
          f"seed 100 ({setup.n_train} train images)", flush=True)
    teacher, teacher_model = cached_teacher(args, setup, dataset, teacher_epochs)
    quality = teacher_quality(setup, distill, teacher_model)
    print(f"[{dataset}] teacher targets at score >= {distill.score_threshold}: {quality}",
          flush=True)
    print(f"[{dataset}] teacher mAP {teacher['map']:.4f} mAP_ema {teacher['map_ema']:.4f} "
          f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    rows = []
    for i, seed in enumerate(args.seeds):
        order = ["plain", "distilled"] if i % 2 == 0 else ["distilled", "plain"]
        for side in order:
            if side == "plain":
                r = cached_plain(args, setup, dataset, seed)
            else:
                r = train(setup, args.epochs, seed, distill, teacher_model,
                          teacher_set=args.teacher_set, additive=args.additive,
                          ema_teacher_decay=args.ema_teacher_decay)
                r.pop("model")
            rows.append({"dataset": dataset, "seed": seed, "student": side, **r})
            print(f"[{dataset}] seed {seed} {side:9s} mAP {r['map']:.4f} mAP_ema "
                  f"{r['map_ema']:.4f} {r['s_per_step']:.2f} s/step"
                  f"{' (cached)' if r.get('cached') else ''}", flush=True)

    def best(side):
        return statistics.mean(max(r["map"], r["map_ema"]) for r in rows if r["student"] == side)

    def step(side):
        return statistics.median(r["s_per_step"] for r in rows if r["student"] == side)

    plain, dist = best("plain"), best("distilled")
    return {"dataset": dataset, "teacher": {**teacher, "epochs": teacher_epochs, "seed": 100},
            "teacher_targets": quality, "distill": distill.model_dump(),
            "feature_weight": (0.0 if args.teacher_set == "labels" else
                               feature_weight(distill, args.teacher_set == "ema")),
            "students": rows, "student_epochs": args.epochs,
            "mean_best_map": {"plain": round(plain, 4), "distilled": round(dist, 4)},
            "ratio": round(dist / plain, 3) if plain > 0 else None,
            "teacher_step_cost": round(step("distilled") / step("plain"), 3),
            "minutes": round((time.perf_counter() - t0) / 60, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["synthetic", "thermal"],
                    choices=["synthetic", "thermal"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default 6; quick 2)")
    ap.add_argument("--teacher-factor", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=96)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--weight", type=float, default=DistillConfig().weight)
    ap.add_argument("--score-threshold", type=float, default=DistillConfig().score_threshold)
    ap.add_argument("--nms-iou", type=float, default=DistillConfig().nms_iou)
    ap.add_argument("--unmatched-weight", type=float, default=DistillConfig().unmatched_weight)
    ap.add_argument("--logit-weight", type=float, default=DistillConfig().logit_weight)
    ap.add_argument("--feature-weight", type=float, default=None,
                    help="PKD's feature term (default: distill's, 64 for a trained teacher, 0 "
                    "for --teacher-set ema; 0: off; the labels teacher has no features)")
    ap.add_argument("--teacher-set", choices=["model", "labels", "ema"], default="model",
                    help="labels: the ground truth as the teacher set (a perfect teacher); "
                    "ema: the student's own EMA shadow (distill.teacher=ema)")
    ap.add_argument("--ema-teacher-decay", type=float, default=0.999,
                    help="--teacher-set ema: the teaching shadow's decay (README: 0.999+)")
    ap.add_argument("--additive", action="store_true",
                    help="Teach-DETR's form: the teacher term added to the full ground-truth "
                    "loss instead of taking --weight of the decoder's share")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh-plain", action="store_true",
                    help="retrain the plain students even when --cache has them")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--cache", type=Path, default=REPO / "bench" / "results" / "cache" / "distill",
                    help="kept between runs (under bench/results/, git-ignored)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "distill.json")
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 6)
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    results = [run_dataset(args, d) for d in args.datasets]

    print("\ndataset    student    seed   mAP     mAP_ema  s/step")
    for res in results:
        t = res["teacher"]
        print(f"{res['dataset']:10s} teacher    {t['seed']:>4}   {t['map']:.4f}  {t['map_ema']:.4f}"
              f"   {t['s_per_step']:.2f}  ({t['epochs']} epochs)")
        for r in res["students"]:
            print(f"{res['dataset']:10s} {r['student']:10s} {r['seed']:>4}   {r['map']:.4f}  "
                  f"{r['map_ema']:.4f}   {r['s_per_step']:.2f}")
    for res in results:
        print(f"[{res['dataset']}] teacher step-time cost: x{res['teacher_step_cost']} s/step "
              f"(median distilled / median plain)")
        print(f"[{res['dataset']}] distilled student / plain student mAP: {res['ratio']}")
    out = {"command": " ".join([".venv/bin/python", "bench/distill.py", *(argv or sys.argv[1:])]),
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "ema_decay": EMA_DECAY, "lr": SCRATCH_LR, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
