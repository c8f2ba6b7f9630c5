"""Ray job entrypoint: COCO evaluation of a registered model on a dataset split.

    ray job submit --working-dir . -- python jobs/evaluate.py \
        --model models:/raydetr@champion --data /data/thermal --split test --mlflow

Arguments are exactly those of `raydetr evaluate`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydetr.commands.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
