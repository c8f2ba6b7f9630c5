"""Shard sizes + sha256 in dataset.json, checked before training (issue 12 item 5)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from raydetr.commands.cli import main
from raydetr.data.formats import DatasetError
from raydetr.data.parquet import prepare_dataset, verify_shards


@pytest.fixture()
def prepared(make_coco, tmp_path) -> Path:
    out = tmp_path / "prepared"
    prepare_dataset(make_coco("roboflow"), out, shard_size=2, progress=False)
    return out


def _shard(prepared: Path) -> Path:
    return prepared / "train" / "part-00001.parquet"


def test_intact_dataset_passes_with_checksums(prepared):
    verify_shards(prepared, ["train", "val"], checksums=True)


def test_missing_shard_named_with_fix(prepared):
    _shard(prepared).unlink()
    with pytest.raises(DatasetError) as exc:
        verify_shards(prepared, ["train"])
    msg = str(exc.value)
    assert "train/part-00001.parquet is missing" in msg
    assert f"raydetr prepare {json.loads((prepared / 'dataset.json').read_text())['source']} " \
           f"{prepared} --overwrite" in msg


def test_truncated_shard_named(prepared):
    data = _shard(prepared).read_bytes()
    _shard(prepared).write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"part-00001\.parquet is \d+ bytes, dataset.json "
                                           r"says \d+ \(truncated"):
        verify_shards(prepared, ["train"])
    verify_shards(prepared, ["val"])  # only the splits asked for are checked


def test_corrupted_shard_found_by_checksum_only(prepared):
    data = bytearray(_shard(prepared).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    _shard(prepared).write_bytes(bytes(data))
    verify_shards(prepared, ["train"])  # size-only (the default) cannot see it
    with pytest.raises(DatasetError, match=r"part-00001\.parquet is corrupted \(sha256"):
        verify_shards(prepared, ["train"], checksums=True)


def test_uri_checked_through_its_filesystem(prepared):
    _shard(prepared).unlink()
    with pytest.raises(DatasetError, match=r"file://.*part-00001\.parquet is missing"):
        verify_shards(f"file://{prepared}", ["train"])


def test_old_dataset_without_sizes_accepted_with_warning(prepared, caplog):
    info_path = prepared / "dataset.json"
    info = json.loads(info_path.read_text())
    info["format_version"] = 1
    for split in info["splits"].values():
        del split["shards"]
    info_path.write_text(json.dumps(info))
    data = _shard(prepared).read_bytes()
    _shard(prepared).write_bytes(data[:-10])
    with caplog.at_level(logging.WARNING, logger="raydetr.data"):
        verify_shards(prepared, ["train"])  # sizes unknown: accepted, but said so
    assert "prepared by an older raydetr" in caplog.text and "--overwrite" in caplog.text
    _shard(prepared).unlink()  # existence is still checked
    with pytest.raises(DatasetError, match="is missing"):
        verify_shards(prepared, ["train"])


def test_overwrite_repairs_a_damaged_dataset(make_coco, prepared):
    _shard(prepared).unlink()
    src = json.loads((prepared / "dataset.json").read_text())["source"]
    assert main(["prepare", src, str(prepared), "--shard-size", "2", "--overwrite"]) == 0
    verify_shards(prepared, ["train", "val"], checksums=True)


def test_train_stops_before_ray_naming_the_shard(prepared, tmp_path, capsys):
    data = _shard(prepared).read_bytes()
    _shard(prepared).write_bytes(data[:100])
    code = main(["train", f"data.path={prepared}", "data.val_split=val",
                 f"run.output_dir={tmp_path / 'runs'}", "mlflow.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "part-00001.parquet is 100 bytes" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "default").exists() or not any(
        (tmp_path / "runs").rglob("tune"))
