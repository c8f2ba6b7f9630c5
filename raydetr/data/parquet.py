"""Prepared datasets: validated records -> Parquet shards + dataset.json (written atomically).

    raydetr prepare data/thermal-dogs-people prepared/thermal
    info = prepare_dataset("data/thermal-dogs-people", "prepared/thermal")

Layout of OUT:
    dataset.json                      classes, source, per-split counts + shard files (with
                                      each shard's size in bytes and sha256), report
    <split>/part-NNNNN.parquet        one row per image; columns in ``SCHEMA``; row groups of
                                      ``row_group_size`` images (1 by default: see rank_loader)

A prepared dataset is read from a local path or any pyarrow filesystem URI (``s3://``,
``gs://``, ``file://``...; ``open_prepared``). ``prepare`` writes locally; upload OUT as is.

Images are stored as their original encoded bytes (no re-encoding, no quality loss); boxes as a
flat list of xyxy absolute pixels (4N floats), labels as contiguous class indices; ``masks``
(datasets with masks only, else null) as one COCO compressed-RLE ``counts`` string per instance
at the stored image's height x width (``raydetr.data.masks``; dataset.json ``"masks": true``).
Shards written before masks existed have no ``masks`` column and read as box-only. Writing
streams: at most one row group of images is in memory. Everything is written into a temporary
folder beside OUT and renamed into place at the end, so an OUT that exists with a dataset.json
is always complete.

Before training or evaluating, ``verify_shards`` checks every shard of the splits used against
dataset.json: a missing or truncated shard (size differs) fails with the shard's name and the
command that rewrites it. The size check is one metadata call per shard (cheap on any
filesystem); the sha256 check reads every byte, so it runs only when asked
(``data.verify_checksums=true``): worth it after copying a dataset, not before every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from raydetr.data.dataset import read_dataset
from raydetr.data.formats import DatasetError, Record, SplitData

log = logging.getLogger("raydetr.data")

# 2: each split has ``shards`` ({file: {bytes, sha256}}); version-1 datasets lack it.
# 3: a ``masks`` column and dataset.json ``masks``; older datasets are box-only.
FORMAT_VERSION = 3
INFO_FILE = "dataset.json"
SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("boxes", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int64())),
    ("masks", pa.list_(pa.binary())),   # null in box-only datasets
])


def is_uri(path: Path | str) -> bool:
    """True for ``scheme://...`` locations (read through pyarrow.fs), False for local paths."""
    return "://" in str(path)


def open_prepared(path: Path | str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root inside it) of a prepared dataset at a local path or a URI."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    try:
        fs, root = pafs.FileSystem.from_uri(str(path))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise DatasetError(f"{path}: not a usable filesystem URI ({exc}); use a local path or "
                           "a pyarrow URI such as s3://bucket/prefix or file:///abs/path") from None
    return fs, root.rstrip("/")


def has_info(path: Path | str) -> bool:
    """True if ``path`` has a dataset.json (complete or not: ``verify_shards`` says which)."""
    try:
        fs, root = open_prepared(path)
        return fs.get_file_info(f"{root}/{INFO_FILE}").type == pafs.FileType.File
    except (DatasetError, OSError):
        return False


def is_prepared(path: Path | str) -> bool:
    """True if ``path`` holds a complete prepared dataset (dataset.json and all its shards)."""
    try:
        info = load_info(path)
        fs, root = open_prepared(path)
        files = [f"{root}/{f}" for s in info["splits"].values() for f in s["files"]]
        return all(i.type == pafs.FileType.File for i in fs.get_file_info(files))
    except (DatasetError, OSError):
        return False


