"""Defaults <- YAML file <- ``key=value`` overrides, validated into a :class:`Config`.

Every error names the key and where its value came from (the YAML file, or the exact
``key=value`` argument). A section with an ``enabled`` switch takes a bool as shorthand:
``ema.posthoc=true`` is ``ema.posthoc.enabled=true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raydetr.config.schema import Config, ConfigError


def _parse_value(text: str) -> Any:
    """CLI values are YAML scalars/lists: 1e-4, true, null, [0.99,0.999], 'x'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# Keys that were removed on purpose, and what replaces them.
RENAMED = {"ema.decays": "ema.decay (now a list; a single number is shorthand)"}


def _section_model(key: str) -> type[BaseModel] | None:
    """The config model of a dotted section key (``"ema.posthoc"`` -> PosthocConfig), or None
    when ``key`` is not a section."""
    model: type[BaseModel] = Config
    for part in key.split("."):
        field = model.model_fields.get(part)
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _enabled_shorthand(key: str, value: Any) -> str:
    """``ema.posthoc=true`` means ``ema.posthoc.enabled=true``: a section that has an
    ``enabled`` switch accepts a bool for it. Returns the key the value belongs to."""
    model = _section_model(key) if isinstance(value, bool) else None
    return f"{key}.enabled" if model is not None and "enabled" in model.model_fields else key


def _expand_shorthands(tree: dict[str, Any], prefix: str = "") -> None:
    for key, value in list(tree.items()):
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _expand_shorthands(value, dotted + ".")
        elif _enabled_shorthand(dotted, value) != dotted:
            tree[key] = {"enabled": value}


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out += _leaves(value, dotted + ".") if isinstance(value, dict) and value else [dotted]
    return out


def _origin(key: str, origins: dict[str, str], fallback: str) -> str:
    """Where the value at dotted ``key`` came from: the source of that key or of the section
    above it, else of every key below it (a check across a section's keys), else ``fallback``."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:i]))
        if found is not None:
            return found
    below = sorted({src for k, src in origins.items() if not key or k.startswith(key + ".")})
    return ", ".join(below) or fallback


def _check_known(tree: dict[str, Any], model: type[BaseModel], prefix: str,
                 origins: dict[str, str], fallback: str) -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        fields = model.model_fields
        if dotted in RENAMED:
            raise ConfigError(f"{_origin(dotted, origins, fallback)}: config key '{dotted}' is "
                              f"now {RENAMED[dotted]}")
        if key not in fields:
            raise ConfigError(
                f"{_origin(dotted, origins, fallback)}: unknown config key '{dotted}'. Known keys "
                f"here: {', '.join(sorted(fields))} (`raydetr config {prefix.rstrip('.')}` lists "
                "them with their defaults)"
            )
        ann = fields[key].annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_known(value, ann, dotted + ".", origins, fallback)


def build_config(tree: dict[str, Any], source: str = "config",
                 origins: dict[str, str] | None = None) -> Config:
    """Validate a nested dict. Errors name the key and where its value came from: ``origins``
    maps dotted keys to their source (a file, a ``key=value`` argument); keys it does not cover
    came from ``source``."""
    origins = origins or {}
    _expand_shorthands(tree)
    _check_known(tree, Config, "", origins, source)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r}; from "
                         f"{_origin(loc, origins, source)})")
        raise ConfigError("invalid configuration\n" + "\n".join(lines)) from None


def _apply(tree: dict[str, Any], origins: dict[str, str], key: str, value: Any,
           source: str) -> None:
    key = _enabled_shorthand(key, value)
    try:
        set_dotted(tree, key, value)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for old in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[old]
    origins[key] = source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides (dotted keys)."""
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (data:, model:...)")
        tree = loaded
        _expand_shorthands(tree)
        origins = dict.fromkeys(_leaves(tree), str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=1e-4")
        key, _, raw = item.partition("=")
        _apply(tree, origins, key.strip(), _parse_value(raw), f"argument '{item}'")
    return build_config(tree, "defaults", origins)


def config_from_json(text: str) -> Config:
    return build_config(json.loads(text), "checkpoint config")


def with_overrides(cfg: Config, params: dict[str, Any], source: str = "overrides") -> Config:
    """``cfg`` with dotted-key values applied (a search trial's parameters), validated; the
    same object when there is nothing to apply."""
    if not params:
        return cfg
    tree = cfg.to_dict()
    origins: dict[str, str] = {}
    for key, value in params.items():
        _apply(tree, origins, key, value, f"{source} {key}={value!r}")
    return build_config(tree, source, origins)
