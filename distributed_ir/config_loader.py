"""Loading typed configs: nested dataclasses from YAML with dotted ``a.b=c`` overrides.

Generic: knows nothing about the application's config classes.  Unknown keys and wrong types are
errors that name the key path, and ``FILE:LINE`` when the bad key is in a file.  YAML is read with
``yaml.safe_load`` only.  A field's help text (and a section's own defaults) live in its metadata
(:func:`config_field`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range; ``key`` is its dotted path."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def config_field(text: str, defaults: dict[str, Any] | None = None, **kw: Any) -> Any:
    """A field with help text.  ``defaults``: a section's own defaults, as the keys that differ from
    its class's; a config's mapping for the section is merged over them (see ``from_dict``)."""
    return field(metadata={"help": text} | ({"defaults": defaults} if defaults is not None else {}), **kw)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``; ``name`` is its dotted key."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}", key=name)


class RawValue(str):
    """A value as typed on the command line; parsed once its field's type is known."""


def _parse_raw(value: RawValue, tp: Any, where: str) -> Any:
    arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if str in arms:
        return str(value)  # a string field takes the text as typed: "query: {}", "2019"
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse {str(value)!r}: {e}", key=where) from None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if isinstance(value, RawValue):
        value = _parse_raw(value, tp, where)
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}", key=where)
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        errors: list[str] = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp} ({'; '.join(errors)})", key=where)
    if origin in (dict, list):
        want = dict if origin is dict else list
        if not isinstance(value, want):
            raise ConfigError(f"{where}: expected {want.__name__}, got {type(value).__name__}", key=where)
        if origin is dict and typing.get_args(tp):
            item = typing.get_args(tp)[1]
            return {k: _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
        return value
    if tp is float and not isinstance(value, bool):
        # YAML 1.1 reads "1e-4" as a string; users mean a float.
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}", key=where) from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}", key=where)
        return number
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}", key=where)
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}", key=where)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(sorted(names))}", key=prefix + unknown[0],
        )
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        defaults = fields[key].metadata.get("defaults")
        if defaults is not None and isinstance(value, dict):
            value = deep_merge(defaults, value)
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        try:
            return cls(**kwargs)
        except ValueError as e:  # a model-owned settings class (ValueError, optional .key): a config error
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e), key=getattr(e, "key", None)) from None
    except ConfigError as e:
        # __post_init__ names its field relative to its own section ("model.pooling") or, for a
        # key inside one of its own sub-sections, relative to itself ("train.task"): make it absolute
        if where and e.key:
            head = e.key.split(".", 1)[0]
            key = f"{where}.{e.key}" if "." in e.key and head in fields else f"{where}.{e.key.rsplit('.', 1)[-1]}"
        else:
            key = e.key
        raise ConfigError(f"{where + ': ' if where else ''}{e}", key=key) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys put in, recursively for nested mappings."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (safe to pass to Ray workers and to write as YAML/JSON)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; each value is parsed for its field's type (``1e-4``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        value = RawValue(raw)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional), then dotted overrides, then ``values`` (typed
    values such as command-line flags, merged last so they win).

    Errors read ``FILE:LINE: field 'a.b': message`` when the bad key is in the file.
    """
    data: dict[str, Any] = {}
    text = ""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded or {}
    data = deep_merge(apply_overrides(data, overrides or []), values or {})
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if not path or _set_after_the_file(e.key, overrides or [], values or {}):
            raise
        line = yaml_key_line(text, e.key) if e.key else None
        where = f"{path}:{line}: field '{e.key}'" if line else str(path)
        raise ConfigError(f"{where}: {e}", key=e.key) from None


def _set_after_the_file(key: str | None, overrides: list[str], values: dict[str, Any]) -> bool:
    """Whether dotted ``key`` (or a section holding it) was set by an override or a value, not the file."""
    if not key:
        return False
    given = {item.split("=", 1)[0].strip() for item in overrides} | set(values)
    return any(key == g or key.startswith(g + ".") for g in given)


def yaml_key_line(text: str, key: str) -> int | None:
    """1-based line of dotted ``key`` in YAML ``text`` (the nearest enclosing key that exists).

    Uses ``yaml.compose`` (a node tree with positions; constructs no Python objects).
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
