"""``raydetr config [--preset P] [KEY-PREFIX]``: every key a config file or ``key=value`` can set.

    raydetr config                        # all keys: type, default, description
    raydetr config ema.posthoc            # one section
    raydetr config --preset rfdetr-nano   # the defaults under that preset, and what it changes

Read from the typed config (raydetr/config): the field's annotation, its default and its
``description``; the preset's architecture values come from the model's preset tables.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from raydetr.config import Config, ConfigError, load_config
from raydetr.model.build import resolve_model_config

# ModelConfig keys whose None means "the preset's value" (RF-DETR presets have no backbone key)
PRESET_FALLBACKS = ("resolution", "num_queries", "backbone")


def _type_name(ann: Any) -> str:
    """``int | None``, ``list[float]``, ``cosine | step`` (a Literal lists its choices)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if ann is type(None):
        return "None"
    if ann is Any:
        return "Any"
    return getattr(ann, "__name__", str(ann))


def format_value(value: Any) -> str:
    """As an override would write it: true, null, [0.99, 0.999], rtdetr-r18."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    return value if isinstance(value, str) else json.dumps(value)


def iter_fields(model: type[BaseModel] = Config, instance: BaseModel | None = None,
                prefix: str = "") -> Iterator[tuple[str, Any, Any, str | None, type | None]]:
    """(dotted key, annotation, value in ``instance``, description, section model or None) for
    every section and key, depth first in declaration order."""
    instance = instance if instance is not None else model()
    for name, field in model.model_fields.items():
        key, ann, value = f"{prefix}{name}", field.annotation, getattr(instance, name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield key, ann, value, field.description or ann.__doc__, ann
            yield from iter_fields(ann, value, key + ".")
        else:
            yield key, ann, value, field.description, None


def preset_changes(preset: str) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The config under ``model.preset=preset`` and ``key -> (default, preset value)`` for every
    key it changes, the architecture values a ``None`` key falls back to included."""
    base, cfg = Config(), load_config(None, [f"model.preset={preset}"])
    before = {k: v for k, _, v, _, sec in iter_fields(instance=base) if sec is None}
    after = {k: v for k, _, v, _, sec in iter_fields(instance=cfg) if sec is None}
    changes = {k: (before[k], after[k]) for k in before
               if before[k] != after[k] and k != "model.preset"}
    base_model, resolved = resolve_model_config(base.model), resolve_model_config(cfg.model)
    for name in PRESET_FALLBACKS:
        key = f"model.{name}"
        if key not in changes and resolved.get(name) not in (None, base_model.get(name)):
            changes[key] = (base_model.get(name), resolved.get(name))
    return cfg, changes


def format_config(prefix: str = "", preset: str | None = None, width: int = 96) -> str:
    """The text ``raydetr config`` prints."""
    cfg, changes = preset_changes(preset) if preset else (Config(), {})
    prefix = prefix.strip().strip(".")
    rows = [r for r in iter_fields(instance=cfg)
            if not prefix or r[0] == prefix or r[0].startswith(prefix + ".")]
    if not rows:
        sections = ", ".join(Config.model_fields)
        raise ConfigError(f"no config key or section '{prefix}'; sections: {sections} "
                          "(`raydetr config` lists every key)")
    out: list[str] = []
    if preset:
        shown = {k: v for k, v in changes.items() if any(r[0] == k for r in rows)}
        out.append(f"model.preset={preset} changes these defaults (keys you set still win):")
        out += [f"  {k}: {format_value(a)} -> {format_value(b)}"
                for k, (a, b) in sorted(shown.items())] or ["  none here"]
    resolved = resolve_model_config(cfg.model)
    wrap = textwrap.TextWrapper(width=width, initial_indent="    ", subsequent_indent="    ",
                                break_on_hyphens=False)
    for key, ann, value, description, section in rows:
        if section is not None:
            header = f"[{key}] {description or ''}".rstrip()
            out += ["", header] if out else [header]
            continue
        line = f"{key}: {_type_name(ann)} = {format_value(value)}"
        name = key.removeprefix("model.")
        if value is None and name in PRESET_FALLBACKS and resolved.get(name) is not None:
            line += f"   (null: {cfg.model.preset}'s {format_value(resolved.get(name))})"
        elif key in changes:
            line += f"   (preset {preset}; otherwise {format_value(changes[key][0])})"
        out.append(line)
        if description:
            out.append(wrap.fill(description))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    print(format_config(args.prefix, args.preset))
    return 0
