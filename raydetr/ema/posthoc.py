"""Post-hoc EMA (Karras et al. 2024, EDM2, sec. 3 and appendix C): pick the EMA length after
training.

During training a :class:`PosthocTracker` keeps two power-function EMAs of the weights (relative
widths ``sigma_rels``, EDM2 uses 0.05 and 0.10) and writes snapshots of both every N optimizer
steps. Afterwards :func:`reconstruct` builds the weights of a power-function EMA of ANY width
``sigma_rel`` at any stored step as a least-squares combination of the snapshots.

Why it works. A power-function EMA with exponent gamma, read at update t, averages the weights
with the profile ``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``0 < tau <= t``. The
tracking rule ``beta_t = (1 - 1/t)**(gamma + 1)`` (schedule ``power``) gives update tau exactly
the integral of that profile over ``(tau - 1, tau]``, so the discrete tracker IS the continuous
profile applied to piecewise-constant weights, and the snapshots' profiles span a space in which
the target profile's L2 projection is computed in closed form (inner products below). The same
coefficients applied to the snapshots' weights give the reconstructed EMA.

    tracker = PosthocTracker(model, sigma_rels=(0.05, 0.10), every_steps=50, out_dir=d)
    ... optimizer.step(); tracker.after_step(model, step)       # step: optimizer steps so far
    weights, info = reconstruct(list_snapshots(d), sigma_rel=0.07)  # state dict + fit info

Snapshot files: ``<out_dir>/posthoc_t{updates:09d}_sr{sigma_rel}.safetensors`` (deterministic,
so a retried epoch overwrites its own), metadata: format, step, updates, sigma_rel, gamma.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from raydetr.ema.ema import ModelEma
from raydetr.ema.schedules import sigma_rel_to_gamma

SNAPSHOT_FORMAT = "raydetr.posthoc/1"
STATE_FORMAT = "raydetr.PosthocTracker/1"
SNAPSHOT_GLOB = "posthoc_t*_sr*.safetensors"
# The power schedule caps its decay at the peak decay; this cap never binds (1 - 1/t)**(g+1)
# for any t a run reaches, so the trackers are the pure power-function EMAs.
_UNCAPPED = 1.0 - 1e-15


# ----------------------------------------------------------------------------- maths
def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 Eq. 3: the relative standard deviation of the power profile with exponent gamma."""
    if gamma <= -1:
        raise ValueError(f"gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> = integral of two power profiles, p(tau) = (g+1) tau**g / t**(g+1), 0<tau<=t.

    Both vanish above min(t_a, t_b), so the integral is
    (g_a+1)(g_b+1) t_min**(g_a+g_b+1) / ((g_a+g_b+1) t_a**(g_a+1) t_b**(g_b+1)) (EDM2 Eq. 151),
    written with ratios t_min/t so large step counts and exponents do not overflow.
    """
    if min(t_a, t_b) <= 0:
        raise ValueError(f"profile times must be > 0, got {t_a}, {t_b}")
    t_min = min(t_a, t_b)
    g = gamma_a + gamma_b + 1.0
    ratio = (t_min / t_a) ** (gamma_a + 1.0) * (t_min / t_b) ** (gamma_b + 1.0)
    return (gamma_a + 1.0) * (gamma_b + 1.0) * ratio / (g * t_min)


def gram_matrix(ts: Sequence[float], gammas: Sequence[float]) -> np.ndarray:
    """A[i, j] = <p_i, p_j> for profiles (ts[i], gammas[i])."""
    n = len(ts)
    a = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i, n):
            a[i, j] = a[j, i] = profile_inner(ts[i], gammas[i], ts[j], gammas[j])
    return a


def solve_coefficients(ts: Sequence[float], gammas: Sequence[float], t_target: float,
                       gamma_target: float) -> np.ndarray:
    """Least-squares weights x of the snapshot profiles approximating the target profile:
    A x = b (A: Gram matrix, b_i = <p_i, p_target>), then normalised to sum to 1 so the result
    is an average (a constant weight sequence is reproduced exactly).

    Times are rescaled by t_target first: A and b scale alike, x does not change, and the entries
    stay O(1). lstsq (not solve) because snapshots close in time make A nearly singular.
    """
    if not ts:
        raise ValueError("no snapshots to reconstruct from")
    scale = float(t_target)
    ts_n = [float(t) / scale for t in ts]
    a = gram_matrix(ts_n, gammas)
    b = np.array([profile_inner(t, g, 1.0, gamma_target) for t, g in zip(ts_n, gammas)])
    # Equilibrate: profiles at small t have large norms; scaling rows/columns by 1/||p_i||
    # keeps lstsq's cut-off relative to each profile, not to the largest one.
    d = 1.0 / np.sqrt(np.diag(a))
    x_scaled, *_ = np.linalg.lstsq(a * d[:, None] * d[None, :], b * d, rcond=1e-12)
    x = x_scaled * d
    total = float(x.sum())
    if not math.isfinite(total) or abs(total) < 1e-12:
        raise ValueError("post-hoc EMA: the least-squares coefficients do not sum to a usable "
                         "value; the snapshots cannot represent this profile")
    return x / total


def reconstruction_residual(ts: Sequence[float], gammas: Sequence[float], x: np.ndarray,
                            t_target: float, gamma_target: float) -> float:
    """Relative L2 error ||sum x_i p_i - p_target|| / ||p_target|| of the profile fit."""
    scale = float(t_target)
    ts_n = [float(t) / scale for t in ts]
    a = gram_matrix(ts_n, gammas)
    b = np.array([profile_inner(t, g, 1.0, gamma_target) for t, g in zip(ts_n, gammas)])
    tt = profile_inner(1.0, gamma_target, 1.0, gamma_target)
    err2 = float(x @ a @ x - 2.0 * x @ b + tt)
    return math.sqrt(max(err2, 0.0) / tt)


# ----------------------------------------------------------------------------- snapshots
@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int  # optimizer steps done when it was written
    updates: int  # EMA updates folded in (t of the profile; < step when updates were skipped)
    sigma_rel: float
    gamma: float


def snapshot_name(updates: int, sigma_rel: float) -> str:
    return f"posthoc_t{updates:09d}_sr{sigma_rel:.6g}.safetensors"


def read_snapshot_meta(path: Path) -> Snapshot:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: not a raydetr post-hoc EMA snapshot (format "
                         f"{meta.get('format')!r}, expected {SNAPSHOT_FORMAT!r})")
    return Snapshot(path=Path(path), step=int(meta["step"]), updates=int(meta["updates"]),
                    sigma_rel=float(meta["sigma_rel"]), gamma=float(meta["gamma"]))


def list_snapshots(directory: Path) -> list[Snapshot]:
    """Every snapshot in ``directory``, oldest first (by updates, then sigma_rel)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no post-hoc EMA snapshots at {directory}: train with "
                                "ema.posthoc.enabled=true to record them")
    snaps = [read_snapshot_meta(p) for p in sorted(directory.glob(SNAPSHOT_GLOB))]
    return sorted(snaps, key=lambda s: (s.updates, s.sigma_rel))


