"""Dataclasses from JSON-like mappings: types from the annotations, ranges from a table.

The one validator of every record read from a file or the command line (training
recipes, export profiles, ``run.json``), so none of them restates its field types.

- :func:`from_mapping` builds a dataclass from a mapping: unknown keys, missing keys
  and values of the wrong type are a one-line :class:`RSDError` naming ``where`` and the
  key. ``rules`` are tests run on the raw value before its type is checked (their words
  say the whole expectation, e.g. "a positive integer").
- :func:`check_values` checks a built instance: every float finite, every integer
  within int64, and each field in ``ranges`` within its range.
- :func:`to_json` / :func:`fields_json` are the inverse of :func:`from_mapping`.

A field whose type has a ``from_json`` classmethod (a record with its own format) is
built by it; any other dataclass field is built by :func:`from_mapping` recursively.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, TypeVar

from .errors import RSDError

T = TypeVar("T")
#: A test of a value and the words for what it must be.
Rule = tuple[Callable[[Any], bool], str]

AT_LEAST_1: Rule = (lambda v: v >= 1, "at least 1")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
POSITIVE: Rule = (lambda v: v > 0, "positive")
FRACTION: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
INT_MAX = 2**63 - 1  #: every integer must fit in int64 (sizes, seeds and counts end up in torch)


class _Mismatch(Exception):
    """A value that is not of its field's type (turned into an RSDError with the field's name)."""


def from_mapping(cls: type[T], values: Any, where: str, *, base: T | None = None,
                 rules: Mapping[str, Rule] | None = None,
                 parsers: Mapping[str, Callable[[Any], Any]] | None = None,
                 ignore: tuple[str, ...] = ()) -> T:
    """An instance of dataclass ``cls`` from ``values`` (over ``base``, else the defaults).

    Keys may spell ``_`` as ``-``; keys in ``ignore`` are skipped (free text for humans).
    ``parsers`` convert a field's raw value themselves (raising RSDError).
    """
    if not isinstance(values, Mapping):
        raise RSDError(f"{where} must be an object (got {values!r})")
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key in ignore:
            continue
        name = str(key).replace("-", "_")
        if name not in hints:
            raise RSDError(f"{where}: unknown key {key!r} (known: {', '.join(hints)})")
        if parsers and name in parsers:
            kwargs[name] = parsers[name](value)
            continue
        rule = (rules or {}).get(name)
        if rule is not None and value is not None and not rule[0](value):
            raise RSDError(f"{where}: {name} must be {rule[1]} (got {value!r})")
        try:
            kwargs[name] = _convert(value, hints[name], f"{where}: {name}")
        except _Mismatch:
            words = rule[1] if rule is not None else _words(hints[name])
            raise RSDError(f"{where}: wrong type: {name} must be {words} (got {value!r})") from None
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RSDError(f"{where} lacks {', '.join(missing)}")
    return cls(**kwargs)


def check_values(obj: Any, ranges: Mapping[str, Rule], label: Callable[[str], str] = str) -> None:
    """Every float of ``obj`` finite, every integer within int64, every field in ``ranges`` in range.

    NaN fails every comparison, so a range test alone (``x <= 0``) would let it through:
    non-finite values are refused first. ``label`` names a field in messages (e.g. its flag).
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise RSDError(f"{label(f.name)} must be a finite number (got {v})")
            if isinstance(v, int) and not isinstance(v, bool) and not -INT_MAX <= v <= INT_MAX:
                raise RSDError(f"{label(f.name)} must fit in 64 bits, |value| < 2**63 (got {v})")
        test, words = ranges.get(f.name, (None, ""))
        if test is not None and value is not None and not test(value):
            raise RSDError(f"{label(f.name)} must be {words} (got {value})")


def to_json(obj: Any) -> Any:
    """``obj`` as JSON values: types with their own ``to_json`` by it, dataclasses as objects."""
    if hasattr(obj, "to_json") and not isinstance(obj, type):
        return obj.to_json()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return fields_json(obj)
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj


def fields_json(obj: Any, *, drop_none: bool = False) -> dict[str, Any]:
    """The fields of dataclass ``obj`` as a JSON object (those that are None left out with ``drop_none``)."""
    items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return {k: to_json(v) for k, v in items if not (drop_none and v is None)}


# Types -------------------------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of ``cls``'s init fields, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp``; raises :class:`_Mismatch` when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except _Mismatch:
                pass
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if tp is bool:
        return _expect(value, isinstance(value, bool))
    if tp is int:
        return _expect(value, isinstance(value, int) and not isinstance(value, bool))
    if tp is float:
        return float(_expect(value, isinstance(value, (int, float)) and not isinstance(value, bool)))
    if tp is str:
        return _expect(value, isinstance(value, str))
    if origin is list or tp is list:
        _expect(value, isinstance(value, (list, tuple)))
        return [_convert(v, args[0], where) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        _expect(value, isinstance(value, Mapping))
        return {k: _convert(v, args[1], where) for k, v in value.items()} if args else dict(value)
    if hasattr(tp, "from_json"):  # a record with its own format and messages
        try:
            return tp.from_json(value)
        except RSDError as e:
            raise RSDError(f"{where}: {e}") from None
    if dataclasses.is_dataclass(tp):
        _expect(value, isinstance(value, Mapping))
        return from_mapping(tp, value, where)
    raise TypeError(f"from_mapping cannot read fields of type {tp!r}")  # pragma: no cover - a bug


def _expect(value: Any, ok: bool) -> Any:
    if not ok:
        raise _Mismatch
    return value


def _words(tp: Any) -> str:
    """What a value of type ``tp`` must be, in words."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        words = [_words(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if typing.get_origin(tp) is list:
        return f"a list of {_words(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, "an object")
