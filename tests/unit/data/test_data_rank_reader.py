"""SplitReader: each rank reads only its rows; plans, bytes, determinism, URIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydetr.config import DataConfig
from raydetr.data.formats import DatasetError
from raydetr.data.loader import SplitReader, eval_plan, steps_per_epoch, train_plan
from raydetr.data.parquet import load_info, prepare_dataset
from raydetr.data.synthetic import make_synthetic

STREAM = DataConfig(materialize_max_bytes=0)  # always read row groups from the files


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    return make_synthetic(root / "shapes", train_images=40, val_images=6, image_size=64, seed=3)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("rank-prep") / "prepared"
    prepare_dataset(raw, out, shard_size=16, progress=False)
    return out


def _ids(batches):
    return [int(t["image_id"]) for b in batches for t in b["targets"]]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"])
        for s, t in zip(x["targets"], y["targets"]):
            assert all(torch.equal(s[k], t[k]) for k in s)


def test_train_plan_is_a_global_shuffle_cut_into_equal_rank_slices():
    n, bs, world = 103, 4, 3
    plans = [train_plan(n, seed=5, epoch=2, rank=r, world=world, batch_size=bs)
             for r in range(world)]
    steps = steps_per_epoch(n, bs, world)
    assert steps == 8 and all(len(p) == steps for p in plans)
    assert all(len(b) == bs for p in plans for b in p)
    # step s of every rank together = global batch s of one seeded permutation
    order = np.concatenate([np.concatenate([p[s] for p in plans]) for s in range(steps)])
    assert len(set(order.tolist())) == steps * bs * world
    assert order.tolist() == train_plan(n, seed=5, epoch=2, rank=0, world=1,
                                        batch_size=bs * world)[0].tolist() + order[12:].tolist()
    again = train_plan(n, seed=5, epoch=2, rank=1, world=world, batch_size=bs)
    other = train_plan(n, seed=5, epoch=3, rank=1, world=world, batch_size=bs)
    assert all(np.array_equal(a, b) for a, b in zip(plans[1], again))
    assert not all(np.array_equal(a, b) for a, b in zip(plans[1], other))
    # one rank keeps the remainder as a last short batch
    single = train_plan(n, seed=5, epoch=2, rank=0, world=1, batch_size=bs)
    assert [len(b) for b in single][-2:] == [4, 3] and len(single) == 26


def test_eval_plan_covers_every_row_once():
    rows = [r for rank in range(3) for b in eval_plan(10, rank=rank, world=3, batch_size=2)
            for r in b.tolist()]
    assert sorted(rows) == list(range(10))


def test_streamed_equals_materialised_and_threads_do_not_matter(prepared):
    kw = dict(seed=1, epoch=4, rank=1, world=2, batch_size=4, resolution=64)
    streamed = list(SplitReader(prepared, "train", STREAM).train_batches(**kw))
    whole = SplitReader(prepared, "train", DataConfig())
    assert whole.materialize
    one_thread = SplitReader(prepared, "train",
                             DataConfig(materialize_max_bytes=0, loader_threads=1,
                                        prefetch_batches=1))
    assert len(streamed) == steps_per_epoch(40, 4, 2) == 5
    _same(streamed, list(whole.train_batches(**kw)))
    _same(streamed, list(one_thread.train_batches(**kw)))
    other_rank = list(SplitReader(prepared, "train", STREAM).train_batches(**{**kw, "rank": 0}))
    assert not set(_ids(streamed)) & set(_ids(other_rank))


def test_bytes_read_per_rank_is_its_share(prepared):
    world = 4
    readers = [SplitReader(prepared, "train", STREAM) for _ in range(world)]
    footers = readers[0].bytes_read
    for r, reader in enumerate(readers):
        for _ in reader.train_batches(seed=0, epoch=0, rank=r, world=world, batch_size=2,
                                      resolution=64):
            pass
    data = [reader.bytes_read - footers for reader in readers]
    # 40 rows / (2 x 4) = 5 steps: every row is read by exactly one rank, once, and a rank
    # reads its quarter of the row data (the rest of the files: footers, page headers)
    total = int(readers[0].group_bytes.sum())
    assert sum(data) == total
    for d in data:
        assert d / total == pytest.approx(1 / world, abs=0.03)
    assert total + footers <= load_info(prepared)["splits"]["train"]["bytes"]


def test_large_row_groups_still_read_correctly(raw, prepared, tmp_path):
    big = tmp_path / "big"
    prepare_dataset(raw, big, shard_size=16, row_group_size=16, progress=False)
    kw = dict(seed=0, epoch=1, rank=0, world=2, batch_size=4, resolution=64)
    _same(list(SplitReader(big, "train", STREAM).train_batches(**kw)),
          list(SplitReader(prepared, "train", STREAM).train_batches(**kw)))


def test_file_uri_equals_local_path(prepared):
    kw = dict(rank=0, world=1, batch_size=4, resolution=64)
    via_uri = SplitReader(f"file://{prepared}", "val", STREAM)
    _same(list(via_uri.eval_batches(**kw)),
          list(SplitReader(prepared, "val", STREAM).eval_batches(**kw)))


def test_bad_locations_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        SplitReader(f"file://{tmp_path}", "train", STREAM)
    with pytest.raises(DatasetError, match="filesystem URI"):
        SplitReader("nosuchscheme://bucket/x", "train", STREAM)
