"""Typed values for the config dataclasses: a JSON value or a command-line string brought to a field's annotated
type (bool, int, float, str, tuples, Optional, nested sections), or a `ConfigError` naming the dotted key."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from semask.bounds import SettingError
from semask.errors import UsageError

__all__ = ["ConfigError", "fail", "unwrap_optional", "coerce", "type_name", "build_dataclass"]


class ConfigError(UsageError):
    """A configuration key or value that cannot be used; the message names the key and what is valid."""


def fail(key: str, expected: str, got: Any) -> None:
    raise ConfigError(f"config key {key!r}: expected {expected}, got {got!r}")


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``Optional[X]`` / ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Bring a JSON value or a command-line string to type ``tp``, or raise `ConfigError` naming ``key``."""
    inner, optional = unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        fail(key, type_name(tp), value)
    tp = inner
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(key, f"a {tp.__name__} section (set its fields with {key}.FIELD=VALUE)", value)
        return build_dataclass(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            fail(key, type_name(tp), value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            fail(key, type_name(tp), value)
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        fail(key, "true or false", value)
    if tp is int:
        if isinstance(value, bool):
            fail(key, "an integer", value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        fail(key, "an integer", value)
    if tp is float:
        if isinstance(value, bool):
            fail(key, "a number", value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        fail(key, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        fail(key, "a string", value)
    raise ConfigError(f"config key {key!r}: unsupported type {tp!r}")  # a programming error in a section


def type_name(tp: Any) -> str:
    inner, optional = unwrap_optional(tp)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        name = (f"comma-separated {args[0].__name__}s" if len(args) == 2 and args[1] is Ellipsis
                else f"{len(args)} comma-separated values")
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the config"
        raise ConfigError(f"unknown key(s) {', '.join(f'{prefix}.{u}' if prefix else u for u in unknown)} in {where}; "
                          f"valid keys: {', '.join(f'{prefix}.{n}' if prefix else n for n in names)}")
    kwargs = {n: coerce(values[n], hints[n], f"{prefix}.{n}" if prefix else n) for n in names if n in values}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except SettingError as exc:  # the pipeline dataclasses validate themselves: name the full key
        raise ConfigError(f"config key {prefix + '.' + exc.field!r}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"config section {prefix or cls.__name__!r}: {exc}") from exc
