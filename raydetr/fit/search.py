"""Hyperparameter search: a Tuner over the training driver (``raydetr tune``, jobs/tune_ema.py).

    tune:
      search_space:
        ema.decay: {grid: [0.99, 0.993, 0.999]}
        optim.lr: {loguniform: [5.0e-5, 5.0e-4]}
      num_samples: 1            # repeats of the grid (x samples of the random axes)
      scheduler: early_stopping # or asha, fifo

Every trial is a full TorchTrainer run (its own ``trials/<trial_id>`` storage). After the search
each trial's winner is stripped; MLflow gets a parent run with the results table and one nested
run per trial; the best trial's winner is registered with the alias.

Because the EMA never feeds back into training, a search over EMA settings alone trains the same
network K times. One run with ``ema.decay=[...]`` gives the same ``map_ema`` per decay for the
cost of one run; the CLI says so when only ``ema.*`` keys vary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from raydetr.artifacts import RunDir
from raydetr.config import Config, ConfigError, build_config, set_dotted, with_overrides
from raydetr.ema.schedules import schedule_accepts
from raydetr.fit.driver import live_runs, run_dir_of, run_trials
from raydetr.fit.postfit import finalize
from raydetr.fit.trial_progress import TrialProgress
from raydetr.record import score_of
from raydetr.registry.search import log_search_parent
from raydetr.stopping.decisions import board_name, post_decision
from raydetr.stopping.scheduler import EarlyStoppingScheduler
from raydetr.train.checkpoint import latest_checkpoint, read_bests, read_state

log = logging.getLogger("raydetr.search")

SHADOWS_HINT = (
    "only EMA settings vary in this search: every trial trains the same network. One run with "
    "several EMA shadows gives the same map_ema per decay at ~1/K of the cost:\n"
    "    raydetr train ... ema.decay=[{decays}]"
)


def build_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """``{key: {grid|choice|uniform|loguniform: ...}}`` -> Tune search space."""
    from ray import tune

    makers = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in makers:
            raise ConfigError(
                f"tune.search_space.{key}: expected one of {{grid: [...]}}, {{choice: [...]}}, "
                f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; got {spec!r}"
            )
        (kind, values), = spec.items()
        out[key] = makers[kind](values)
    return out


def overridden_keys(cfg: Config, keys: list[str]) -> dict[str, str]:
    """Search keys that this config makes ineffective -> why. A search over them would train
    the same model in every trial."""

    out: dict[str, str] = {}
    for key in keys:
        if key.startswith("ema.") and key != "ema.enabled" and not cfg.ema.enabled:
            out[key] = "ema.enabled is false"
        elif key == "ema.tau" and "tau" in cfg.ema.schedule_kwargs:
            out[key] = "ema.schedule_kwargs.tau overrides it"
        elif key == "ema.tau" and not schedule_accepts(cfg.ema.schedule, "tau"):
            out[key] = f"ema.schedule '{cfg.ema.schedule}' takes no tau"
        elif key.startswith("early_stopping.") and cfg.tune.scheduler != "early_stopping":
            out[key] = f"tune.scheduler is '{cfg.tune.scheduler}'"
    return out


def _check_keys(cfg: Config) -> None:
    base = cfg.to_dict()
    for key, spec in cfg.tune.search_space.items():
        value = next(iter(spec.values()))[0] if isinstance(spec, dict) and spec else None
        tree = json.loads(json.dumps(base))
        set_dotted(tree, key, value)
        build_config(tree, f"tune.search_space.{key}")
    bad = overridden_keys(cfg, list(cfg.tune.search_space))
    if bad:
        raise ConfigError(
            "tune.search_space searches keys that the config overrides, so every trial would "
            "train the same: " + "; ".join(f"{k} ({why})" for k, why in bad.items()))


@dataclass
class SearchResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    registered: dict[str, Any] | None


class GatedASHAScheduler(ASHAScheduler):
    """ASHA that posts each decision to the run's decision board, so workers never train past
    a STOP (see raydetr.stopping.decisions)."""

    _supports_buffered_results = False

    def __init__(self, *args: Any, decision_board: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decision_board = decision_board

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:

        decision = super().on_trial_result(tune_controller, trial, result)
        if self.decision_board is not None and "epoch" in result:
            post_decision(self.decision_board, trial.trial_id, int(result["epoch"]), decision)
        return decision


def _scheduler(cfg: Config):

    board = board_name(run_dir_of(cfg))
    if cfg.tune.scheduler == "early_stopping":

        return EarlyStoppingScheduler.from_config(
            cfg.early_stopping, cfg.ema.enabled,
            state_path=RunDir(run_dir_of(cfg)).early_stopping, decision_board=board)
    if cfg.tune.scheduler == "asha":
        # Prunes on the same score the best trial is chosen by (EpochResult.score).
        return GatedASHAScheduler(time_attr="training_iteration", metric="score", mode="max",
                                  max_t=cfg.optim.epochs, grace_period=1, decision_board=board)
    return None


def _score(row: dict[str, Any], metric: str) -> float:
    return score_of(row["best_map"], row["best_map_ema"], metric)


def format_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    head = [*keys, "best_map", "best_map_ema", "winner", "epochs", "trial"]
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        vals = [*(r["params"].get(k) for k in keys), r["best_map"], r["best_map_ema"],
                r["winner"], r["epochs"], r["trial_id"]]
        lines.append("  ".join(
            f"{v:>12.4f}" if isinstance(v, float) else f"{v!s:>12}" for v in vals))
    return "\n".join(lines)


def search(cfg: Config, *, resume: bool = False) -> SearchResult:

    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: give at least one key to search over")
    _check_keys(cfg)
    keys = list(cfg.tune.search_space)
    if all(k.startswith("ema.") for k in keys) and "ema.decay" in keys:
        grid = cfg.tune.search_space["ema.decay"]
        decays = ",".join(str(d) for d in next(iter(grid.values())))
        log.warning(SHADOWS_HINT.format(decays=decays))

    live = live_runs(cfg, search=True)
    try:
        result = _search(cfg, keys, resume, live, run_trials, finalize)
    except BaseException as exc:
        if live is not None:
            live.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if live is not None:
        live.end("FINISHED")
    return result


def _search(cfg: Config, keys: list[str], resume: bool, live, run_trials, finalize
            ) -> SearchResult:

    grid_result, run_dir, info = run_trials(
        cfg, param_space=build_param_space(cfg.tune.search_space), scheduler=_scheduler(cfg),
        num_samples=cfg.tune.num_samples, max_concurrent_trials=cfg.tune.max_concurrent_trials,
        resume=resume, live=live, callbacks=[TrialProgress(keys)],
    )
    rows: list[dict[str, Any]] = []
    for result in grid_result:
        trial_id = Path(result.path).name
        train_dir = RunDir(run_dir).trial(trial_id)
        try:
            ckpt = latest_checkpoint(train_dir)
        except Exception as exc:  # noqa: BLE001 - a trial that never finished an epoch
            log.error("trial %s has no checkpoint (%s); error: %s", trial_id, exc, result.error)
            continue
        bests, state = read_bests(ckpt), read_state(ckpt)
        rows.append({
            "trial_id": trial_id, "params": dict(result.config), "train_dir": train_dir,
            "best_map": bests.regular.map,
            "best_map_ema": bests.map_ema,
            "winner": bests.winner(), "epochs": len(state["history"]),
            "history": state["history"],
        })
    if not rows:
        raise RuntimeError(f"no trial of the search in {run_dir} finished an epoch")
    best = max(rows, key=lambda r: _score(r, cfg.tune.metric))
    table = format_table(rows, keys)
    print(f"\nsearch results ({len(rows)} trials; best: {best['trial_id']})\n{table}\n")
    (run_dir / "search_results.txt").write_text(table + "\n")
    registered = _publish_search(cfg, run_dir, rows, best, table, info, finalize, live)
    return SearchResult(run_dir=run_dir, rows=rows, best=best, registered=registered)


def _trial_cfg(cfg: Config, params: dict[str, Any]) -> Config:
    return with_overrides(cfg, params, "trial config")


def _publish_search(cfg, run_dir, rows, best, table, info, finalize, live
                    ) -> dict[str, Any] | None:
    """Strip every trial's winner; results into the MLflow parent run, each trial's winner into
    its nested run (both live since the search started); register the best."""
    registered = None
    parent_id = None
    if cfg.mlflow.enabled:
        try:
            parent_id = log_search_parent(cfg, live.run_id("parent") if live else None, rows, table)
        except Exception as exc:  # noqa: BLE001 - registry outage must not lose the search
            log.error("MLflow unavailable (%s); winners stay on disk under %s/results", exc, run_dir)
    for row in rows:
        out = run_dir / "results" / row["trial_id"]
        out.mkdir(parents=True, exist_ok=True)
        is_best = row is best
        res = finalize(
            _trial_cfg(cfg, row["params"]), out, row["train_dir"], info,
            publish=parent_id is not None, parent_run_id=parent_id, register=is_best,
            live_run_id=live.run_id(row["trial_id"]) if live else None,
        )
        if is_best:
            registered = res.registered
    return registered
