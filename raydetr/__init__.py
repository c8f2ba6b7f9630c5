"""raydetr: train DETR-family object detectors with EMA weights on a Ray cluster."""

__version__ = "0.1.0"
