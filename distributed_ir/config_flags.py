"""Command-line flags generated from a flat dataclass config.

Each field becomes one flag: ``--kebab-name`` (or the metadata's ``flag``), its help text from the
metadata, its type from the annotation: ``bool`` -> a switch, ``list[...]`` -> one or more values,
``dict[str, ...]`` -> a repeatable ``KEY=VALUE``.  A flag not given is absent from the parsed
namespace (default ``SUPPRESS``), so a config file's value stays unless a flag names it: the
values read back by :func:`flag_values` go to :func:`~distributed_ir.config_loader.load_config`
last, and win.  Generic: knows nothing about the application's config classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from distributed_ir.config_loader import ConfigError, RawValue


def flag_field(text: str, *, flag: str | None = None, metavar: str | None = None,
               choices: tuple[str, ...] | None = None, required: bool = False, **kw: Any) -> Any:
    """A config field with its flag's help text; ``flag`` replaces the one derived from the name,
    ``required`` = a value must come from the flag or the config file (checked by :func:`missing`)."""
    meta = {"help": text, "flag": flag, "metavar": metavar, "choices": choices, "required": required}
    return dataclasses.field(metadata={k: v for k, v in meta.items() if v not in (None, False)}, **kw)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _scalar(tp: Any) -> Any:
    """``int | None`` -> ``int``: the type a flag's text converts to."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass ``cls`` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, flag = _scalar(hints[f.name]), flag_name(f)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        if tp is bool:
            parser.add_argument(flag, action="store_true", **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]  # shown as {a,b,c}
        else:
            kw["metavar"] = f.metadata.get("metavar") or flag.lstrip("-").replace("-", "_").upper()
        if typing.get_origin(tp) is dict:
            kw["action"] = "append"
        elif typing.get_origin(tp) is list:
            kw |= {"nargs": "+", "type": (typing.get_args(tp) or (str,))[0]}
        else:
            kw["type"] = tp
        parser.add_argument(flag, **kw)


def flag_values(args: argparse.Namespace, cls: type) -> tuple[dict[str, Any], list[str]]:
    """The flags given on the command line, as ``(values, overrides)`` for ``load_config``.

    A ``KEY=VALUE`` flag becomes ``{field: {KEY: VALUE}}`` (VALUE typed by the field).  A list
    flag takes every value up to the next flag, so trailing ``key=value`` overrides that name a
    field of ``cls`` (``--corpus a.jsonl b.jsonl batch_size=8``) are handed back as overrides."""
    values: dict[str, Any] = {}
    overrides: list[str] = []
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        origin = typing.get_origin(_scalar(hints[f.name]))
        if origin is dict:
            value = dict(_key_value(f, spec) for spec in value)
        elif origin is list:
            value = list(value)
            while value and value[-1].partition("=")[0].split(".")[0] in names and "=" in value[-1]:
                overrides.insert(0, value.pop())
            if not value:
                continue
        values[f.name] = value
    return values, overrides


def _key_value(f: dataclasses.Field, spec: str) -> tuple[str, RawValue]:
    key, sep, value = spec.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ConfigError(f"{flag_name(f)} {spec!r}: expected {f.metadata.get('metavar', 'KEY=VALUE')}", key=f.name)
    return key.strip(), RawValue(value.strip())


def missing(cfg: Any) -> list[str]:
    """Flags of ``required`` fields that are still empty after the file, overrides and flags."""
    return [flag_name(f) for f in dataclasses.fields(cfg) if f.metadata.get("required") and not getattr(cfg, f.name)]
