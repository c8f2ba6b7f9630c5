"""collate / iter_local_batches: shapes, determinism, multi-scale."""

from __future__ import annotations

import pytest
import torch

from raydetr.config import DataConfig
from raydetr.data.collate import scale_choices
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
