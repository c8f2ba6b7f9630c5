"""Evaluation of both variants (regular + EMA) each epoch: what it costs.

    .venv/bin/python bench/eval_cost.py
    .venv/bin/python bench/eval_cost.py --quick --repeats 2

1. In the real fit (``driver.fit``, 1 worker): ``eval_seconds`` / ``train_seconds`` per epoch
   from history.json (epochs 2..N), and the same per image (eval s/image over train s/image).
   eval_seconds covers: the val reader + decode, one forward per variant, postprocess,
   COCOeval per variant on rank 0, and the best-weights bookkeeping.
2. In this process, on the same val batches: ``predict_records`` with {regular} vs
   {regular, ema}, with decode inside the timing (``iter_local_batches``) and on batches
   decoded beforehand; the marginal cost of the EMA variant, (t2 - t1), is compared with one
   plain forward pass of the model over the same batches (ratio ~1: only the forward is doubled;
   decoding and loading are shared). Timings are interleaved and the median is taken.
3. Distributed evaluation: eval_seconds of a 2-worker fit vs a 1-worker fit, same val set
   (each rank decodes and runs its share; records are gathered to rank 0 for COCOeval).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def predict_bench(prepared: Path, sizes: dict[str, int], threads: int, repeats: int
                  ) -> dict[str, Any]:
    import torch

    from raydetr.config import load_config
    from raydetr.data.loader import iter_local_batches
    from raydetr.data.parquet import load_info
    from raydetr.ema.ema import ModelEma
    from raydetr.model.build import build
    from raydetr.train.engine import predict_records

    torch.set_num_threads(threads)
    cfg = load_config(None, common.fit_overrides(prepared, sizes, threads))
    torch.manual_seed(0)
    model, _, post = build(cfg.model, cfg.loss, len(load_info(prepared)["classes"]))
    ema = ModelEma(model, decays=cfg.ema.decay)
    ema.update(model)
    ema_model = copy.deepcopy(model)
    ema.load_into(ema_model)
    model.eval()
    ema_model.eval()
    bs = max(cfg.optim.batch_size, 8)  # the worker's val batch size

    def batches():
        return iter_local_batches(prepared, "val", batch_size=bs, train=False,
                                  resolution=sizes["resolution"], data_cfg=cfg.data)

    decoded = list(batches())
    n_images = sum(b["images"].shape[0] for b in decoded)

    @torch.no_grad()
    def forward_only() -> None:
        for b in decoded:
            model(b["images"])

    cases = {
        "decode_only": lambda: sum(1 for _ in batches()),
        "forward_only": forward_only,
        "regular+decode": lambda: predict_records({"regular": model}, post, batches(), "cpu"),
        "regular+ema+decode": lambda: predict_records({"regular": model, "ema": ema_model}, post,
                                                      batches(), "cpu"),
        "regular": lambda: predict_records({"regular": model}, post, decoded, "cpu"),
        "regular+ema": lambda: predict_records({"regular": model, "ema": ema_model}, post,
                                               decoded, "cpu"),
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):  # interleaved: load drift hits every case alike
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: common.median(v) for k, v in times.items()}
    marginal = med["regular+ema"] - med["regular"]
    marginal_dec = med["regular+ema+decode"] - med["regular+decode"]
    return {"images": n_images, "batch_size": bs, "repeats": repeats, "times_s": times,
            "median_s": med, "marginal_ema_s": marginal, "marginal_ema_with_decode_s": marginal_dec,
            "marginal_over_forward": marginal / med["forward_only"],
            "marginal_with_decode_over_forward": marginal_dec / med["forward_only"],
            "two_over_one_with_decode": med["regular+ema+decode"] / med["regular+decode"]}


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5)")
    p.add_argument("--no-distributed", action="store_true", help="skip the 2-worker fit")
    args = p.parse_args(argv)
    work = common.workdir_of(args)
    sizes = common.fit_sizes(args)
    prepared = common.synthetic_prepared(work, train_images=sizes["train_images"],
                                         val_images=sizes["val_images"])
    pb = predict_bench(prepared, sizes, args.threads, args.repeats or (2 if args.quick else 5))

    fit1 = common.fit_cached(work, common.fit_overrides(prepared, sizes, args.threads))
    h = fit1["history"]
    ev, tr = common.steady(h, "eval_seconds"), common.steady(h, "train_seconds")
    eval_over_train = common.median([e / t for e, t in zip(ev, tr)])
    per_image = common.median([(e / sizes["val_images"]) / (t / sizes["train_images"])
                               for e, t in zip(ev, tr)])
    fits = {"1": {"eval_seconds": ev, "train_seconds": tr}}
    dist_ratio = None
    if not args.no_distributed:
        fit2 = common.fit_cached(work, common.fit_overrides(prepared, sizes, args.threads,
                                                            scaling__num_workers=2))
        ev2 = common.steady(fit2["history"], "eval_seconds")
        fits["2"] = {"eval_seconds": ev2,
                     "train_seconds": common.steady(fit2["history"], "train_seconds")}
        dist_ratio = common.median(ev2) / common.median(ev)

    med = pb["median_s"]
    common.print_table(
        f"predict_records on {pb['images']} val images x {sizes['resolution']} px "
        f"(batch {pb['batch_size']}, {args.threads} thread(s), median of {pb['repeats']}, "
        "interleaved)",
        ["case", "seconds", "ms/image"],
        [[k, v, 1e3 * v / pb["images"]] for k, v in med.items()])
    common.print_table(
        "Marginal cost of the EMA variant", ["measure", "value"],
        [["(regular+ema) - regular, decoded batches [s]", pb["marginal_ema_s"]],
         ["  / one forward pass", pb["marginal_over_forward"]],
         ["(regular+ema) - regular, decode included [s]", pb["marginal_ema_with_decode_s"]],
         ["  / one forward pass", pb["marginal_with_decode_over_forward"]],
         ["(regular+ema) / regular, decode included", pb["two_over_one_with_decode"]]])
    rows = [["eval_seconds / train_seconds per epoch (1 worker)", eval_over_train],
            ["  eval s/image / train s/image", per_image],
            ["eval s/epoch, 1 worker", common.median(ev)]]
    if dist_ratio is not None:
        rows += [["eval s/epoch, 2 workers", common.median(fits["2"]["eval_seconds"])],
                 ["eval 2 workers / 1 worker", dist_ratio]]
    common.print_table(
        f"In the fit ({sizes['train_images']} train / {sizes['val_images']} val images, "
        f"epochs 2..{sizes['epochs']}, median)", ["measure", "value"], rows)
    summary = [
        common.summary_row("eval (both variants) / train, per epoch", eval_over_train, "info",
                           None),
        common.summary_row("eval / train, per image", per_image, "info", None),
        common.summary_row("EMA variant marginal cost / one forward", pb["marginal_over_forward"],
                           "~1 (<= 1.2)", pb["marginal_over_forward"] <= 1.2),
    ]
    if dist_ratio is not None:
        summary.append(common.summary_row("eval seconds 2 workers / 1 worker", dist_ratio,
                                          "< 1", dist_ratio < 1))
    common.write_json("eval_cost", args, {"sizes": sizes, "threads": args.threads,
                                          "predict_records": pb, "fits": fits,
                                          "eval_over_train": eval_over_train,
                                          "eval_over_train_per_image": per_image,
                                          "distributed_over_single": dist_ratio,
                                          "summary": summary})


if __name__ == "__main__":
    common.run(main)
