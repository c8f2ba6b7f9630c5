"""COCO, YOLO and Pascal VOC readers (used by ``dataset.read_dataset``; see its docstring).

Each reader takes (src, problems, progress, **options) and returns split -> SplitData, adding
every hard problem to ``problems`` (raised together by the caller) and every soft fix to the
split's ValidationReport.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    split_from_name,
)


# ---------------------------------------------------------------- COCO
def _roboflow_superclass(categories: dict[int, dict], used_ids: set[int]) -> int | None:
    """Roboflow COCO exports add a category with id 0 named after the project (e.g.
    "dogs-person") that is the ``supercategory`` of every real class and is never annotated.
    RF-DETR drops it (its class names skip the supercategory-"none" entry); so do we, so the
    class indices are the real classes. A category 0 that has annotations is kept."""
    if 0 not in categories or len(categories) < 2 or 0 in used_ids:
        return None
    name = categories[0].get("name")
    others = [c for i, c in categories.items() if i != 0]
    return 0 if all(c.get("supercategory") == name for c in others) else None


def _coco_files(src: Path) -> dict[str, tuple[Path, list[Path]]]:
    """split -> (json file, candidate image folders), for Roboflow and plain layouts."""
    if src.is_file():
        split = split_from_name(src.stem) or "train"
        root = src.parent.parent if src.parent.name == "annotations" else src.parent
        return {split: (src, _coco_image_dirs(src, split, root))}
    out: dict[str, tuple[Path, list[Path]]] = {}
    for split, dirs in SPLIT_DIRS.items():  # Roboflow: {train,valid,test}/_annotations.coco.json
        for d in dirs:
            if (src / d / "_annotations.coco.json").is_file():
                out[split] = (src / d / "_annotations.coco.json", [src / d])
                break
    if out:
        return out
    jsons = sorted((src / "annotations").glob("*.json")) or sorted(src.glob("*.json"))
    for j in jsons:
        split = split_from_name(j.stem) or ("train" if len(jsons) == 1 else None)
        if split is None:
            raise DatasetError(f"{j}: cannot tell the split from the file name; name COCO files "
                               "after their split, e.g. instances_train.json / val.json")
        if split in out:
            raise DatasetError(f"{src}: two COCO files for split '{split}': {out[split][0]}, {j}")
        out[split] = (j, _coco_image_dirs(j, split, src))
    if not out:
        raise DatasetError(f"{src}: no COCO json found (looked for {{train,valid,test}}/"
                           "_annotations.coco.json, annotations/*.json and *.json)")
    return out


def _coco_image_dirs(json_path: Path, split: str, root: Path) -> list[Path]:
    """Where a plain COCO file's images may be: beside it, images/, <root>/<split>[2017]/,
    <root>/images/<split>/, <root>/images/ (first folder holding the file wins)."""
    names = [n for d in SPLIT_DIRS[split] for n in (d, f"{d}2017")]
    dirs = [json_path.parent, json_path.parent / "images", *(root / n for n in names),
            *(root / "images" / n for n in names), root / "images"]
    return list(dict.fromkeys(dirs))


def _load_coco_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read COCO json: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DatasetError(f"{path}: not a COCO detection file (needs 'images' and "
                           "'categories' lists)")
    return data


def read_coco(src: Path, problems: Problems, progress: bool, **_: Any) -> dict[str, SplitData]:
    files = _coco_files(src)
    loaded = {split: _load_coco_json(j) for split, (j, _dirs) in files.items()}
    categories: dict[int, dict] = {}
    used: set[int] = set()
    for split, data in loaded.items():
        for cat in data["categories"]:
            cid = cat.get("id")
            if cid in categories and categories[cid].get("name") != cat.get("name"):
                problems.add(f"{files[split][0]}: category id {cid} is '{cat.get('name')}' here "
                             f"but '{categories[cid].get('name')}' in another split")
            categories.setdefault(cid, cat)
        used.update(a.get("category_id") for a in data.get("annotations", []))
    skip = _roboflow_superclass(categories, used)
    ids = sorted(i for i in categories if i != skip)
    index = {cid: k for k, cid in enumerate(ids)}
    classes = [str(categories[i].get("name")) for i in ids]
    out: dict[str, SplitData] = {}
    for split, data in loaded.items():
        jpath, image_dirs = files[split]
        report = ValidationReport()
        if skip is not None:
            report.warnings.append(f"{jpath}: skipped Roboflow superclass category id {skip} "
                                   f"'{categories[skip].get('name')}' (no annotations)")
        anns_by_image: dict[Any, list[dict]] = {}
        image_ids = {img.get("id") for img in data["images"]}
        for ann in data.get("annotations", []):
            if ann.get("image_id") not in image_ids:
                problems.add(f"{jpath}: annotation id {ann.get('id')} refers to unknown image id "
                             f"{ann.get('image_id')}")
            anns_by_image.setdefault(ann.get("image_id"), []).append(ann)
        if not data["images"]:
            problems.add(f"{jpath}: split '{split}' has no images")
        seen: dict[Any, str] = {}
        records = []
        for img in progress_bar(data["images"], progress, f"check {split}"):
            iid, fname = img.get("id"), img.get("file_name")
            if not isinstance(iid, int) or not isinstance(fname, str):
                problems.add(f"{jpath}: image entry {img} needs an integer 'id' and a 'file_name'")
                continue
            if iid in seen:
                problems.add(f"{jpath}: duplicate image id {iid} ('{seen[iid]}' and '{fname}')")
                continue
            seen[iid] = fname
            where = f"{jpath} image id {iid} ('{fname}')"
            path = next((d / fname for d in image_dirs if (d / fname).is_file()), None)
            if path is None:
                tried = ", ".join(str(d) for d in image_dirs if d.is_dir()) or str(image_dirs[0])
                problems.add(f"{where}: image file not found in {tried}")
                continue
            size = check_image(path, where, problems)
            if size is None:
                continue
            w, h = size
            if (img.get("width"), img.get("height")) != (w, h):
                report.size_mismatches += 1
                report.warnings.append(f"{where}: declared size {img.get('width')}x"
                                       f"{img.get('height')} but the file is {w}x{h}; using {w}x{h}")
            boxes, labels = [], []
            for ann in anns_by_image.get(iid, []):
                awhere = f"{jpath} annotation id {ann.get('id')} (image id {iid}, '{fname}')"
                if ann.get("category_id") not in index:
                    problems.add(f"{awhere}: unknown category id {ann.get('category_id')} "
                                 f"(known: {ids})")
                    continue
                if ann.get("iscrowd"):
                    report.skipped_crowd += 1
                    report.warnings.append(f"{awhere}: crowd region skipped")
                    continue
                bbox = ann.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4:
                    problems.add(f"{awhere}: 'bbox' must be [x, y, width, height], got {bbox!r}")
                    continue
                x, y, bw, bh = bbox
                box = check_box((x, y, x + bw, y + bh), w, h, awhere, report, problems)
                if box is not None:
                    boxes.append(box)
                    labels.append(index[ann["category_id"]])
            records.append(make_record(iid, fname, path.resolve(), w, h, boxes, labels, report))
        records.sort(key=lambda r: r.image_id)
        out[split] = SplitData(split, records, classes, "coco", report)
    return out


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
            boxes, labels = [], []
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
                    problems.add(f"{where}: expected 'class cx cy w h' (5 values), got {len(nums)}")
                    continue
                if cls != int(cls) or not 0 <= cls < len(classes):
                    problems.add(f"{where}: class index {parts[0]} out of range 0..{len(classes) - 1}"
                                 f" ({yaml_path.name} names: {classes})")
                    continue
                box = check_box(xyxy, w, h, where, report, problems)
                if box is not None:
                    boxes.append(box)
                    labels.append(int(cls))
            records.append(make_record(image_id, fname, path.resolve(), w, h, boxes, labels, report))
        out[split] = SplitData(split, records, classes, "yolo", report)
    if not out:
        raise DatasetError(f"{yaml_path}: no splits found (train/val/test keys or "
                           f"{root}/<split>/images folders)")
    return out


# ---------------------------------------------------------------- Pascal VOC
def read_voc(src: Path, problems: Problems, progress: bool,
              classes: Sequence[str] | None = None, **_: Any) -> dict[str, SplitData]:
    """VOC boxes are 1-based inclusive pixels; like detectron2 we subtract 1 from xmin/ymin."""
    ann_dir, img_dir, sets = src / "Annotations", src / "JPEGImages", src / "ImageSets" / "Main"
    split_ids: dict[str, tuple[Path | None, list[str]]] = {}
    for split, names in (("train", ("train", "trainval")), ("val", ("val",)), ("test", ("test",))):
        f = next((sets / f"{n}.txt" for n in names if (sets / f"{n}.txt").is_file()), None)
        if f is not None:
            split_ids[split] = (f, [ln.split()[0] for ln in f.read_text().splitlines() if ln.strip()])
    if not split_ids:
        split_ids["train"] = (None, sorted(p.stem for p in ann_dir.glob("*.xml")))
    raw: dict[str, list[tuple]] = {}
    for split, (list_file, ids) in split_ids.items():
        where_list = list_file or ann_dir
        if not ids:
            problems.add(f"{where_list}: split '{split}' has no images")
        seen: set[str] = set()
        raw[split] = []
        for vid in progress_bar(ids, progress, f"check {split}"):
            if vid in seen:
                problems.add(f"{where_list}: duplicate image id '{vid}'")
                continue
            seen.add(vid)
            xml_path = ann_dir / f"{vid}.xml"
            try:
                root = ET.parse(xml_path).getroot()
            except (OSError, ET.ParseError) as exc:
                problems.add(f"{xml_path} (image id '{vid}' from {where_list}): cannot read: {exc}")
                continue
            fname = (root.findtext("filename") or f"{vid}.jpg").strip()
            path = img_dir / fname
            if not path.is_file():
                path = next((img_dir / f"{vid}{e}" for e in IMAGE_EXTS
                             if (img_dir / f"{vid}{e}").is_file()), path)
            size = check_image(path, f"{xml_path} (image id '{vid}')", problems)
            if size is None:
                continue
            objs = []
            for k, obj in enumerate(root.iter("object")):
                bb = obj.find("bndbox")
                try:
                    xyxy = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
                except (AttributeError, TypeError, ValueError):
                    problems.add(f"{xml_path} object {k}: missing or non-numeric <bndbox>")
                    continue
                objs.append(((obj.findtext("name") or "").strip(), xyxy, k))
            declared = (root.findtext("size/width"), root.findtext("size/height"))
            raw[split].append((vid, path, size, declared, objs, xml_path))
    names = list(classes) if classes else sorted({o[0] for r in raw.values() for x in r for o in x[4]})
    index = {n: i for i, n in enumerate(names)}
    listed = {vid for _f, ids in split_ids.values() for vid in ids}
    unlisted = sorted(p.name for p in ann_dir.glob("*.xml") if p.stem not in listed)
    out: dict[str, SplitData] = {}
    for split, items in raw.items():
        report, records = ValidationReport(), []
        if unlisted and split == next(iter(raw)):
            report.warnings.append(f"{ann_dir}: {len(unlisted)} annotation file(s) in no "
                                   f"ImageSets/Main list were not used, e.g. {unlisted[:3]}")
        for image_id, (vid, path, (w, h), declared, objs, xml_path) in enumerate(items):
            if declared[0] and declared[1] and (int(float(declared[0])), int(float(declared[1]))) != (w, h):
                report.size_mismatches += 1
                report.warnings.append(f"{xml_path}: declared size {declared[0]}x{declared[1]} but "
                                       f"the image is {w}x{h}; using {w}x{h}")
            boxes, labels = [], []
            for name, (x1, y1, x2, y2), k in objs:
                where = f"{xml_path} (image id '{vid}') object {k} '{name}'"
                if name not in index:
                    problems.add(f"{where}: unknown class '{name}' (classes: {names})")
                    continue
                box = check_box((x1 - 1, y1 - 1, x2, y2), w, h, where, report, problems)
                if box is not None:
                    boxes.append(box)
                    labels.append(index[name])
            records.append(make_record(image_id, path.name, path.resolve(), w, h, boxes, labels, report))
        out[split] = SplitData(split, records, names, "voc", report)
    return out
