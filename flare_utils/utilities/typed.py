"""Dataclasses from plain mappings (YAML, JSON), checked against their type annotations.

Unknown keys and wrong types are FlareInputErrors naming the key's full path, so a typo never
silently falls back to a default. Used by the study params and the trainers' configuration.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from flare_utils.errors import FlareInputError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except FlareInputError as e:
                errors.append(e.problem)
        raise FlareInputError(None, f"{where}: expected {' or '.join(_type_name(a) for a in args)}, "
                                    f"got {value!r}")
    if origin is Literal:
        if value not in args:
            raise FlareInputError(None, f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise FlareInputError(None, f"{where}: expected a list, got {type(value).__name__}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FlareInputError(None, f"{where}: expected a mapping, got {type(value).__name__}")
        return {coerce(k, args[0], f"{where} key"): coerce(v, args[1], f"{where}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FlareInputError(None, f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlareInputError(None, f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise FlareInputError(None, f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def from_dict(cls, data: Any, where: str = "params"):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FlareInputError(None, f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FlareInputError(None, f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)
