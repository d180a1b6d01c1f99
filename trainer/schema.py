"""Typed, frozen dataclass trees built from plain mappings (YAML), with one-line errors.

A field declares its type with a type hint and its rule with ``knob(default, rule)``; the
builder checks types, ranges and choices from those two, refuses unknown keys with the list
of allowed ones, and names the full dotted field in every message:
``train.objective.clip = -1 is not allowed: must be a number > 0``.
Cross-field rules live with the tree that needs them (config.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

ROOT = "train"


class TrainConfigError(ValueError):
    """A training setting that cannot run. The message is one line: field, value, what is allowed."""


def config_error(name: str, value: Any, allowed: str) -> TrainConfigError:
    """``train.<name> = <value> is not allowed: <allowed>`` (``name`` is dotted, without ``train.``)."""
    return TrainConfigError(f"{ROOT}.{name} = {value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class Rule:
    """A value rule: ``test`` gets the value after its type check; ``text`` is the whole
    ``must be ...`` phrase, used for type and range failures alike."""

    text: str
    test: Callable[[Any], bool] = lambda v: True


def _bounds_text(kind: str, gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    lo = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None
    hi = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else None
    if lo and hi:
        return f"must be {kind} in {lo}, {hi}"
    if lo:
        return f"must be {kind} {'>' if gt is not None else '>='} {lo[1:]}"
    if hi:
        return f"must be {kind} {'<' if lt is not None else '<='} {hi[:-1]}"
    return f"must be {kind}"


def bounded(kind: str, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, extra: str = "") -> Rule:
    """A range rule: ``bounded("a number", gt=0)`` is "must be a number > 0"."""
    def test(v: float) -> bool:
        return ((gt is None or v > gt) and (ge is None or v >= ge)
                and (lt is None or v < lt) and (le is None or v <= le))

    return Rule(_bounds_text(kind, gt, ge, lt, le) + extra, test)


def number(**bounds: float) -> Rule:
    return bounded("a number", **bounds)


def integer(**bounds: float) -> Rule:
    return bounded("an integer", **bounds)


def knob(default: Any, rule: Rule | None = None, *, path: bool = False, size: bool = False,
         null: str = "") -> Any:
    """A dataclass field with its rule.

    path: a file or directory; relative values are resolved against the config file's folder.
    size: a byte count; also accepts strings such as "200MiB" or "4GB".
    null: what null (None) means, for the message of an Optional field.
    """
    return dataclasses.field(default=default, metadata={"rule": rule, "path": path, "size": size, "null": null})


def section(cls: type) -> Any:
    """A nested section field (defaults to the section's defaults)."""
    return dataclasses.field(default_factory=cls)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "KI": 1024, "M": 1000**2, "MB": 1000**2,
               "MIB": 1024**2, "MI": 1024**2, "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "GI": 1024**3,
               "T": 1000**4, "TB": 1000**4, "TIB": 1024**4, "TI": 1024**4}


def parse_size(value: Any) -> int | None:
    """A byte count from an int or a string like "200MiB" / "4GB"; None if it is neither."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            return None
        n = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
        return int(n) if n.is_integer() else None
    return _as_int(value)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():  # YAML's 2e8 is a float
        return int(value)
    return None


class _Bad(Exception):
    """The value does not fit the field's type."""


def _type_text(tp: Any) -> str:
    if tp is bool:
        return "must be true or false"
    if tp is int:
        return "must be an integer"
    if tp is float:
        return "must be a number"
    if tp is str:
        return "must be a string"
    if typing.get_origin(tp) is Literal:
        return "must be one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return f"must be a list of {len(args)} {'numbers' if args[0] is float else 'values'}"
    return f"must be a {getattr(tp, '__name__', tp)}"


def _coerce(tp: Any, value: Any, size: bool) -> Any:
    """``value`` as type ``tp`` (no Optional here), or raise _Bad."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        # type(v) check: True == 1 must not pass for Literal[1, 2]
        for choice in typing.get_args(tp):
            if type(value) is type(choice) and value == choice:
                return choice
        raise _Bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Bad
        return tuple(_coerce(a, v, False) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp is int:
        n = parse_size(value) if size else _as_int(value)
        if n is None:
            raise _Bad
        return n
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Bad
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    raise TypeError(f"schema: unsupported field type {tp!r}")


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            if len(args) != 1:
                raise TypeError(f"schema: unsupported union {tp!r}")
            return args[0], True
    return tp, False


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def field_of(cls: type, dotted: str) -> dataclasses.Field[Any] | None:
    """The leaf field that a dotted key (``rollout.sampling.top_k``) names, or None."""
    *heads, last = dotted.split(".")
    for head in heads:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if head not in fields or not dataclasses.is_dataclass(fields[head].default_factory):
            return None
        cls = fields[head].default_factory  # type: ignore[assignment]
    return {f.name: f for f in dataclasses.fields(cls)}.get(last)


def unknown_key_error(name: str, key: Any, allowed: tuple[str, ...]) -> TrainConfigError:
    dotted = f"{name}.{key}" if name else str(key)
    return TrainConfigError(f"{ROOT}.{dotted} is not a known key: allowed keys are {', '.join(allowed)}")


def not_a_mapping_error(name: str, raw: Any, allowed: tuple[str, ...]) -> TrainConfigError:
    where = f"{ROOT}.{name}" if name else f"{ROOT} config"
    return TrainConfigError(f"{where} = {raw!r} is not allowed: must be a mapping with keys {', '.join(allowed)}")


def build(cls: type, raw: Any, name: str = "", resolve_path: Callable[[str], str] | None = None) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``raw`` (None: all defaults).

    name: the dotted prefix of ``cls`` in messages ("" for the root).
    resolve_path: applied to the value of every ``path=True`` field.
    """
    allowed = field_names(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise not_a_mapping_error(name, raw, allowed)
    for key in raw:
        if key not in allowed:
            raise unknown_key_error(name, key, allowed)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dotted = f"{name}.{f.name}" if name else f.name
        if dataclasses.is_dataclass(f.default_factory):
            values[f.name] = build(f.default_factory, raw.get(f.name), dotted, resolve_path)  # type: ignore[arg-type]
            continue
        if f.name not in raw:
            values[f.name] = f.default
            continue
        values[f.name] = _checked(hints[f.name], f, dotted, raw[f.name], resolve_path)
    return cls(**values)


def _checked(hint: Any, f: dataclasses.Field[Any], dotted: str, value: Any,
             resolve_path: Callable[[str], str] | None) -> Any:
    tp, optional = _split_optional(hint)
    rule: Rule | None = f.metadata.get("rule")
    text = rule.text if rule else _type_text(tp)
    if optional:
        null = f.metadata.get("null")
        text += f", or null ({null})" if null else ", or null"
    if value is None:
        if optional:
            return None
        raise config_error(dotted, value, text)
    try:
        out = _coerce(tp, value, f.metadata.get("size", False))
    except _Bad:
        raise config_error(dotted, value, text) from None
    if rule and not rule.test(out):
        raise config_error(dotted, value, text)
    if f.metadata.get("path") and resolve_path is not None:
        out = resolve_path(out)
    return out


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts / lists / scalars, in field order (for YAML and JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj
