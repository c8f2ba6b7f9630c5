"""EMA decay schedules: pure functions behind a small registry users can extend by name.

Every schedule is called with ``updates``: the number of EMA updates done INCLUDING the one
being computed, counted from 1 (the first ``ModelEma.update`` asks for ``schedule(1)``). Each
schedule documents how it maps ``updates`` onto the step convention of the library it copies,
so the same ``(decay, kwargs)`` gives the same decay sequence as that library.

    sched = get_schedule("rfdetr", 0.993, tau=100)
    sched(1)      # 0.993 * (1 - exp(-1/100)) ~= 0.00988

Add your own:

    @register_schedule("linear_warmup")
    def linear_warmup(updates: int, *, decay: float, warmup: int = 1000) -> float:
        return decay * min(1.0, updates / warmup)

A schedule is ``fn(updates: int, *, decay: float, **kwargs) -> float``; its keyword arguments
(with defaults) are the ``schedule_kwargs`` it accepts. The registry checks them when the
schedule is built, not at the first update.

Or name it by import path, with no registration (``ema.schedule=mypkg.decay:linear`` in YAML or
on the CLI): the driver resolves it and ships it to every Ray worker. A schedule that takes
``total_steps`` (optimizer steps of the whole run; SuperGradients' ``IDecayFunction`` gets it)
receives it from the worker unless ``ema.schedule_kwargs`` sets it.

SuperGradients' own forms work unchanged, named by import path the same way:

- a class (its ``IDecayFunction`` style, e.g. its documentation's ``LinearDecay``), built once
  as ``cls(**schedule_kwargs)``, then called ``obj(decay, step, total_steps)``;
- a plain function ``fn(decay, step, total_steps)`` (first parameter named ``decay``); further
  keyword parameters of it come from ``schedule_kwargs``.

SuperGradients' trainer calls them with ``step = batch_idx + 1 + len(loader) * epoch`` (from 1,
once per optimizer step) and ``total_steps = len(loader) * max_epochs``. raydetr passes
``step = updates`` and ``total_steps`` = optimizer steps of the whole run: the same numbers
with ``optim.grad_accum_steps=1``. (With accumulation SuperGradients counts micro-batches in
both; raydetr counts optimizer steps, and a non-finite update skipped by ``ema.nan_guard`` does
not advance ``step``.)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

ScheduleFn = Callable[..., float]
Form = Literal["raydetr", "sg_class", "sg_function"]
_REGISTRY: dict[str, ScheduleFn] = {}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def schedule_form(fn: Any) -> Form:
    """Which calling convention ``fn`` follows: raydetr's ``fn(updates, *, decay, ...)``,
    SuperGradients' class (``cls(**kwargs)(decay, step, total_steps)``) or SuperGradients'
    plain function ``fn(decay, step, total_steps)``."""
    if inspect.isclass(fn):
        return "sg_class"
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "decay" and params[0].kind in _POSITIONAL:
        return "sg_function"
    return "raydetr"


def _sg_call_arity_ok(fn: Any, form: Form) -> bool:
    target = fn.__call__ if form == "sg_class" else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())
    if form == "sg_class" and params and params[0].name == "self":
        params = params[1:]  # signature of the unbound __call__ of a class
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in _POSITIONAL]) >= 3


def _check_form(fn: Any, label: str) -> Form:
    form = schedule_form(fn)
    if form == "raydetr" and "decay" not in inspect.signature(fn).parameters:
        raise TypeError(
            f"{label} must accept a keyword argument 'decay' (fn(updates, *, decay, ...) -> "
            "float), or follow SuperGradients: a class whose __call__(decay, step, total_steps) "
            "returns the decay, or a function fn(decay, step, total_steps)")
    if form != "raydetr" and not _sg_call_arity_ok(fn, form):
        what = "__call__" if form == "sg_class" else "it"
        raise TypeError(f"{label}: {what} must take (decay, step, total_steps), as "
                        "SuperGradients' IDecayFunction does")
    return form


def _signature(fn: Any, form: Form) -> inspect.Signature:
    """The raydetr-style signature ``(updates, *, decay, [total_steps], options...)`` that
    ``schedule_kwargs`` are bound against, whatever the form."""
    if form == "raydetr":
        return inspect.Signature(list(inspect.signature(fn).parameters.values()))
    kw = inspect.Parameter.KEYWORD_ONLY
    head = [inspect.Parameter("updates", inspect.Parameter.POSITIONAL_ONLY),
            inspect.Parameter("decay", kw), inspect.Parameter("total_steps", kw)]
    params = list(inspect.signature(fn).parameters.values())
    options = params[3:] if form == "sg_function" else params  # a class: its __init__'s
    rest = [p.replace(kind=kw) if p.kind in _POSITIONAL else p for p in options
            if p.name not in ("updates", "decay", "total_steps")
            and p.kind != inspect.Parameter.VAR_POSITIONAL]
    return inspect.Signature(head + rest)


def _sg_call(obj: Any, decay: float, total_steps: int, updates: int) -> float:
    _check_updates(updates)
    return float(obj(decay, updates, total_steps))


def _sg_function_call(fn: Any, decay: float, total_steps: int, options: dict[str, Any],
                      updates: int) -> float:
    _check_updates(updates)
    return float(fn(decay, updates, total_steps, **options))


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator: register ``fn(updates, *, decay, **kwargs) -> float`` (or one of
    SuperGradients' forms, see the module docstring) under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"schedule name must be a non-empty string, got {name!r}")

    def deco(fn: ScheduleFn) -> ScheduleFn:
        _check_form(fn, f"schedule '{name}' ({fn.__qualname__})")
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"an EMA schedule named '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_schedules() -> list[str]:
    return sorted(_REGISTRY)


def schedule_accepts(name: str, kwarg: str) -> bool:
    """Whether schedule ``name`` takes keyword ``kwarg`` (e.g. ``tau``)."""
    fn = resolve_schedule(name)
    return kwarg in _signature(fn, schedule_form(fn)).parameters


def is_import_path(name: str) -> bool:
    return ":" in name


def resolve_schedule(name: str) -> ScheduleFn:
    """The schedule function: a registered name, or ``package.module:function``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not is_import_path(name):
        raise ValueError(
            f"unknown EMA schedule '{name}' (config key ema.schedule). Known schedules: "
            f"{', '.join(available_schedules())}; or give an import path such as "
            "mypkg.decay:linear (a function fn(updates, *, decay, ...) -> float, or "
            "SuperGradients' fn(decay, step, total_steps) or IDecayFunction-style class)"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"ema.schedule '{name}': cannot import module '{module_name}' ({exc}); is it "
            "installed or on PYTHONPATH?"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"ema.schedule '{name}': module '{module_name}' has no function '{attr}'")
    try:
        _check_form(fn, f"ema.schedule '{name}': {attr}")
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return fn


