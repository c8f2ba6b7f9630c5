"""A small Python API over the CLI's building blocks.

    from raydetr import RayDETR

    det = RayDETR.from_registry("raydetr@champion")      # or "models:/raydetr@champion", a dir
    df = det.predict("dog.jpg", threshold=0.4)           # DataFrame, one row per detection

    RayDETR(size="rtdetr-r34").train(dataset_dir="data/thermal", epochs=20, ema_decay=0.999)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from raydetr.config import Config, ConfigError, build_config, set_dotted
from raydetr.fit.driver import fit
from raydetr.fit.postfit import FitResult
from raydetr.registry.fetch import load_detector
from raydetr.serve.detector import Detector

# Keyword -> dotted config key for RayDETR(...).train(**kwargs).
TRAIN_KEYS = {
    "dataset_dir": "data.path",
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "ema_decay": "ema.decay",
    "early_stopping": "early_stopping.enabled",
    "num_workers": "scaling.num_workers",
    "use_gpu": "scaling.use_gpu",
    "output_dir": "run.output_dir",
    "name": "run.name",
    "resolution": "model.resolution",
    "size": "model.preset",
}


class RayDETR:
    """A detector to train (``train``) or a published one to use (``from_registry``)."""

    def __init__(self, size: str = "rtdetr-r18", *, detector: Detector | None = None, **config: Any) -> None:
        self.size = size
        self.config = config
        self.detector = detector  # raydetr.serve.detector.Detector once trained / loaded
        self.fit_result: FitResult | None = None

    # -- consuming a published model
    @classmethod
    def from_registry(cls, model: str, *, tracking_uri: str | None = None,
                      device: str | None = None) -> RayDETR:
        """``"name@alias"``, ``"name/3"``, any ``models:/``/``runs:/`` URI, or a model dir."""
        uri = str(model)
        if not uri.startswith(("models:/", "runs:/")) and not Path(uri).exists():
            uri = f"models:/{uri}"
        det = load_detector(uri, tracking_uri=tracking_uri, device=device)
        return cls(det.meta["model"].get("preset", "rtdetr-r18"), detector=det)

    def _require_detector(self) -> Detector:
        if self.detector is None:
            raise RuntimeError("no model yet: call train(...) or RayDETR.from_registry(...)")
        return self.detector

    def predict(self, image: Any, threshold: float = 0.5,
                max_detections: int | None = None) -> pd.DataFrame:
        """One image or a list (paths, bytes, uint8 HxWx3 arrays) -> detections DataFrame."""
        return self._require_detector().predict(image, threshold=threshold,
                                                max_detections=max_detections)

    def draw(self, image: Any, detections: pd.DataFrame) -> Image.Image:
        return self._require_detector().draw(image, detections)

    @property
    def classes(self) -> list[str]:
        return self._require_detector().classes

    # -- training ------------------------------------------------------------------------------
    def build_config(self, **kwargs: Any) -> Config:
        """Config from keyword arguments (see ``TRAIN_KEYS``; dotted keys pass through)."""
        tree: dict[str, Any] = {}
        for key, value in {"size": self.size, **self.config, **kwargs}.items():
            dotted = TRAIN_KEYS.get(key, key)
            if "." not in dotted:
                raise ConfigError(f"unknown train() argument '{key}'; known: "
                                  f"{', '.join(sorted(TRAIN_KEYS))} or a dotted config key")
            set_dotted(tree, dotted, str(value) if key == "dataset_dir" else value)
        return build_config(tree, "RayDETR.train arguments")

    def train(self, **kwargs: Any) -> FitResult:
        """Train with ``raydetr.fit.driver.fit``; afterwards ``predict`` uses the winner."""
        self.fit_result = fit(self.build_config(**kwargs))
        self.detector = Detector.from_dir(self.fit_result.winner_dir)
        return self.fit_result
