"""What the registry publishes beside a model dir: the pyfunc code file, signature, input example,
requirements (the model dir itself: ``raydetr.artifacts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raydetr.serve.images import encode_png

PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Requirements of the served model (pinned to what is installed at publish time).
SERVING_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas", "pillow", "pydantic",
                        "pyyaml", "scipy", "mlflow")


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

    img = np.full((32, 48, 3), 127, np.uint8)
    img[8:24, 12:36] = (220, 40, 40)
    return pd.DataFrame({"image": [encode_png(img)]})