def check_schedule(name: str, decays: list[float], kwargs: dict[str, Any]) -> None:
    """Build the schedule for every decay as a worker would (with a stand-in ``total_steps``
    when the worker would supply it), so a bad name or option fails when the config loads."""
    kw = dict(kwargs)
    if "total_steps" not in kw and schedule_accepts(name, "total_steps"):
        kw["total_steps"] = 1000
    for d in decays:
        get_schedule(name, d, **kw)


def get_schedule(name: str, decay: float, **kwargs: Any) -> Callable[[int], float]:
    """Return ``updates -> decay`` for the registered schedule ``name`` with peak ``decay``.

    ``updates`` counts EMA updates including the current one, from 1. Unknown or missing
    keyword arguments raise a ``ValueError`` that lists what the schedule accepts.
    """
    fn = resolve_schedule(name)
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay} (schedule '{name}')")
    form = schedule_form(fn)
    sig = _signature(fn, form)
    accepted = [p for p in sig.parameters if p not in ("updates", "decay")]
    try:
        bound = sig.bind_partial(decay=float(decay), **kwargs)
    except TypeError as exc:
        raise ValueError(
            f"EMA schedule '{name}': {exc}. It accepts: {', '.join(accepted) or 'no options'} "
            "(config key ema.schedule_kwargs)"
        ) from None
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("updates",)
        and p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        and p.name not in bound.arguments
    ]
    if missing:
        raise ValueError(
            f"EMA schedule '{name}' needs {', '.join(missing)} in ema.schedule_kwargs "
            f"(it accepts: {', '.join(accepted)})"
        )
    args = dict(bound.arguments)
    for p in sig.parameters.values():  # **kwargs arrive as one dict: spread them again
        if p.kind == inspect.Parameter.VAR_KEYWORD and p.name in args:
            args.update(args.pop(p.name))
    if form == "raydetr":
        sched = functools.partial(fn, **args)
    else:
        decay_, total = args.pop("decay"), int(args.pop("total_steps"))
        if total <= 0:
            raise ValueError(f"EMA schedule '{name}': total_steps must be > 0, got {total}")
        if form == "sg_class":  # built once, as SuperGradients' ModelEMA.from_params does
            sched = functools.partial(_sg_call, fn(**args), decay_, total)
        else:
            sched = functools.partial(_sg_function_call, fn, decay_, total, args)
    sched(1)  # validates option values now (e.g. tau <= 0) rather than at the first update
    return sched


def _check_updates(updates: int) -> None:
    if updates < 1:
        raise ValueError(f"updates counts from 1 (the current update included), got {updates}")


@register_schedule("constant")
def constant(updates: int, *, decay: float) -> float:
    """d = c."""
    _check_updates(updates)
    return decay


