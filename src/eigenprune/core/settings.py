"""Settings defined once: a config dataclass is the schema for its CLI flags, its JSON and `--set`.

Every field of a config dataclass carries `metadata={"help": ...}` and optionally `"flag"` (its
command-line spelling, when not `--field-name`); a field holding a nested config may rename the nested
flags (RunConfig's `score.seed` is `--score-seed`) and accept old spellings with a deprecation warning.
From that one definition come:

- `add_flags(parser, cls)`: argparse flags with the field's help, type and default shown;
- `flag_values(args, cls)`: the values a user actually gave (None means "not given");
- `coerce(cls, name, value)`: a value from JSON or the command line converted to the field's type, or a
  `ValueError` that names the field (`"per_head": "no"` is an error, not True);
- `from_dict(cls, data, where)`: a config from a dict (config.json, a study spec, `--set`), every key
  known and every value typed, nested config dataclasses included.

Like transformers' `HfArgumentParser`, but small and with the errors this project wants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
import warnings
from typing import Any, Union


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def _describe(tp) -> str:
    tp, optional = _optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        text = f"a list of {getattr(inner, '__name__', inner)}"
    elif origin in (Union, types.UnionType):
        text = " or ".join(_describe(a) for a in typing.get_args(tp))
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            tp, getattr(tp, "__name__", str(tp)))
    return text + (" (or null)" if optional else "")


def _scalar(tp, value: Any, from_text: bool) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            return int(value)
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if from_text and isinstance(value, str):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if tp is Any or tp is object:
        return value
    if typing.get_origin(tp) in (Union, types.UnionType):  # e.g. int | str: the first that accepts the value
        for option in typing.get_args(tp):
            try:
                return convert(option, value, from_text)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if typing.get_origin(tp) is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise TypeError
    raise TypeError


def convert(tp, value: Any, from_text: bool = False) -> Any:
    """`value` as type `tp` (int, float, str, bool, X | None, list[X], tuple[X, ...], dict); TypeError or
    ValueError when it is not one. `from_text`: the value came from a command line, so "0.1,0.5" is a list
    and "true" a bool."""
    tp, optional = _optional(tp)
    if value is None or (from_text and optional and value in ("none", "null", "None")):
        if optional:
            return None
        raise TypeError
    if from_text and tp is not str and isinstance(value, str) and value.strip()[:1] in ("[", "{"):  # a str is text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError from None
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        items = [_scalar(inner, v, from_text) for v in value]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value)
        raise TypeError
    return _scalar(tp, value, from_text)


def coerce(cls, name: str, value: Any, from_text: bool = False, where: str = "") -> Any:
    """`value` converted to the type of `cls`'s field `name`; a ValueError naming the field otherwise."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{where}unknown setting '{name}'; known: {', '.join(sorted(fields))}")
    tp = _hints(cls)[name]
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):  # its own fields name themselves
        return from_dict(tp, value, where)
    try:
        return convert(tp, value, from_text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}{name} must be {_describe(tp)}, got {json.dumps(value, default=str)}") from None


def from_dict(cls, data: dict, where: str = "", legacy: dict[str, str] | None = None):
    """An instance of `cls` from `data`: unknown keys and wrong types are ValueErrors naming the field.
    `legacy` maps old flat keys to their new dotted place (e.g. {"score_seed": "score.seed"})."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}expected an object of settings, got {type(data).__name__}")
    data = dict(data)
    for old, new in (legacy or {}).items():
        if old in data:
            outer, inner = new.split(".")
            data.setdefault(outer, {})
            if isinstance(data[outer], dict):
                if inner in data[outer]:  # both spellings: they must agree, or one value is silently lost
                    nested = _hints(cls)[outer]
                    flat = coerce(nested, inner, data[old], where=where)
                    if flat != coerce(nested, inner, data[outer][inner], where=where):
                        raise ValueError(f"{where}{old} = {json.dumps(data[old])} and {new} = "
                                         f"{json.dumps(data[outer][inner])} disagree; keep one ({new} is the "
                                         f"current spelling)")
                data[outer] = {inner: data.pop(old), **data[outer]}
    values = {name: coerce(cls, name, value, where=where) for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field missing
        raise ValueError(f"{where}{err}") from None
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None


def to_dict(config) -> dict:
    """JSON-ready (tuples as lists), nested configs as nested dicts."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flag(f: dataclasses.Field, rename: dict[str, str] | None = None) -> str:
    return "--" + (rename or {}).get(f.name, f.metadata.get("flag", f.name.replace("_", "-")))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return "" if value is None or value == "" else f" (default {value})"  # an empty list: no default to show