def load_info(path: Path | str) -> dict[str, Any]:
    """The dataset.json of a prepared dataset; DatasetError saying what to run otherwise."""
    fs, root = open_prepared(path)
    where = f"{path}/{INFO_FILE}" if is_uri(path) else str(Path(root) / INFO_FILE)
    try:
        missing = fs.get_file_info(f"{root}/{INFO_FILE}").type != pafs.FileType.File
    except OSError as exc:
        raise DatasetError(f"{where}: cannot reach it ({exc})") from None
    if missing:
        raise DatasetError(f"{path} is not a prepared dataset (no {INFO_FILE}); "
                           f"run `raydetr prepare SRC {path}` first")
    try:
        with fs.open_input_stream(f"{root}/{INFO_FILE}") as f:
            info = json.loads(f.read().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{where}: unreadable ({exc}); prepare the dataset again") from None
    if not isinstance(info, dict) or "splits" not in info or "classes" not in info:
        raise DatasetError(f"{where}: not a raydetr dataset.json (missing 'splits'/'classes')")
    return info


def split_files(path: Path | str, split: str) -> list[str]:
    """Paths of the Parquet shards of ``split`` inside ``open_prepared(path)``'s filesystem
    (absolute local paths for a local dataset)."""
    info = load_info(path)
    if split not in info["splits"]:
        raise DatasetError(f"{path}: no split '{split}' (has: {sorted(info['splits'])}); check "
                           "data.train_split / data.val_split")
    _, root = open_prepared(path)
    return [f"{root}/{f}" for f in info["splits"][split]["files"]]


def _table(records: list[Record], metadata: dict[bytes, bytes]) -> pa.Table:
    return pa.Table.from_pydict({
        "image_id": [r.image_id for r in records],
        "file_name": [r.file_name for r in records],
        "image": [r.image_path.read_bytes() for r in records],
        "width": [r.width for r in records],
        "height": [r.height for r in records],
        "boxes": [r.boxes_xyxy.reshape(-1) for r in records],
        "labels": [r.labels for r in records],
        "masks": [r.masks for r in records],
    }, schema=SCHEMA.with_metadata(metadata))


WRITE_BATCH_IMAGES = 32  # images read into memory per write call (then written as row groups)
# Encoded images do not compress further: store them as is, compress the rest. Min/max
# statistics of the image (and mask) columns would copy their bytes into the footer: none.
_COMPRESSION = {c: ("none" if c == "image" else "snappy") for c in SCHEMA.names}
_STATISTICS = [c for c in SCHEMA.names if c not in ("image", "masks")]


class _HashingFile:
    """A write-only file that hashes what passes through it, so a shard's sha256 costs no
    second read. ParquetWriter writes strictly sequentially (footer last), never seeks."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close(), called by pyarrow
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.nbytes += view.nbytes
        return self._f.write(view)

    def tell(self) -> int:
        return self.nbytes

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self.closed = True


def _write_split(data: SplitData, root: Path, shard_size: int, row_group_size: int,
                 metadata: dict[bytes, bytes], bar: tqdm
                 ) -> tuple[list[str], int, dict[str, dict[str, Any]]]:
    """Write ``data`` as shards of ``shard_size`` images; returns (relative files, bytes,
    {file: {bytes, sha256}})."""
    (root / data.name).mkdir()
    files, nbytes, shards = [], 0, {}
    schema = SCHEMA.with_metadata(metadata)
    for k, start in enumerate(range(0, len(data.records), shard_size)):
        rel = f"{data.name}/part-{k:05d}.parquet"
        records = data.records[start:start + shard_size]
        step = max(row_group_size, WRITE_BATCH_IMAGES)
        sink = _HashingFile(root / rel)
        try:
            with pq.ParquetWriter(sink, schema, compression=_COMPRESSION,
                                  write_statistics=_STATISTICS) as writer:
                for i in range(0, len(records), step):
                    chunk = records[i:i + step]
                    writer.write_table(_table(chunk, metadata), row_group_size=row_group_size)
                    bar.update(len(chunk))
        finally:
            sink.close()
        size = (root / rel).stat().st_size
        if size != sink.nbytes:  # the hash must describe exactly the bytes on disk
            raise OSError(f"{root / rel}: wrote {sink.nbytes} bytes but the file has {size}")
        files.append(rel)
        shards[rel] = {"bytes": size, "sha256": sink.sha256.hexdigest()}
        nbytes += size
    return files, nbytes, shards


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if has_info(out):  # complete or damaged (a shard missing): --overwrite replaces either
        if not overwrite:
            raise DatasetError(f"{out} already holds a prepared dataset; pass overwrite=True "
                               "(--overwrite) to replace it, or choose another OUT")
    elif not out.is_dir() or any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not a prepared dataset; refusing to replace it. "
                           "Choose another OUT or remove it yourself")


def prepare_dataset(src: Path | str, out: Path | str, shard_size: int = 256,
                    fmt: str | None = None, progress: bool = True, *, overwrite: bool = False,
                    classes: list[str] | None = None, row_group_size: int = 1
                    ) -> dict[str, Any]:
    """Validate ``src`` (COCO/YOLO/VOC, see dataset.read_dataset) and write it to ``out``.

    Returns the dataset.json dict. ``progress``: tqdm bars and a one-line summary per split
    on stdout (nothing else is printed). ``overwrite``: replace an existing prepared OUT.
    ``classes``: VOC class order. ``row_group_size``: images per Parquet row group, the unit a
    training rank reads (rank_loader). On any error nothing is left at OUT.
    """
    if shard_size <= 0:
        raise DatasetError(f"shard_size must be > 0, got {shard_size}")
    if row_group_size <= 0:
        raise DatasetError(f"row_group_size must be > 0, got {row_group_size}")
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if is_prepared(src):
        raise DatasetError(f"{src} is already a prepared dataset; use it directly")
    _check_out(out, overwrite)
    splits = read_dataset(src, fmt, classes=classes, progress=progress)
    first = next(iter(splits.values()))
    metadata = {b"raydetr.classes": json.dumps(first.classes).encode(),
                b"raydetr.source_format": first.source_format.encode()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        info: dict[str, Any] = {"format_version": FORMAT_VERSION, "classes": first.classes,
                                "source_format": first.source_format, "source": str(src),
                                "masks": first.has_masks,
                                "splits": {}, "report": {}}
        total = sum(len(s.records) for s in splits.values())
        with tqdm(total=total, desc="prepare", unit="img", disable=not progress) as bar:
            for name, data in splits.items():
                files, nbytes, shards = _write_split(data, tmp, shard_size, row_group_size,
                                                     metadata, bar)
                rep = data.report
                info["splits"][name] = {"images": rep.images, "boxes": rep.boxes,
                                        **({"masks": rep.masks} if first.has_masks else {}),
                                        "negatives": rep.negatives, "files": files,
                                        "bytes": nbytes, "row_group_size": row_group_size,
                                        "shards": shards}
                info["report"][name] = rep.to_dict()
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(summary(info))
    return info


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (already checked) is moved aside first."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "d")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def has_masks(info: dict[str, Any]) -> bool:
    """True if a dataset.json describes a dataset with instance masks (False for box-only
    datasets and those prepared before masks existed)."""
    return bool(info.get("masks", False))


def summary(info: dict[str, Any]) -> str:
    """Human summary: one line per split (images / boxes / negatives / clipped)."""
    lines = [f"prepared {info['source']} ({info['source_format']}, {len(info['classes'])} "
             f"classes: {', '.join(info['classes'])})"]
    for name, s in info["splits"].items():
        rep = info["report"].get(name, {})
        masks = (f"masks={s.get('masks', 0)} dropped={rep.get('dropped_instances', 0)} "
                 if has_masks(info) else "")
        lines.append(f"  {name:<5} images={s['images']} boxes={s['boxes']} "
                     f"negatives={s['negatives']} clipped={rep.get('clipped_boxes', 0)} {masks}"
                     f"warnings={rep.get('warnings_total', 0)} shards={len(s['files'])}")
    return "\n".join(lines)


def _fix(path: Path | str, info: dict[str, Any]) -> str:
    return f"re-prepare it: raydetr prepare {info.get('source', 'SRC')} {path} --overwrite"


def verify_shards(path: Path | str, splits: list[str], *, checksums: bool = False) -> None:
    """Check the shards of ``splits`` against dataset.json before anything reads them.

    Missing or wrong-size shard -> DatasetError naming it and the fix; ``checksums``: also
    compare each shard's sha256 (reads every byte). A dataset prepared before sizes were
    recorded (format_version 1) is accepted with one warning: its shards are only checked
    for existence, and re-preparing it enables the full check.
    """
    info = load_info(path)
    fs, root = open_prepared(path)
    for split in splits:
        if split not in info["splits"]:
            raise DatasetError(f"{path}: no split '{split}' (has: {sorted(info['splits'])}); "
                               "check data.train_split / data.val_split")
        entry = info["splits"][split]
        shards = entry.get("shards")
        files = list(entry["files"])
        if shards is None:
            log.warning("%s was prepared by an older raydetr (no shard sizes in %s): shards are "
                        "only checked for existence; to check them fully, %s", path, INFO_FILE,
                        _fix(path, info))
        try:
            stats = fs.get_file_info([f"{root}/{f}" for f in files])
        except OSError as exc:
            raise DatasetError(f"{path}: cannot reach its shards ({exc})") from None
        for rel, st in zip(files, stats):
            where = f"{path}/{rel}"
            if st.type != pafs.FileType.File:
                raise DatasetError(f"shard {where} is missing; {_fix(path, info)}")
            want = (shards or {}).get(rel)
            if want is None:
                continue
            if st.size != want["bytes"]:
                raise DatasetError(
                    f"shard {where} is {st.size} bytes, dataset.json says {want['bytes']} "
                    f"(truncated or replaced); {_fix(path, info)}")
            if checksums and _sha256(fs, f"{root}/{rel}") != want["sha256"]:
                raise DatasetError(f"shard {where} is corrupted (sha256 differs from "
                                   f"dataset.json); {_fix(path, info)}")


def _sha256(fs: pafs.FileSystem, path: str, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
