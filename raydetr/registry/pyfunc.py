"""The served model: an MLflow pyfunc *model from code* (this file is logged as the model).

Artifacts: ``weights`` (model.safetensors) and ``meta`` (meta.json); the raydetr package travels
as ``code_paths``. Nothing is unpickled, so it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.

    model = mlflow.pyfunc.load_model("models:/raydetr@champion")
    df = model.predict(["a.jpg", b"<png bytes>"], params={"threshold": 0.3})
    df = model.predict(pd.DataFrame({"image": [rgb_uint8_array]}))

Input: images as file paths, encoded bytes or uint8 HxWx3 arrays; a list (paths/bytes) or a
DataFrame whose ``image`` (or only) column holds them. Over HTTP (``mlflow models serve``):
``{"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG/JPEG>"], ...]},
"params": {"threshold": 0.3}}`` -- the binary input schema makes the server base64-decode.
Output: DataFrame, one row per detection: image_index, class_id, class_name, score,
x1, y1, x2, y2 (absolute pixels of the original image); a segmentation model adds ``mask``, the
detection's mask at the original size as COCO RLE ``{"size": [h, w], "counts": str}``
(``pycocotools.mask.decode`` reads it). Params: threshold (0.5), max_detections.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class RayDetrModel(PythonModel):
    """Thin adapter: all pre/post-processing lives in ``raydetr.serve.detector.Detector``."""

    def load_context(self, context: Any) -> None:
        # Imported here: the package comes from the model's code_paths, put on sys.path by MLflow.
        from raydetr.serve.detector import Detector

        self.detector = Detector.from_files(context.artifacts["weights"], context.artifacts["meta"],
                                            source="mlflow")

    # model_input: a DataFrame once MLflow has applied the logged signature (lists become a
    # one-column frame). MLflow infers no schema from a DataFrame hint, so the explicit signature
    # from raydetr.registry.modelfiles.model_signature() stays in charge. No __future__ annotations
    # here: MLflow inspects the real hint objects.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        max_det = params.get("max_detections")
        return self.detector.predict(
            model_input,
            threshold=float(params.get("threshold", 0.5)),
            max_detections=int(max_det) if max_det is not None else None,
        )


mlflow.models.set_model(RayDetrModel())
