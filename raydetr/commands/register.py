"""``raydetr register RUN_DIR [mlflow.*=...]``: publish a finished run's winner to MLflow.

    raydetr register runs/myrun
    raydetr register runs/myrun mlflow.tracking_uri=http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raydetr.config import load_config
from raydetr.registry.publish import register_run_dir


def run(args: argparse.Namespace) -> int:
    mlflow_cfg = load_config(None, list(args.overrides)).mlflow if args.overrides else None
    info = register_run_dir(Path(args.run_dir), mlflow_cfg)
    print(json.dumps(info, indent=2, default=str))
    return 0