def select_snapshots(snaps: Sequence[Snapshot], step: int | None) -> tuple[list[Snapshot], int]:
    """Snapshots usable for a reconstruction at optimizer ``step`` (None: the last stored step):
    those written at or before it. Returns (snapshots, the target step's updates count)."""
    if not snaps:
        raise ValueError("no post-hoc EMA snapshots recorded")
    steps = sorted({s.step for s in snaps})
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"no snapshot at step {step}; stored steps: {_summarise(steps)}")
    used = [s for s in snaps if s.step <= step]
    target_updates = max(s.updates for s in used if s.step == step)
    return used, target_updates


def _summarise(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 12 else (
        ", ".join(map(str, steps[:6])) + ", ..., " + ", ".join(map(str, steps[-3:])))


def load_snapshot(path: Path) -> dict[str, Tensor]:
    """Tensors of one snapshot (safetensors: no pickle)."""
    out: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            out[key] = f.get_tensor(key)
    return out


def reconstruct(snaps: Sequence[Snapshot], sigma_rel: float, step: int | None = None
                ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights of the power-function EMA with ``sigma_rel`` at ``step`` (None: the last).
    See :func:`reconstruct_many`."""
    (weights, info), = reconstruct_many(snaps, [sigma_rel], step)
    return weights, info


def reconstruct_many(snaps: Sequence[Snapshot], sigma_rels: Sequence[float],
                     step: int | None = None) -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Weights of several power-function EMAs at ``step`` (None: the last stored step), reading
    each snapshot once.

    Floating-point tensors are combined in float64 and returned as float32; the others
    (integer buffers) come from the latest snapshot. Each result is (state dict, info); info
    has the coefficients, the profile residual and the step.
    """
    used, t_target = select_snapshots(snaps, step)
    ts, gammas = [s.updates for s in used], [s.gamma for s in used]
    infos, coefs = [], []
    for sigma_rel in sigma_rels:
        gamma_target = sigma_rel_to_gamma(float(sigma_rel))
        x = solve_coefficients(ts, gammas, t_target, gamma_target)
        coefs.append(x)
        infos.append({
            "sigma_rel": float(sigma_rel), "gamma": gamma_target,
            "step": max(s.step for s in used), "updates": t_target, "snapshots": len(used),
            "coefficients": [float(c) for c in x],
            "profile_residual": reconstruction_residual(ts, gammas, x, t_target, gamma_target),
        })
    accs: list[dict[str, Tensor]] = [{} for _ in sigma_rels]
    latest = max(used, key=lambda s: s.updates)
    ints: dict[str, Tensor] = {}
    for i, snap in enumerate(used):
        for name, t in load_snapshot(snap.path).items():
            if not t.is_floating_point():
                if snap is latest:
                    ints[name] = t
                continue
            t64 = t.to(torch.float64)
            for acc, x in zip(accs, coefs):
                if name in acc:
                    acc[name].add_(t64, alpha=float(x[i]))
                else:
                    acc[name] = t64 * float(x[i])
    out = []
    for acc, info in zip(accs, infos):
        weights = {name: t.to(torch.float32) for name, t in acc.items()}
        weights.update(ints)
        out.append((weights, info))
    return out


# ----------------------------------------------------------------------------- budget
def snapshot_every(total_steps: int, snapshots: int) -> int:
    """Steps between snapshots so a run of ``total_steps`` writes ``snapshots`` per profile
    (the grid's last point may fall short of the end; the run's last step adds one there)."""
    if snapshots < 1:
        raise ValueError(f"ema.posthoc.snapshots must be >= 1, got {snapshots}")
    return max(1, math.ceil(max(total_steps, 1) / snapshots))


def snapshot_steps(total_steps: int, every_steps: int) -> list[int]:
    """The optimizer steps a run of ``total_steps`` writes snapshots at: every ``every_steps``
    and its last step."""
    return sorted(set(range(every_steps, total_steps + 1, every_steps)) | {total_steps})


# ----------------------------------------------------------------------------- tracker
class PosthocTracker:
    """Two (or more) power-function EMAs of a model plus periodic snapshots of them.

    Args:
        model: the training model (wrappers stripped), on its device.
        sigma_rels: relative widths of the tracked profiles (EDM2: 0.05, 0.10).
        every_steps: write snapshots when ``step % every_steps == 0``.
        out_dir: where snapshots go (the run's storage; rank 0 only writes).
        bf16: store snapshots in bfloat16 (half the bytes; the trackers stay float32).
        device: shadow device (None: the model's).
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float], every_steps: int,
                 out_dir: Path | str, *, bf16: bool = False,
                 device: str | torch.device | None = None) -> None:
        self.sigma_rels = [float(s) for s in sigma_rels]
        if len(self.sigma_rels) < 2 or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"ema.posthoc.sigma_rels needs >= 2 distinct values, got {sigma_rels}")
        if every_steps < 1:
            raise ValueError(f"ema.posthoc.every_steps must be >= 1, got {every_steps}")
        self.every_steps = int(every_steps)
        self.out_dir = Path(out_dir)
        self.bf16 = bool(bf16)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        # One ModelEma per profile: each has its own schedule (the sigma_rel is a schedule
        # option), and ModelEma already handles dtypes, devices and the NaN guard.
        self._emas = [
            ModelEma(model, decay=_UNCAPPED, schedule="power",
                     schedule_kwargs={"sigma_rel": s}, device=device)
            for s in self.sigma_rels
        ]
        self.written: list[int] = []  # steps with snapshots (this process or restored)

    @property
    def updates(self) -> int:
        return self._emas[0].updates

    def shadow_state_dict(self, index: int) -> dict[str, Tensor]:
        return self._emas[index].shadow_state_dict(0)

    def after_step(self, model: nn.Module, step: int, finite: bool | Tensor | None = None,
                   write: bool = True) -> None:
        """Fold the new weights in; snapshot when ``step`` is a multiple of ``every_steps``.
        ``finite``: the caller's verdict on the weights (see ``ModelEma.update``)."""
        for ema in self._emas:
            ema.update(model, finite=finite)
        if write and step % self.every_steps == 0:
            self.snapshot(step)

    def snapshot(self, step: int) -> list[Path]:
        """Write one file per profile for ``step`` (atomically: temp file + rename). Writing the
        same step again (a retried epoch) overwrites it with the same content."""
        if step in self.written or self.updates == 0:
            return []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for ema, sigma_rel, gamma in zip(self._emas, self.sigma_rels, self.gammas):
            dtype = torch.bfloat16 if self.bf16 else None
            tensors = {
                k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                .detach().to("cpu").contiguous().clone()
                for k, v in ema.shadow_state_dict(0).items()
            }
            meta = {"format": SNAPSHOT_FORMAT, "step": str(step), "updates": str(ema.updates),
                    "sigma_rel": repr(sigma_rel), "gamma": repr(gamma),
                    "dtype": "bfloat16" if self.bf16 else "float32"}
            path = self.out_dir / snapshot_name(ema.updates, sigma_rel)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
            paths.append(path)
        self.written.append(step)
        return paths

    def snapshot_nbytes(self) -> int:
        """Tensor bytes of one profile's snapshot file (its header, a few KB, not counted)."""
        size = 2 if self.bf16 else None
        return sum(v.numel() * (size if size and v.is_floating_point() else v.element_size())
                   for v in self._emas[0].shadow_state_dict(0).values())

    def run_nbytes(self, total_steps: int) -> int:
        """Tensor bytes of every snapshot of a run of ``total_steps`` optimizer steps."""
        steps = snapshot_steps(total_steps, self.every_steps)
        return len(steps) * len(self.sigma_rels) * self.snapshot_nbytes()

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "sigma_rels": list(self.sigma_rels),
                "every_steps": self.every_steps, "written": list(self.written),
                "emas": [e.state_dict() for e in self._emas]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a PosthocTracker state (format "
                             f"{state.get('format') if isinstance(state, dict) else None!r})")
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(
                f"checkpoint tracks post-hoc sigma_rels {state['sigma_rels']}, this run "
                f"{self.sigma_rels}: resume with the same ema.posthoc.sigma_rels")
        for ema, s in zip(self._emas, state["emas"]):
            ema.load_state_dict(s)
        self.written = [int(s) for s in state["written"]]


def snapshot_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(SNAPSHOT_GLOB))

