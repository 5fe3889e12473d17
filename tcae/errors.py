"""Errors a user can act on, and the type check every settings dataclass runs.

The ``tcae`` command prints a :class:`TCAEError` as one line, ``error: <message>``,
and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class TCAEError(Exception):
    """A problem with the user's settings, files or machine, said in one line."""


class ConfigError(TCAEError, ValueError):
    """A setting of the wrong type or out of its range; the message names the setting and the value."""


class DataError(TCAEError, ValueError):
    """Data that cannot be used: nothing readable, or a file that cannot be parsed (named)."""


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_types(config: Any, skip: tuple[str, ...] = ()) -> None:
    """Check each field of dataclass ``config`` against the type of its default, in place.

    An integer is accepted for a float field (and stored as a float); nothing
    else is converted: ``"0.25"`` for a number or ``"false"`` for a flag, as a
    JSON or TOML file may hold them, raise :class:`ConfigError`, as do NaN and
    ±inf.
    """
    for f in dataclasses.fields(config):
        kind = type(f.default)
        if f.name in skip or kind not in _KINDS:
            continue
        value = getattr(config, f.name)
        if kind is float and type(value) is int:
            value = float(value)
            setattr(config, f.name, value)
        if type(value) is not kind:
            raise ConfigError(f"{f.name} must be {_KINDS[kind]}, got {value!r} ({type(value).__name__})")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be finite, got {value}")


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *,
                hi_open: bool = False, meaning: str = "") -> None:
    """Raise :class:`ConfigError` unless ``lo <= value <= hi`` (``< hi`` with ``hi_open``); either bound optional."""
    if (lo is None or value >= lo) and (hi is None or (value < hi if hi_open else value <= hi)):
        return
    if lo is not None and hi is not None:
        bounds = f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        bounds = f"at least {lo:g}"
    else:
        bounds = f"{'below' if hi_open else 'at most'} {hi:g}"
    raise ConfigError(f"{name} must be {bounds}{f' ({meaning})' if meaning else ''}, got {value!r}")
