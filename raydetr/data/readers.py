"""COCO and Pascal VOC readers (used by ``dataset.read_dataset``; see its docstring; YOLO is
in ``yolo.py``).

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
    with_masks = any(mk.has_segmentation(d.get("annotations", [])) for d in loaded.values())
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
            boxes, labels, masks = [], [], []
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
                mask = mk.instance_rle(ann.get("segmentation"), w, h, awhere, report, problems) \
                    if with_masks and box is not None else None
                if box is not None and (mask is not None or not with_masks):
                    boxes.append(box)
                    labels.append(index[ann["category_id"]])
                    masks.append(mask)
            masks = mk.finish_masks(masks, boxes, w, h, report) if with_masks else None
            records.append(make_record(iid, fname, path.resolve(), w, h, boxes, labels, report,
                                       masks))
        records.sort(key=lambda r: r.image_id)
        out[split] = SplitData(split, records, classes, "coco", report, with_masks)
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
