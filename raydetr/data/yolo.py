"""YOLO reader (used by ``dataset.read_dataset``): data.yaml + <split>/images + <split>/labels.

Box lines ``class cx cy w h`` (normalised) and segment lines ``class x1 y1 x2 y2 x3 y3 ...``
(YOLO segmentation, normalised polygon). A segment's box is its polygon's extent (clipped to the
image, counted, as boxes are). When any line of any split is a segment, the dataset has masks
(``raydetr.data.masks``): segments are stored as masks, box lines get their box as a mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raydetr.data import masks as mk
from raydetr.data.formats import (
    IMAGE_EXTS,
    SPLIT_DIRS,
    DatasetError,
    Problems,
    SplitData,
    ValidationReport,
    check_box,
    check_image,
    make_record,
    progress_bar,
)


# ---------------------------------------------------------------- YOLO
def _yolo_names(cfg: dict[str, Any], yaml_path: Path) -> list[str]:
    names = cfg.get("names")
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise DatasetError(f"{yaml_path}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{yaml_path}: 'names' must be a non-empty list of class names")
    if cfg.get("nc") is not None and int(cfg["nc"]) != len(names):
        raise DatasetError(f"{yaml_path}: nc={cfg['nc']} but 'names' has {len(names)} entries")
    return [str(n) for n in names]


def _yolo_split_images(cfg: dict[str, Any], split: str, root: Path, yaml_path: Path
                       ) -> tuple[list[Path], Path, list[str]] | None:
    """Image files of one split and the folder their file names are relative to.

    Paths in data.yaml are tried relative to ``path:`` (Ultralytics), to the yaml's folder, and
    with leading ``../`` removed (Roboflow writes ``../train/images``); then the conventional
    ``<root>/<split>/images`` (with a warning). A split absent from the yaml is still read
    from that folder. Returns (image files, folder file names are relative to, warnings)."""
    keys = [k for k in (split, *SPLIT_DIRS[split]) if cfg.get(k)]
    value = cfg.get(keys[0]) if keys else None
    entries = value if isinstance(value, list) else [value] if value else []
    base = root / cfg["path"] if isinstance(cfg.get("path"), str) else None
    files: list[Path] = []
    rel_to, notes = root, []
    for entry in entries:
        e = Path(str(entry))
        stripped = Path(*[p for p in e.parts if p not in ("..", ".")]) if not e.is_absolute() else e
        # Prefer paths inside the dataset folder: Roboflow's '../train/images' means root/train.
        cands = [c for c in (base / e if base else None, root / stripped, root / e) if c is not None]
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            found = next((root / d / "images" for d in SPLIT_DIRS[split]
                          if (root / d / "images").is_dir()), None)
            if found is not None:
                notes.append(f"{yaml_path}: {keys[0]}: '{entry}' not found; used {found}")
        if found is None:
            raise DatasetError(f"{yaml_path}: {keys[0]}: '{entry}' not found; tried "
                               f"{', '.join(str(c) for c in cands)} and {root}/<split>/images")
        if found.is_file():  # a .txt list of image paths
            lines = [ln.strip() for ln in found.read_text().splitlines() if ln.strip()]
            files += [(found.parent / ln).resolve() for ln in lines]
        else:
            files += _image_files(found, notes)
            rel_to = found
    if not entries:
        folder = next((root / d / "images" for d in SPLIT_DIRS[split]
                       if (root / d / "images").is_dir()), None)
        if folder is None:
            return None
        files, rel_to = _image_files(folder, notes), folder
    return files, rel_to, notes


def _image_files(folder: Path, notes: list[str]) -> list[Path]:
    """Image files under ``folder`` (sorted); other files are named in ``notes``, not used."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    other = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTS]
    if other:
        notes.append(f"{folder}: {len(other)} non-image file(s) ignored, e.g. {other[:3]}")
    return [p for p in files if p.suffix.lower() in IMAGE_EXTS]


def _yolo_label_path(image: Path) -> Path:
    """Ultralytics rule: the last ``/images/`` in the path becomes ``/labels/``, suffix .txt."""
    s = str(image)
    a, b = "/images/", "/labels/"
    s = b.join(s.rsplit(a, 1)) if a in s else s
    return Path(s).with_suffix(".txt")


