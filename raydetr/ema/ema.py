"""ModelEma: exponential moving averages of a model's weights, one or several decays at once.

    ema = ModelEma(model, decay=0.993, tau=100)          # after model.to(device), before DDP
    for batch in batches:
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        ema.update(model)                                 # once per optimizer step
    ema.load_into(eval_model)                             # validate the EMA weights
    torch.save(ema.state_dict(), path)                    # resume: ema.load_state_dict(...)

Design (why it is fast and exact):
- The shadow is float32 (float64 for float64 tensors) for every floating-point parameter and
  buffer; buffers are averaged (RF-DETR) or copied (``average_buffers=False``); integer and bool
  buffers (BatchNorm ``num_batches_tracked``) are always copied.
- The model's tensors are resolved ONCE (``bind``) into flat lists that keep references to the
  live ``nn.Parameter`` / buffer objects. ``optimizer.step`` and ``model.load_state_dict``
  change them in place, so the lists stay valid and ``update`` does no state_dict/key work:
  one ``torch._foreach_lerp_(shadow, model, 1 - d)`` per shadow (fallback ``_foreach_mul_`` +
  ``_foreach_add_``). A few sentinel tensors (first/last parameter and buffer: identity,
  data_ptr, dtype, device) are checked each update, which catches whole-model changes
  (``model.to(...)``, ``load_state_dict(assign=True)``) and re-binds. Replacing single
  submodules or parameters after construction is NOT detected: call ``ema.bind(model)``.
- bf16/fp16 (or other-device) model tensors are cast once per update into a reused float32
  scratch list on the shadow's device, then every shadow lerps from it.
- The EMA never feeds back into training: K decays in one run = K single-decay runs, bit for bit.
- ``updates`` (saved in ``state_dict``: warmup continues after a resume) counts applied updates;
  with ``nan_guard`` an update whose model tensors are not all finite is skipped (``skipped``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from raydetr.ema.keys import clean_key, clean_state_dict, unwrap_model
from raydetr.ema.schedules import get_schedule, schedule_accepts
from raydetr.ema.shadow import Shadow, plain_shadows

log = logging.getLogger(__name__)

FORMAT = "raydetr.ModelEma/1"


@dataclass
class _Group:
    """Averaged tensors whose model dtype/device is the same; one foreach call per shadow."""

    model: list[Tensor]  # live references to the model's Parameters / buffers
    shadows: list[list[Tensor]]  # [decay index][tensor]
    scratch: list[Tensor] | None = None  # shadow-dtype staging when model dtype/device differ
    cross_device: bool = False
    fused_shadows: list[Tensor] = field(default_factory=list)  # all shadows concatenated


def _shadow_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else t.dtype


def _live_tensors(module: nn.Module) -> dict[str, Tensor]:
    state = module.state_dict(keep_vars=True)
    return {clean_key(k): v for k, v in state.items() if isinstance(v, Tensor)}


class ModelEma:
    """EMA shadow(s) of ``unwrap_model(model)``'s state dict (see the module docstring).

    Args:
        model: the training model (wrappers are stripped). Create the EMA after moving the
            model to its device.
        decay: peak decay c when ``decays`` is None.
        tau: warmup length in updates, passed to schedules that take ``tau`` (rfdetr).
        decays: several peak decays, one shadow each, updated in the same pass.
        shadows: typed identities instead of ``decays`` (their ``effective`` decays apply).
        schedule: name in :mod:`raydetr.ema.schedules` (constant, rfdetr, timm, threshold, exp,
            power, or one you registered); ``schedule_kwargs`` are its options.
        average_buffers: average floating-point buffers (True) or copy them (False).
        device: shadow device, e.g. "cpu" while the model is on GPU; None: the model's device.
        nan_guard: skip (and count in ``skipped``) updates where a model tensor is not finite.
        total_steps: optimizer steps of the whole run, passed to schedules that take
            ``total_steps`` (exp, custom ones) unless ``schedule_kwargs`` sets it.
    """

    fused_shadows = False  # one foreach call over all shadows (ScalarList); see bench/ema.py

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.993,
        tau: float = 100,
        *,
        decays: Iterable[float] | None = None,
        shadows: Sequence[Shadow] | None = None,
        schedule: str = "rfdetr",
        schedule_kwargs: dict[str, Any] | None = None,
        average_buffers: bool = True,
        device: str | torch.device | None = None,
        nan_guard: bool = True,
        total_steps: int | None = None,
    ) -> None:
        self.shadows: list[Shadow] = (list(shadows) if shadows is not None else
                                      plain_shadows(list(decays if decays is not None else [decay])))
        self.decays: list[float] = [s.effective for s in self.shadows]
        if not self.decays:
            raise ValueError("ModelEma: decays must be a non-empty list (config key ema.decay)")
        if len(set(self.decays)) != len(self.decays):
            raise ValueError(f"ModelEma: duplicate decays in {self.decays} (config key ema.decay)")
        self.schedule = schedule
        self.schedule_kwargs: dict[str, Any] = _plain(
            dict(schedule_kwargs or {}), "schedule_kwargs"
        )
        if "tau" not in self.schedule_kwargs and schedule_accepts(schedule, "tau"):
            self.schedule_kwargs["tau"] = float(tau)
        if (total_steps is not None and "total_steps" not in self.schedule_kwargs
                and schedule_accepts(schedule, "total_steps")):
            self.schedule_kwargs["total_steps"] = int(total_steps)
        self._schedules = [get_schedule(schedule, d, **self.schedule_kwargs) for d in self.decays]
        self.average_buffers = bool(average_buffers)
        self.device = torch.device(device) if device is not None else None
        self.nan_guard = bool(nan_guard)
        self.updates = 0
        self.skipped = 0

        module = unwrap_model(model)
        live = _live_tensors(module)
        param_ids = {id(p) for p in module.parameters()}
        self._names = list(live)
        self._averaged: set[str] = set()
        for name, t in live.items():
            if not t.is_floating_point():
                continue
            finite = bool(torch.isfinite(t.detach()).all()) if t.device.type != "meta" else True
            if id(t) in param_ids:
                if not finite:
                    raise ValueError(f"ModelEma: parameter '{name}' holds NaN/inf at creation")
                self._averaged.add(name)
            elif self.average_buffers and finite:
                self._averaged.add(name)  # non-finite buffers (e.g. -inf masks) are copied
        self._shadows: list[dict[str, Tensor]] = []
        with torch.no_grad():
            for _ in self.decays:
                self._shadows.append(
                    {
                        name: t.detach()
                        .to(device=self.device or t.device, dtype=_shadow_dtype(t), copy=True)
                        .contiguous()
                        for name, t in live.items()
                    }
                )
        self.bind(model)

    # ------------------------------------------------------------------ binding
    def bind(self, model: nn.Module) -> None:
        """(Re)resolve the flat tensor lists the hot path uses. ``update`` calls it itself when
        the model object or a sentinel tensor changed; call it after replacing submodules."""
        module = unwrap_model(model)
        live = _live_tensors(module)
        if list(live) != self._names:
            missing = [k for k in self._names if k not in live]
            extra = [k for k in live if k not in set(self._names)]
            raise KeyError(
                f"ModelEma: the model's state_dict keys differ from the EMA's: missing "
                f"{missing[:10]}, unexpected {extra[:10]}"
                + (" (same keys, different order)" if not (missing or extra) else "")
            )
        groups: dict[tuple, _Group] = {}
        copy_groups: dict[tuple, _Group] = {}
        guard: dict[tuple, list[Tensor]] = {}
        for name, t in live.items():
            shadows = [s[name] for s in self._shadows]
            if t.shape != shadows[0].shape:
                raise ValueError(
                    f"ModelEma: '{name}' has shape {tuple(t.shape)} in the model but "
                    f"{tuple(shadows[0].shape)} in the EMA"
                )
            key = (t.dtype, t.device, shadows[0].dtype, shadows[0].device)
            target = groups if name in self._averaged else copy_groups
            g = target.setdefault(key, _Group(model=[], shadows=[[] for _ in self.decays]))
            g.model.append(t)
            for k, s in enumerate(shadows):
                g.shadows[k].append(s)
            if t.is_floating_point() and (name in self._averaged or self._finite_at_start(name)):
                guard.setdefault(key, []).append(t)
        for (mdtype, mdev, sdtype, sdev), g in groups.items():
            g.cross_device = mdev != sdev
            if mdtype != sdtype or g.cross_device:
                pin = sdev.type == "cpu" and mdev.type == "cuda"
                g.scratch = [
                    torch.empty(s.shape, dtype=sdtype, device=sdev, pin_memory=pin)
                    for s in g.shadows[0]
                ]
            g.fused_shadows = [s for per_decay in g.shadows for s in per_decay]
        self._groups = list(groups.values())
        self._copy_groups = list(copy_groups.values())
        # The guard reads the float32 scratch for staged groups (cheaper, and no fp16 overflow
        # in the norm); model tensors otherwise. Copied float buffers are read from the model.
        staged = {id(t) for g in self._groups if g.scratch is not None for t in g.model}
        self._guard_lists = [[t for t in ts if id(t) not in staged] for ts in guard.values()]
        self._guard_lists = [ts for ts in self._guard_lists if ts]
        self._module = module
        self._sentinel_slots = self._pick_sentinels(module)
        self._sentinel = self._read_sentinel()

    def _finite_at_start(self, name: str) -> bool:
        t = self._shadows[0][name]
        return t.device.type == "meta" or bool(torch.isfinite(t).all())

    @staticmethod
    def _pick_sentinels(module: nn.Module) -> list[tuple[dict, str]]:
        params: list[tuple[dict, str]] = []
        buffers: list[tuple[dict, str]] = []
        for mod in module.modules():
            params += [(mod._parameters, n) for n, t in mod._parameters.items() if t is not None]
            buffers += [(mod._buffers, n) for n, t in mod._buffers.items() if t is not None]
        return [s for lst in (params, buffers) for s in (lst[:1] + lst[-1:])]

    def _read_sentinel(self) -> list[tuple]:
        out = []
        for store, name in self._sentinel_slots:
            t = store.get(name)
            out.append((id(t), t.data_ptr(), t.dtype, t.device) if t is not None else None)
        return out

    # ------------------------------------------------------------------ hot path
    def _decay_values(self, updates: int) -> list[float]:
        return [sched(updates) for sched in self._schedules]

    def current_decays(self) -> list[float]:
        """Decays applied at the latest update (before any update: those of the first)."""
        return self._decay_values(max(1, self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module, finite: bool | Tensor | None = None) -> bool:
        """Fold the model's current weights into every shadow. Call once per optimizer step.

        ``finite``: the caller's verdict on the new weights, e.g. from the gradient norm it
        already computed for clipping (finite weights + finite gradients give finite AdamW
        weights); a 0-dim bool tensor is read (one sync) only when the guard is on.
        None: the NaN guard checks the weights itself (one extra read of the model).
        Returns False when the guard skipped the update (``skipped`` counts them).
        """
        module = unwrap_model(model)
        if module is not self._module or self._read_sentinel() != self._sentinel:
            self.bind(module)
        for g in self._groups:  # stage bf16/fp16 or other-device tensors into float32 scratch
            if g.scratch is not None:
                torch._foreach_copy_(g.scratch, g.model, non_blocking=g.cross_device)
        if any(g.cross_device and g.model[0].is_cuda for g in self._groups):
            torch.cuda.current_stream(self._groups[0].model[0].device).synchronize()
        if self.nan_guard and not (self._all_finite() if finite is None else bool(finite)):
            self.skipped += 1
            log.warning(
                "EMA update skipped: the model has NaN/inf weights (update %d, %d skipped)",
                self.updates + 1,
                self.skipped,
            )
            return False
        weights = [1.0 - d for d in self._decay_values(self.updates + 1)]
        for g in self._groups:
            src = g.scratch if g.scratch is not None else g.model
            if self.fused_shadows and len(weights) > 1 and _HAS_FOREACH_LERP:
                n = len(src)
                torch._foreach_lerp_(
                    g.fused_shadows, src * len(weights), [w for w in weights for _ in range(n)]
                )
            else:
                for shadow, w in zip(g.shadows, weights):
                    _lerp_(shadow, src, w)
        for g in self._copy_groups:
            for shadow in g.shadows:
                torch._foreach_copy_(shadow, g.model)
        self.updates += 1
        return True

    def _all_finite(self) -> bool:
        sources = self._guard_lists + [g.scratch for g in self._groups if g.scratch is not None]
        # One fused L2 norm per list (NaN/inf propagate; it overflows only for |w| > ~1e19,
        # i.e. a diverged model, which is then skipped too). bench/ema.py: L2 is the fastest
        # foreach reduction on CPU (L1 ~5x, inf-norm ~25x slower); on CUDA it is one fused
        # kernel reading the model once. One device->host sync per group, usually one.
        return all(
            bool(torch.isfinite(torch.stack(torch._foreach_norm(src, 2)).sum())) for src in sources
        )

    # ------------------------------------------------------------------ access
    def shadow_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Shadow ``index`` (order of ``decays``) as a state dict with clean keys. The tensors
        are the live shadow (like ``nn.Module.state_dict``): clone them to keep a snapshot."""
        return dict(self._shadows[index])

    @torch.no_grad()
    def load_into(self, model: nn.Module, index: int = 0) -> nn.Module:
        """Copy shadow ``index`` into ``model`` (e.g. a deepcopy used for validation), on that
        model's device and dtype. Returns the unwrapped model."""
        target = unwrap_model(model)
        live = _live_tensors(target)
        shadow = self._shadows[index]
        missing = [k for k in shadow if k not in live]
        extra = [k for k in live if k not in shadow]
        if missing or extra:
            raise KeyError(
                f"ModelEma.load_into: model keys differ from the EMA's: not in the model "
                f"{missing[:10]}, not in the EMA {extra[:10]}"
            )
        for name, t in live.items():
            if t.shape != shadow[name].shape:
                raise ValueError(
                    f"ModelEma.load_into: '{name}' is {tuple(t.shape)} in the model, "
                    f"{tuple(shadow[name].shape)} in the EMA"
                )
            t.copy_(shadow[name], non_blocking=True)
        return target

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; loads with ``torch.load(weights_only=True)``.
        The shadow tensors are live references (torch.save copies them)."""
        return {
            "format": FORMAT,
            "updates": int(self.updates),
            "skipped": int(self.skipped),
            "decays": list(self.decays),
            "schedule": self.schedule,
            "schedule_kwargs": _plain(self.schedule_kwargs, "schedule_kwargs"),
            "average_buffers": self.average_buffers,
            "keys": list(self._names),
            "shadows": [dict(s) for s in self._shadows],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore shadows and the update counter (warmup continues where it stopped).

        Decays and keys must match. With ``strict`` the schedule and its options must match
        too; ``strict=False`` keeps this EMA's schedule and logs the difference.
        """
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a ModelEma state_dict (format {got!r}, expected {FORMAT!r})")
        problems = []
        if [float(d) for d in state["decays"]] != self.decays:
            problems.append(f"decays: checkpoint {state['decays']} vs this EMA {self.decays}")
        keys = list(state["keys"])
        if keys != self._names:
            missing = [k for k in self._names if k not in set(keys)]
            extra = [k for k in keys if k not in set(self._names)]
            problems.append(
                f"keys: missing from checkpoint {missing[:10]}, unexpected {extra[:10]}"
                + (" (same keys, different order)" if not (missing or extra) else "")
            )
        sched_diff = (state["schedule"], state["schedule_kwargs"]) != (
            self.schedule,
            self.schedule_kwargs,
        )
        msg = (
            f"schedule: checkpoint {state['schedule']} {state['schedule_kwargs']} vs this EMA "
            f"{self.schedule} {self.schedule_kwargs}"
        )
        if sched_diff and strict:
            problems.append(msg)
        if bool(state.get("average_buffers", True)) != self.average_buffers:
            log.warning(
                "EMA checkpoint average_buffers=%s, this EMA %s: keeping this EMA's",
                state.get("average_buffers"),
                self.average_buffers,
            )
        if not problems:
            for k, (src, dst) in enumerate(zip(state["shadows"], self._shadows)):
                for name, t in dst.items():
                    if src[name].shape != t.shape:
                        problems.append(
                            f"shadow {k} '{name}': checkpoint {tuple(src[name].shape)} vs "
                            f"{tuple(t.shape)}"
                        )
        if problems:
            raise ValueError(
                "ModelEma.load_state_dict: checkpoint does not match this EMA:\n  "
                + "\n  ".join(problems)
                + "\nBuild the EMA with the checkpoint's settings (ema.decay / ema.schedule) "
                "or start the EMA fresh."
            )
        if sched_diff:
            log.warning("ModelEma.load_state_dict: %s; keeping this EMA's schedule", msg)
        for src, dst in zip(state["shadows"], self._shadows):
            for name, t in dst.items():
                t.copy_(src[name])
        self.updates = int(state["updates"])
        self.skipped = int(state.get("skipped", 0))

    def __repr__(self) -> str:
        return (f"ModelEma(decays={self.decays}, schedule={self.schedule!r} {self.schedule_kwargs}, "
                f"updates={self.updates}, skipped={self.skipped}, tensors={len(self._names)})")


_HAS_FOREACH_LERP = hasattr(torch, "_foreach_lerp_")


def _lerp_(shadow: list[Tensor], src: list[Tensor], weight: float) -> None:
    """shadow <- shadow + weight * (src - shadow), i.e. decay = 1 - weight."""
    if _HAS_FOREACH_LERP:
        torch._foreach_lerp_(shadow, src, weight)
    else:  # older torch: same update in two passes
        torch._foreach_mul_(shadow, 1.0 - weight)
        torch._foreach_add_(shadow, src, alpha=weight)


def _plain(value: Any, where: str) -> Any:
    """Check that ``value`` survives ``torch.load(weights_only=True)`` (plain data only)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise TypeError(
        f"ModelEma.state_dict: {where} holds a {type(value).__name__}; only numbers, strings, "
        "lists and dicts can be saved (torch.load(weights_only=True))"
    )


__all__ = ["ModelEma", "clean_key", "clean_state_dict", "unwrap_model"]
