"""Operator families: a merge method with some parameters left to the engine, each inside a range.

``simmerge operator add ties_fam --method ties --range density=0.2:0.9 --range weight=0.1:1`` registers one
operator whose ``density`` and ``weight`` the engine chooses per suggestion. The engine offers a family as
:data:`DRAWS` concrete parameter settings spread over its box (a scrambled Sobol sequence seeded by the
family's name, so the same family always offers the same points), each a candidate like a grid operator, and
the policy ranks them by their descriptors, which hold the concrete values: what is learned about one value
informs its neighbours. A suggestion reports the values it chose, the decision log records them, and the merge
and its mergekit config use them.

>>> rs = check_ranges("ties", {}, {"density": (0.2, 0.9)})           # doctest: +SKIP
>>> [round(p["density"], 3) for p in draws({"name": "f", "method": "ties", "params": {}, "ranges": rs})][:3]
...                                                                       # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import Any, Mapping

from .errors import InvalidInput

#: Parameter settings a family offers per pair (a power of two: Sobol points are balanced in such blocks).
DRAWS = 16


def parse_range(text: str) -> tuple[str, float, float]:
    """``"density=0.2:0.9"`` -> ``("density", 0.2, 0.9)`` (numbers checked by :func:`check_ranges`)."""
    name, eq, rest = str(text).partition("=")
    lo, colon, hi = rest.partition(":")
    if not eq or not colon or not name.strip():
        raise InvalidInput(f"--range takes NAME=MIN:MAX, got {text!r}")
    return name.strip(), _num(name, lo), _num(name, hi)


def _num(name: str, v: Any) -> float:
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
    except (TypeError, ValueError):
        raise InvalidInput(f"range of {name!r}: {v!r} is not a number") from None
    if not math.isfinite(f):
        raise InvalidInput(f"range of {name!r}: {v!r} is not a finite number")
    return f


def check_ranges(method: str, params: Mapping[str, Any], ranges: Mapping[str, Any]) -> dict[str, list[float]]:
    """Validate a family's ranges against its method's parameters; return them as ``{name: [low, high]}``.

    Refused in one line: an unknown or boolean parameter, a parameter given both a value and a range, bounds that
    are not finite numbers, min > max, a bound outside the parameter's domain, and a box whose corners break a
    rule between parameters (e.g. DELLA's density +/- epsilon inside (0, 1)).
    """
    from .methods import get_method

    spec = get_method(method)
    if not isinstance(ranges, Mapping) or not ranges:
        raise InvalidInput("ranges must map parameter names to [min, max]")
    out: dict[str, list[float]] = {}
    for name, bounds in ranges.items():
        p = spec.param(name)  # InvalidInput for a parameter the method does not have
        if p.kind == "bool":
            raise InvalidInput(f"{method}: parameter {name!r} is true or false; it cannot take a range")
        if name in params:
            raise InvalidInput(f"{method}: parameter {name!r} has both a value and a range; give one")
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise InvalidInput(f"range of {name!r} must be [min, max], got {bounds!r}")
        lo, hi = _num(name, bounds[0]), _num(name, bounds[1])
        if lo > hi:
            raise InvalidInput(f"range of {name!r}: min {lo:g} > max {hi:g}")
        out[name] = [float(p.coerce(lo)), float(p.coerce(hi))]  # each bound inside the domain
    names = sorted(out)
    for corner in itertools.product(*(out[n] for n in names)):
        spec.validate({**params, **dict(zip(names, corner))})
    return out


def arm_name(op: Mapping[str, Any], params: Mapping[str, Any], catalog: Mapping[str, Any] | None = None) -> str:
    """What the policies call one setting of a family: ``name[k=v,...]`` over its ranged parameters (its own name
    for a grid operator). Each setting is an arm of its own; its descriptor, which holds the values, is what
    carries what was learned about one setting over to its neighbours.

    ``catalog``: the operator's catalog parameters; a parameter that ``params`` sets to another value (a group's
    scaled ``weight``, :func:`~simmerge_bandit.candidates.group_operator`) is named too, ``ties_d0.5[weight=0.5]``,
    so every distinct setting is a distinct arm."""
    ranges = op.get("ranges") or {}
    keys = sorted(ranges)
    if catalog is not None:
        full = _defaulted(op, catalog, params)
        keys += sorted(k for k, v in params.items() if k not in ranges and _differs(v, full.get(k)))
    if not keys:
        return op["name"]
    return op["name"] + "[" + ",".join(f"{k}={_text(params[k])}" for k in keys) + "]"


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):  # one value per model (a group's focused weights): ``1.02/0.46/0.02``
        return "/".join(_text(x) for x in v)
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v).lower()


def _defaulted(op: Mapping[str, Any], catalog: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """The operator's catalog parameters with the method's defaults filled in (its ranged ones from ``params``)."""
    from .methods import get_method

    ranged = {k: params[k] for k in (op.get("ranges") or {}) if k in params}
    try:
        return get_method(op["method"]).validate({**catalog, **ranged})
    except InvalidInput:
        return dict(catalog)


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a != b
    return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def draws(op: Mapping[str, Any], n: int = DRAWS) -> list[dict[str, Any]]:
    """The concrete parameter settings a family offers: ``n`` points of a scrambled Sobol sequence over its box
    (seeded by its name), integer parameters rounded, each a complete validated parameter dict."""
    from scipy.stats import qmc

    from .methods import get_method

    spec = get_method(op["method"])
    ranges = op["ranges"]
    names = sorted(ranges)
    base = {k: v for k, v in op["params"].items() if k not in ranges}
    pts = qmc.Sobol(len(names), scramble=True, seed=zlib.crc32(op["name"].encode())).random(n)
    out, seen = [], set()
    for row in pts:
        values = {}
        for name, u in zip(names, row):
            lo, hi = ranges[name]
            v = lo + float(u) * (hi - lo)
            values[name] = round(v) if spec.param(name).kind == "int" else round(v, 4)
        try:
            full = spec.validate({**base, **values})
        except InvalidInput:
            continue
        key = tuple(sorted(full.items()))
        if key not in seen:
            seen.add(key)
            out.append(full)
    return out