@register_schedule("rfdetr")
def rfdetr(updates: int, *, decay: float, tau: float = 100.0) -> float:
    """RF-DETR / YOLOv5 / Ultralytics tau warmup: d = c * (1 - exp(-updates / tau)).

    Those libraries increment their counter before computing the decay, so their ``updates``
    is ours (from 1). ``ModelEma`` passes its ``tau`` argument here. Ultralytics' EMA is this
    schedule with decay=0.9999, tau=2000.
    """
    _check_updates(updates)
    if tau <= 0:
        raise ValueError(f"rfdetr schedule: tau must be > 0 (ema.tau), got {tau}")
    return decay * (1.0 - math.exp(-updates / tau))


@register_schedule("timm")
def timm(
    updates: int,
    *,
    decay: float,
    gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    update_after_step: int = 0,
    min_decay: float = 0.0,
) -> float:
    """timm ModelEmaV3 / diffusers power warmup.

    s = max(0, step - update_after_step - 1); d = 0 if s == 0 else
    clamp(1 - (1 + s / gamma) ** -power, min_decay, c).
    Step convention: timm's train loop increments ``num_updates`` after the optimizer step and
    before ``model_ema.update(model, step=num_updates)``, so ``step`` = our ``updates`` (from 1).
    Check: c=0.9999, step=10 -> s=9 -> 1 - 10**(-2/3) = 0.784557. The first update has d=0
    (the shadow becomes a copy of the model).
    """
    _check_updates(updates)
    if gamma <= 0:
        raise ValueError(f"timm schedule: gamma must be > 0, got {gamma}")
    s = max(0, updates - update_after_step - 1)
    if s == 0:
        return 0.0
    d = 1.0 - (1.0 + s / gamma) ** -power
    return max(min(d, decay), min_decay)


@register_schedule("threshold")
def threshold(updates: int, *, decay: float) -> float:
    """SuperGradients ThresholdDecay: d = min(c, (1 + s) / (10 + s)).

    SuperGradients' trainer calls ``ema.update(step=global_step)`` with
    ``global_step = batch_idx + 1 + len(loader) * epoch``: counted from 1, so s = updates (with
    grad accumulation it counts micro-batches; ours counts optimizer steps). First update:
    2 / 11 = 0.1818.
    """
    _check_updates(updates)
    s = updates
    return min(decay, (1.0 + s) / (10.0 + s))


@register_schedule("exp")
def exp(updates: int, *, decay: float, total_steps: int, beta: float = 15.0) -> float:
    """SuperGradients ExpDecay: d = c * (1 - exp(-beta * s / total_steps)), s = updates (its
    step counts from 1, see :func:`threshold`).

    ``total_steps``: optimizer steps of the whole run; the worker passes it. Check: c=0.9999,
    beta=15, s / total_steps = 0.1 -> 0.9999 * (1 - exp(-1.5)) = 0.776792; first update of
    10000: 0.9999 * (1 - exp(-0.0015)) = 0.0014987.
    """
    _check_updates(updates)
    if total_steps is None or int(total_steps) <= 0:
        raise ValueError(
            f"exp schedule needs total_steps > 0 in ema.schedule_kwargs, got {total_steps!r}"
        )
    s = updates
    return decay * (1.0 - math.exp(-beta * s / float(total_steps)))


@functools.lru_cache(maxsize=64)
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 power-EMA exponent gamma for a relative standard deviation ``sigma_rel``.

    Source: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
    Models" (EDM2), Sec. 3.1 / Eq. 3: sigma_rel = sqrt((g + 1) / ((g + 2)**2 (g + 3))), solved
    for g as the largest real root of g**3 + 7 g**2 + (16 - t) g + (12 - t) = 0 with
    t = sigma_rel**-2 (the same cubic as ``sigma_rel_to_gamma`` in NVlabs/edm2 training/phema.py).
    """
    if not 0.0 < sigma_rel < 0.28:
        # sigma_rel -> 0.2887 (1/sqrt(12)) as gamma -> -1: no averaging left to do.
        raise ValueError(f"power schedule: sigma_rel must be in (0, 0.28), got {sigma_rel}")
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


@register_schedule("power")
def power(
    updates: int, *, decay: float, sigma_rel: float | None = 0.05, gamma: float | None = None
) -> float:
    """EDM2 power-function EMA: d = (1 - 1/t) ** (gamma + 1), t = updates (from 1).

    ``gamma`` is given directly or derived from ``sigma_rel`` (default 0.05) with
    :func:`sigma_rel_to_gamma`. The peak ``decay`` caps the result (d = min(c, ...)), as in the
    other warmup schedules; pass e.g. 0.99999 to get the pure power EMA.
    """
    _check_updates(updates)
    g = float(gamma) if gamma is not None else sigma_rel_to_gamma(float(sigma_rel))
    if g <= -1:
        raise ValueError(f"power schedule: gamma must be > -1, got {g}")
    return min(decay, (1.0 - 1.0 / updates) ** (g + 1.0))
