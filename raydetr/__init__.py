"""raydetr: train DETR-family object detectors with EMA weights on a Ray cluster.

The public Python surface, importable from the package top::

    from raydetr import Detector, RayDETR, load_config

They are resolved on first use (PEP 562), so ``import raydetr.config`` on a Ray worker or
``raydetr --help`` does not import Ray Tune, MLflow and the whole fit path.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["Detector", "RayDETR", "load_config", "__version__"]

# public name -> module that defines it (read by tests/unit/test_import_graph.py as edges)
_PUBLIC = {
    "Detector": "raydetr.serve.detector",
    "RayDETR": "raydetr.api",
    "load_config": "raydetr.config",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'raydetr' has no attribute {name!r}")
