"""Ray job entrypoint: train one model and register the winner (same code path as `raydetr train`).

    export RAY_ADDRESS=http://127.0.0.1:8265          # the cluster's dashboard / job server
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...       # Ray 2.60 token auth (see README)
    ray job submit --working-dir . -- python jobs/train.py --config configs/thermal.yaml \
        scaling.num_workers=2 mlflow.tracking_uri=http://mlflow:5000

Arguments are exactly those of `raydetr train`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir ships raydetr/

from raydetr.commands.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
