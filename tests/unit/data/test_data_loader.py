"""collate / iter_local_batches: shapes, determinism, multi-scale."""

from __future__ import annotations

import pytest
import torch

from raydetr.config import DataConfig
from raydetr.data.collate import rfdetr_scales, scale_choices
from raydetr.data.loader import iter_local_batches
from raydetr.data.parquet import prepare_dataset
from raydetr.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    src = make_synthetic(root / "shapes", train_images=12, val_images=4, image_size=64, seed=1)
    prepare_dataset(src, root / "prepared", shard_size=5, progress=False)
    return root / "prepared"


def _ids(batches):
    return [int(t["image_id"]) for b in batches for t in b["targets"]]


def test_scale_choices():
    assert scale_choices(384, (0.75, 1.25)) == [288, 320, 352, 384, 416, 448, 480]
    assert scale_choices(40, (0.9, 1.1)) == [40]


def test_rfdetr_scales_follow_its_rule():
    assert rfdetr_scales(384, 32) == tuple(range(224, 545, 32))  # nano: 224..544
    assert rfdetr_scales(560, 56) == tuple(range(280, 841, 56))  # base: 280..840
    assert rfdetr_scales(96, 32) == (64, 96, 128, 160, 192, 224, 256)  # none < 2 steps (as RF-DETR)


def test_collate_uses_the_familys_scales(prepared):
    import numpy as np
    import pyarrow.parquet as pq

    from raydetr.data.collate import COLUMNS, collate
    from raydetr.data.parquet import split_files

    table = pq.read_table(split_files(prepared, "train")[0], columns=list(COLUMNS))
    rows = {c: np.array(table.column(c).to_pylist()[:4] + [None], dtype=object)[:4]
            for c in COLUMNS}
    cfg = DataConfig(multi_scale=True)
    sizes = {collate(rows, train=True, resolution=96, data_cfg=cfg, scales=(32, 96, 160),
                     rng=np.random.default_rng(s))["images"].shape[-1] for s in range(12)}
    assert sizes == {32, 96, 160}
    val = collate(rows, train=False, resolution=96, data_cfg=cfg, scales=(32,),
                  rng=np.random.default_rng(0))
    assert val["images"].shape[-2:] == (96, 96)  # validation: square resize to the resolution


def test_local_batches_deterministic_and_shuffled(prepared):
    cfg = DataConfig()
    kw = dict(batch_size=5, train=True, resolution=64, data_cfg=cfg, seed=0)
    a = list(iter_local_batches(prepared, "train", epoch=0, **kw))
    b = list(iter_local_batches(prepared, "train", epoch=0, **kw))
    c = list(iter_local_batches(prepared, "train", epoch=1, **kw))
    assert [len(x["targets"]) for x in a] == [5, 5, 2]
    assert _ids(a) == _ids(b) != _ids(c) and sorted(_ids(a)) == list(range(12))
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"])
        for s, t in zip(x["targets"], y["targets"]):
            assert torch.equal(s["boxes"], t["boxes"]) and torch.equal(s["labels"], t["labels"])
    sizes = {x["images"].shape[-1] for x in a + c}
    assert sizes <= set(scale_choices(64, cfg.scale_range))
    drop = list(iter_local_batches(prepared, "train", epoch=0, drop_last=True, **kw))
    assert len(drop) == 2


def test_eval_batches_in_order(prepared):
    batches = list(iter_local_batches(prepared, "val", batch_size=3, train=False, resolution=64,
                                      data_cfg=DataConfig()))
    assert _ids(batches) == [0, 1, 2, 3]
    t = batches[0]["targets"][0]
    assert batches[0]["images"].shape == (3, 3, 64, 64)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["image_id"].shape == () and t["orig_size"].tolist() == [64, 64]
    assert ((t["boxes"] > 0) & (t["boxes"] <= 1)).all()


def test_rfdetr_step_size_is_shared_by_ranks_and_micro_batches_of_a_step(prepared):
    """RF-DETR seeds its per-step size with the optimizer step (``random.seed(it)``): every
    rank and every micro-batch of one step get the same size; steps differ."""
    from raydetr.data.loader import SplitReader

    reader = SplitReader(prepared, "train", DataConfig(augment="rfdetr"))
    scales = rfdetr_scales(96, 32)
    kw = dict(seed=0, epoch=0, world=2, batch_size=1, resolution=96, scales=scales,
              grad_accum_steps=2)
    sizes = [[b["images"].shape[-1] for b in reader.train_batches(rank=r, **kw)] for r in (0, 1)]
    assert sizes[0] == sizes[1] and len(sizes[0]) == 6
    steps = sizes[0][::2]
    assert sizes[0][1::2] == steps  # both micro-batches of a step
    assert all(s in scales for s in steps)
    every = {b["images"].shape[-1] for e in range(6)
             for b in reader.train_batches(rank=0, **{**kw, "epoch": e})}
    assert len(every) > 2  # but the size does change from step to step
