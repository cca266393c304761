"""JSON bodies checked against a Python signature: the daemon's routes take their fields from the annotations of the
local implementation they call (:mod:`.backend`), so a field is declared once."""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Annotated, Any, Callable, Union

from .errors import InvalidInput


def parse_body(fn: Callable, body: dict) -> dict:
    """The arguments of ``fn`` from a JSON object: each parameter's field, checked against its annotation (a
    missing required field or a value of the wrong JSON type is :class:`InvalidInput`); other fields are
    ignored, and so are keyword-only parameters."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out = {}
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.kind is p.KEYWORD_ONLY:  # not a field: what only a caller in this process passes
            continue
        if p.name not in body or body[p.name] is None:
            if p.default is inspect.Parameter.empty:
                raise InvalidInput(f"missing or invalid field {p.name!r}")
            continue
        value = body[p.name]
        if not _fits(value, hints.get(p.name, Any)):
            raise InvalidInput(f"missing or invalid field {p.name!r}")
        out[p.name] = value
    return out


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Annotated:
        return _fits(value, typing.get_args(hint)[0])
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    return False


def query_body(query: str) -> dict:
    """A GET route's parameters: each value of the query is JSON text (``all=true``, ``name="x"``); a value that
    is not JSON is taken as text."""
    from urllib.parse import parse_qsl

    out = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