def read_yolo(src: Path, problems: Problems, progress: bool, **_: Any) -> dict[str, SplitData]:
    import yaml

    yaml_path = src if src.is_file() else next(
        (src / n for n in ("data.yaml", "data.yml") if (src / n).is_file()), None)
    if yaml_path is None:
        raise DatasetError(f"{src}: no data.yaml found for a YOLO dataset")
    try:
        cfg = yaml.safe_load(yaml_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{yaml_path}: not valid YAML: {exc}") from None
    classes = _yolo_names(cfg, yaml_path)
    root = yaml_path.parent
    out: dict[str, SplitData] = {}
    for split in ("train", "val", "test"):
        found = _yolo_split_images(cfg, split, root, yaml_path)
        if found is None:
            continue
        images, rel_to, notes = found
        report = ValidationReport(warnings=notes)
        if not images:
            problems.add(f"{yaml_path}: split '{split}' ({rel_to}) has no images")
        records = []
        for image_id, path in enumerate(progress_bar(images, progress, f"check {split}")):
            fname = path.relative_to(rel_to).as_posix() if path.is_relative_to(rel_to) else str(path)
            size = check_image(path, f"{split} image id {image_id} ('{fname}')", problems)
            if size is None:
                continue
            w, h = size
            label_path = _yolo_label_path(path)
            boxes, labels, masks = [], [], []
            if not label_path.is_file():
                report.warnings.append(f"{path}: no label file {label_path}; used as a negative")
                lines: list[str] = []
            else:
                lines = label_path.read_text().splitlines()
            for line_no, line in enumerate(lines, 1):
                parts = line.split()
                if not parts:
                    continue
                where = f"{label_path}:{line_no}"
                try:
                    nums = [float(p) for p in parts]
                except ValueError:
                    problems.add(f"{where}: not numbers: {line.strip()!r}")
                    continue
                if len(nums) == 5:
                    cls, cx, cy, bw, bh = nums
                    if bw <= 0 or bh <= 0:
                        problems.add(f"{where}: box has non-positive size (w={bw:g}, h={bh:g})")
                        continue
                    xyxy = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                elif len(nums) >= 7 and len(nums) % 2 == 1:  # segment polygon -> its bounding box
                    cls, xs, ys = nums[0], nums[1::2], nums[2::2]
                    xyxy = (min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h)
                else:
                    problems.add(f"{where}: expected 'class cx cy w h' (5 values) or a segment "
                                 f"'class x1 y1 x2 y2 x3 y3 ...' (3+ points), got {len(nums)}")
                    continue
                if cls != int(cls) or not 0 <= cls < len(classes):
                    problems.add(f"{where}: class index {parts[0]} out of range 0..{len(classes) - 1}"
                                 f" ({yaml_path.name} names: {classes})")
                    continue
                box = check_box(xyxy, w, h, where, report, problems)
                if box is None:
                    continue
                mask = mk.MissingMask(where) if len(nums) == 5 else \
                    mk.yolo_polygon(nums[1:], w, h, where, report)
                if mask is not None:
                    boxes.append(box)
                    labels.append(int(cls))
                    masks.append(mask)
            records.append(make_record(image_id, fname, path.resolve(), w, h, boxes, labels, report,
                                       masks))
        out[split] = SplitData(split, records, classes, "yolo", report)
    if not out:
        raise DatasetError(f"{yaml_path}: no splits found (train/val/test keys or "
                           f"{root}/<split>/images folders)")
    _finish(out)
    return out


def _finish(splits: dict[str, SplitData]) -> None:
    """Masks for every instance when any line of any split is a segment, else none."""
    has = any(isinstance(m, bytes) for s in splits.values() for r in s.records for m in r.masks)
    for split in splits.values():
        split.has_masks = has
        for r in split.records:
            r.masks = mk.finish_masks(r.masks, r.boxes_xyxy.tolist(), r.width, r.height,
                                      split.report) if has else None
