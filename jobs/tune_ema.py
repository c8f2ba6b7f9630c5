"""Ray job entrypoint: Tune search over the EMA decay (and other knobs), best trial registered.

    ray job submit --working-dir . -- python jobs/tune_ema.py --config configs/tune_ema.yaml

Arguments are exactly those of `raydetr tune`. When only EMA settings vary, one run with
several shadows (`ema.decay=[...]`) gives the same map_ema per decay for the cost of one run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydetr.commands.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
