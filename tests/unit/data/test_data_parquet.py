"""prepare_dataset: Parquet round trip, metadata, atomic output, existing OUT handling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydetr.config import DataConfig
from raydetr.data.dataset import read_dataset
from raydetr.data.formats import DatasetError
from raydetr.data.loader import iter_local_batches
from raydetr.data.parquet import is_prepared, load_info, prepare_dataset, split_files
from raydetr.data.transforms import normalise_boxes

NO_AUG = DataConfig(hflip_prob=0, crop_prob=0, multi_scale=False)


def test_round_trip(make_coco, tmp_path):
    src, out = make_coco("roboflow"), tmp_path / "prepared"
    info = prepare_dataset(src, out, shard_size=2, progress=False)
    assert is_prepared(out) and load_info(out) == info
    assert info["classes"] == ["cat", "ant"] and info["source_format"] == "coco"
    files = split_files(out, "train")
    rels = ["train/part-00000.parquet", "train/part-00001.parquet"]
    assert info["splits"]["train"] == {
        "images": 3, "boxes": 3, "negatives": 1, "row_group_size": 1, "files": rels,
        "bytes": sum(Path(f).stat().st_size for f in files),
        # sha256 computed while writing equals a fresh read of the file
        "shards": {r: {"bytes": Path(f).stat().st_size,
                       "sha256": hashlib.sha256(Path(f).read_bytes()).hexdigest()}
                   for r, f in zip(rels, files)}}
    assert [pq.read_metadata(f).num_row_groups for f in files] == [2, 1]
    meta = pq.read_schema(files[0]).metadata
    assert json.loads(meta[b"raydetr.classes"]) == ["cat", "ant"]
    assert meta[b"raydetr.source_format"] == b"coco"
    table = pq.read_table(files[0])
    assert table.column("image")[0].as_py() == (src / "train" / "img 0.png").read_bytes()

    records = {r.image_id: r for r in read_dataset(src)["train"].records}
    seen = set()
    for batch in iter_local_batches(out, "train", batch_size=2, train=False, resolution=64,
                                    data_cfg=NO_AUG):
        assert batch["images"].shape[1:] == (3, 64, 64)
        for t in batch["targets"]:
            r = records[int(t["image_id"])]
            seen.add(r.image_id)
            assert t["labels"].tolist() == r.labels.tolist()
            np.testing.assert_allclose(t["boxes"].numpy(),
                                       normalise_boxes(r.boxes_xyxy, r.width, r.height))
            assert t["orig_size"].tolist() == [r.height, r.width]
    assert seen == set(records)


def test_thermal_prepare(thermal_dir, tmp_path):
    info = prepare_dataset(thermal_dir, tmp_path / "th", progress=False)
    assert {k: v["images"] for k, v in info["splits"].items()} == {"train": 142, "val": 41, "test": 20}
    assert info["classes"] == ["dog", "person"]
    assert sum(pq.read_metadata(f).num_rows for f in split_files(tmp_path / "th", "val")) == 41


def test_failing_prepare_leaves_nothing(make_coco, tmp_path):
    def edit(split, data):
        data["annotations"][0]["category_id"] = 77

    out = tmp_path / "prepared"
    with pytest.raises(DatasetError):
        prepare_dataset(make_coco("roboflow", edit), out, progress=False)
    assert not out.exists() and list(tmp_path.glob(".prepared*")) == []


def test_failure_while_writing_leaves_nothing(make_coco, tmp_path, monkeypatch):
    import raydetr.data.parquet as parquet

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(parquet.pq.ParquetWriter, "write_table", boom)
    out = tmp_path / "prepared"
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(make_coco("roboflow"), out, progress=False)
    assert not out.exists() and list(tmp_path.glob(".prepared*")) == []


def test_existing_out(make_coco, tmp_path, capsys):
    src, out = make_coco("roboflow"), tmp_path / "prepared"
    prepare_dataset(src, out, progress=True)
    printed = capsys.readouterr().out
    assert "train images=3 boxes=3 negatives=1 clipped=0" in printed
    with pytest.raises(DatasetError, match="already holds a prepared dataset; pass overwrite=True"):
        prepare_dataset(src, out, progress=False)
    info = prepare_dataset(src, out, shard_size=1, progress=False, overwrite=True)
    assert len(info["splits"]["train"]["files"]) == 3 and is_prepared(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco-roboflow", "prepared"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(DatasetError, match="exists and is not a prepared dataset"):
        prepare_dataset(src, other, progress=False, overwrite=True)
    assert (other / "x.txt").read_text() == "mine"


def test_not_prepared_messages(tmp_path):
    assert not is_prepared(tmp_path)
    with pytest.raises(DatasetError, match="run `raydetr prepare"):
        load_info(tmp_path)
