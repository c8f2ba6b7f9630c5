"""The published model's files: meta.json checks, artifact paths, signature, requirements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from raydetr.registry.errors import ModelLoadError

PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
META_KEYS = ("classes", "model", "resolution", "num_classes")
# Requirements of the served model (pinned to what is installed at publish time).
SERVING_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas", "pillow", "pydantic",
                        "pyyaml", "scipy", "mlflow")


def read_meta(path: str | Path) -> dict:
    """meta.json of a published winner, checked for the keys a loader needs."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"meta file not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ModelLoadError(f"{path}: missing keys {missing} (see 'Published winner directory')")
    if len(meta["classes"]) != int(meta["num_classes"]):
        raise ModelLoadError(f"{path}: {len(meta['classes'])} classes but num_classes="
                             f"{meta['num_classes']}")
    return meta


def model_dir_artifacts(model_dir: str | Path) -> tuple[Path, Path]:
    """(weights, meta) paths inside a downloaded MLflow model dir (read from its MLmodel)."""
    model_dir = Path(model_dir)
    conf = yaml.safe_load((model_dir / "MLmodel").read_text())
    arts = conf.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "weights" not in arts or "meta" not in arts:
        raise ModelLoadError(f"{model_dir}: not a raydetr model (no 'weights'/'meta' artifacts)")
    return model_dir / arts["weights"]["path"], model_dir / arts["meta"]["path"]


def serving_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in SERVING_REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def model_signature() -> Any:
    """Input: one binary column (the encoded image; first/only column, any name, e.g. 'image').

    Unnamed on purpose: a *named* column makes pyfunc reject plain lists ``[path, bytes]``, and
    a binary type makes the scoring server base64-decode that column of JSON requests.
    Params: threshold, max_detections. Output: one row per detection.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema([ColSpec("long", "image_index"), ColSpec("long", "class_id"),
                      ColSpec("string", "class_name"), ColSpec("double", "score")]
                     + [ColSpec("double", k) for k in ("x1", "y1", "x2", "y2")])
    params = ParamSchema([ParamSpec("threshold", "double", 0.5),
                          ParamSpec("max_detections", "long", 100)])
    return ModelSignature(inputs=Schema([ColSpec("binary")]), outputs=outputs, params=params)


def input_example() -> Any:
    import numpy as np
    import pandas as pd

    from raydetr.serve.images import encode_png

    img = np.full((32, 48, 3), 127, np.uint8)
    img[8:24, 12:36] = (220, 40, 40)
    return pd.DataFrame({"image": [encode_png(img)]})
