"""Tiny on-disk datasets (COCO plain / Roboflow, YOLO, VOC) written by the tests themselves."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

W, H = 40, 30


def write_png(path: Path, w: int = W, h: int = H, colour: tuple[int, int, int] = (90, 20, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def coco_dict(offset: int = 0) -> dict[str, Any]:
    """Three images (the last a negative); category ids 3 'ant' and 1 'cat', listed out of
    order: sorted ids give classes ['cat', 'ant']."""
    images = [{"id": offset + k, "file_name": f"img {k}.png", "width": W, "height": H}
              for k in range(3)]
    anns = [
        {"id": 1, "image_id": offset + 0, "category_id": 1, "bbox": [2, 3, 10, 8], "iscrowd": 0},
        {"id": 2, "image_id": offset + 0, "category_id": 3, "bbox": [20, 10, 15, 15], "iscrowd": 0},
        {"id": 3, "image_id": offset + 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
    ]
    cats = [{"id": 3, "name": "ant", "supercategory": "bugs"},
            {"id": 1, "name": "cat", "supercategory": "bugs"}]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture
def make_coco(tmp_path: Path) -> Callable[..., Path]:
    """make_coco(layout='roboflow'|'plain'|'file', edit=fn(split, coco_dict)) -> dataset path."""

    def make(layout: str = "roboflow", edit: Callable[[str, dict], None] | None = None) -> Path:
        root = tmp_path / f"coco-{layout}"
        splits = {"train": "train", "val": "valid"} if layout == "roboflow" else {"train": "train", "val": "val"}
        for i, (split, folder) in enumerate(splits.items()):
            data = coco_dict(offset=100 * i)
            if layout == "roboflow":
                data["categories"].insert(0, {"id": 0, "name": "bugs", "supercategory": "none"})
                jpath, img_dir = root / folder / "_annotations.coco.json", root / folder
            else:
                jpath, img_dir = root / "annotations" / f"instances_{split}.json", root / split
            for img in data["images"]:
                write_png(img_dir / img["file_name"])
            if edit is not None:
                edit(split, data)
            jpath.parent.mkdir(parents=True, exist_ok=True)
            jpath.write_text(json.dumps(data))
            if layout == "file":
                return jpath
        return root

    return make


@pytest.fixture
def make_yolo(tmp_path: Path) -> Callable[..., Path]:
    """make_yolo(labels={split: {stem: text}} (replaces that split's files), yaml_text=...)
    -> dataset root, laid out like a Roboflow YOLO export."""

    def make(labels: dict[str, dict[str, str]] | None = None, yaml_text: str | None = None) -> Path:
        root = tmp_path / "yolo"
        labels = {"train": {"a 1": "0 0.5 0.5 0.5 0.5\n1 0.2 0.2 0.1 0.2\n", "b": ""},
                  "valid": {"c": "1 0.5 0.5 0.2 0.2\n"}, **(labels or {})}
        for split, files in labels.items():
            for stem, text in files.items():
                write_png(root / split / "images" / f"{stem}.png")
                (root / split / "labels").mkdir(parents=True, exist_ok=True)
                (root / split / "labels" / f"{stem}.txt").write_text(text)
        (root / "data.yaml").write_text(yaml_text or "train: ../train/images\nval: ../valid/images\n"
                                        "nc: 2\nnames: ['dog', 'person']\n")
        return root

    return make


VOC_XML = """<annotation><filename>{fname}</filename><size><width>{w}</width><height>{h}</height>
<depth>3</depth></size>{objects}</annotation>"""
VOC_OBJ = "<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"


@pytest.fixture
def make_voc(tmp_path: Path) -> Callable[..., Path]:
    """make_voc(objects={id: [(name, xmin, ymin, xmax, ymax)]}, sets={split: [ids]})."""

    def make(objects: dict[str, list[tuple]] | None = None,
             sets: dict[str, list[str]] | None = None) -> Path:
        root = tmp_path / "voc"
        objects = objects if objects is not None else {
            "0001": [("horse", 1, 1, 10, 10), ("bird", 5, 6, 20, 25)], "0002": [],
            "0003": [("bird", 30, 2, 40, 12)]}
        sets = sets or {"train": ["0001", "0002"], "val": ["0003"]}
        (root / "Annotations").mkdir(parents=True)
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for vid, objs in objects.items():
            write_png(root / "JPEGImages" / f"{vid}.jpg.png")
            xml = VOC_XML.format(fname=f"{vid}.jpg.png", w=W, h=H, objects="".join(
                VOC_OBJ.format(name=o[0], b=o[1:]) for o in objs))
            (root / "Annotations" / f"{vid}.xml").write_text(xml)
        for split, ids in sets.items():
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        return root

    return make