def _metavar(f: dataclasses.Field, tp) -> str:
    """What `--help` shows after the flag: the field's own ("metavar" in its metadata), else its type's (N, X,
    LIST, ...) rather than the field's name in capitals, which repeats the flag and pushes its help a line down."""
    if "metavar" in f.metadata:
        return f.metadata["metavar"]
    base, _ = _optional(tp)
    if typing.get_origin(base) in (list, tuple):
        return "A,B,..."
    if typing.get_origin(base) in (Union, types.UnionType):
        return "|".join(_metavar(f, a) for a in typing.get_args(base))
    return {int: "N", float: "X", bool: "BOOL"}.get(base, "TEXT")


class _Deprecated(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated; use {self.metavar_new}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_flags(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), dest_prefix: str = "",
              rename: dict[str, str] | None = None, aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per field of `cls`, default None = not given. A nested config dataclass is flattened; the
    field holding it may say, in its metadata, which of its fields to leave out ("exclude"), which flags to
    spell differently ("rename", e.g. {"seed": "score-seed"}) and which old spellings to accept ("aliases")."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("cli") is False:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_flags(parser, tp, tuple(f.metadata.get("exclude", ())), f"{dest_prefix}{f.name}.",
                      f.metadata.get("rename"), f.metadata.get("aliases"))
            continue
        dest = dest_prefix + f.name
        help_text = f.metadata.get("help", "") + _default_text(f)
        base, _ = _optional(tp)
        if base is bool:
            parser.add_argument(flag(f, rename), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue

        def parse(text: str, tp=tp, name=f.name) -> Any:
            try:
                return convert(tp, text, from_text=True)
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"{name} must be {_describe(tp)}, got '{text}'") from None

        kwargs = {"dest": dest, "type": parse, "default": None, "help": help_text, "metavar": _metavar(f, tp)}
        if "choices" in f.metadata and not all(c in help_text for c in f.metadata["choices"]):
            kwargs["help"] += f"; one of {', '.join(f.metadata['choices'])}"
        parser.add_argument(flag(f, rename), **kwargs)
        for alias in (aliases or {}).get(f.name, ()):
            action = type("Deprecated", (_Deprecated,), {"metavar_new": flag(f, rename)})
            parser.add_argument(alias, dest=dest, type=parse, default=None, action=action, help=argparse.SUPPRESS)


def flag_values(args: argparse.Namespace, cls, dest_prefix: str = "") -> dict:
    """The fields of `cls` the user gave on the command line (nested configs as nested dicts)."""
    values: dict = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            inner = flag_values(args, tp, f"{dest_prefix}{f.name}.")
            if inner:
                values[f.name] = inner
        elif getattr(args, dest_prefix + f.name, None) is not None:
            values[f.name] = getattr(args, dest_prefix + f.name)
    return values


def replace(config, overrides: dict, where: str = ""):
    """`config` with `overrides` (field -> value, converted from text or JSON) applied; nested configs merge."""
    current = to_dict(config)
    for name, value in overrides.items():
        tp = _hints(type(config)).get(name)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            current[name] = to_dict(replace(getattr(config, name), value, where))
        else:
            current[name] = coerce(type(config), name, value, from_text=isinstance(value, str), where=where)
    return from_dict(type(config), current, where)


def describe_fields(cls) -> str:
    """'name: help (default)' lines, for error messages and `--help`."""
    return "\n".join(f"  {f.name}: {f.metadata.get('help', '')}{_default_text(f)}" for f in dataclasses.fields(cls))
