"""A deterministic stop: workers wait for the scheduler's decision on epoch N before epoch N+1.

Ray Train's worker result queue holds one report and Tune's callback does not wait for the
scheduler, so without this a STOP decided on epoch N can arrive after the workers finished
N+1, and post-fit would take N+1's bests and history row. Here the scheduler posts every
decision to a small named actor (the board); each worker, after reporting epoch N, waits for
the decision on N. STOP: Tune ends the trial while the workers wait, so nothing after N exists.

    board = start_board(run_dir)                         # driver, before Tuner.fit
    post_decision(board, trial_id, epoch, "CONTINUE")    # scheduler (Tune driver process)
    wait_decision(board, trial_id, epoch)                # every worker, after its report
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import ray

log = logging.getLogger("raydetr.decisions")
NAMESPACE = "raydetr"
WAIT_LOG_S = 60.0  # say so in the log if a decision takes this long


@ray.remote(num_cpus=0)
class _Board:
    def __init__(self) -> None:
        self._decisions: dict[tuple[str, int], str] = {}

    def post(self, trial_id: str, epoch: int, decision: str) -> None:
        self._decisions[(trial_id, int(epoch))] = decision

    def get(self, trial_id: str, epoch: int) -> str | None:
        return self._decisions.get((trial_id, int(epoch)))


def board_name(run_dir: str | Path) -> str:
    return "raydetr-decisions-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]


_HANDLES: dict[str, object] = {}  # a named actor still dies when its last handle goes away


def start_board(run_dir: str | Path) -> str:
    """Create (or reuse) the run's board; returns its name. Lives until :func:`stop_board`."""
    name = board_name(run_dir)
    handle = _Board.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
    ray.get(handle.get.remote("", -1))  # created and named before any scheduler looks it up
    _HANDLES[name] = handle
    return name


def stop_board(name: str) -> None:
    handle = _HANDLES.pop(name, None)
    if handle is not None:
        ray.kill(handle)


def post_decision(name: str, trial_id: str, epoch: int, decision: str) -> None:
    ray.get(ray.get_actor(name, namespace=NAMESPACE).post.remote(trial_id, epoch, decision))


def wait_decision(name: str, trial_id: str, epoch: int, poll_s: float = 0.05) -> str:
    """Block until the scheduler decided on ``epoch``; returns the decision."""
    board = ray.get_actor(name, namespace=NAMESPACE)
    start = last_log = time.monotonic()
    while True:
        decision = ray.get(board.get.remote(trial_id, epoch))
        if decision is not None:
            return decision
        if time.monotonic() - last_log > WAIT_LOG_S:
            last_log = time.monotonic()
            log.info("waiting %.0f s for the scheduler's decision on epoch %d",
                     last_log - start, epoch)
        time.sleep(poll_s)
