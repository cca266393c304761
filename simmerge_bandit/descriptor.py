"""The arm descriptor: how an operator is described to the policies, as a versioned schema of named coordinates.

An operator (a merge method plus parameter values) is described by a vector ``z`` whose coordinates have names:

- ``method:NAME``: 1 for the operator's method (one coordinate per registered method);
- ``family:NAME`` and ``sparsification:NAME``: 1 for the method's family and its sparsification. This declared
  structure is what lets an operator of a method no policy has seen start from what similar methods taught;
- ``flag:consensus``, ``flag:random``, ``flag:uses_base``: sign consensus, random masks, a base model needed;
- ``param:NAME``: each describing parameter's value ``v`` as ``(v - low) / (high - low)`` over its declared span,
  clipped to [0, 1]; booleans are 0 or 1. A method without the parameter reads as ``v = 0`` (as in layout 1), so
  a change of span is one affine map per coordinate (see :func:`mapping`). Every coordinate lies in [0, 1], so no
  finite parameter can overflow a policy. A per-model parameter given one value per model (a group's focused
  weights, :data:`~simmerge_bandit.candidates.FOCUS`) reads as their mean;
- ``spread:weight``: how unequal per-model weights are, ``1 - n_eff / n`` with ``n_eff = (sum w)^2 / sum w^2``
  over ``|w|`` (0 for one weight for all models, ``1 - 1/n`` when one model has all of it);

The coordinates follow from the method registry's metadata (:class:`~.methods.base.MethodSpec`: family, flags;
:class:`~.methods.base.ParamSpec`: ``describe`` and ``span``), in an order that does not depend on the
registry's. A schema's version is a digest of its coordinates (names and spans). It is stored with every logged
decision (``decision_log.arm_schema``, the coordinates of each version in ``arm_schemas``) and every policy
snapshot (``arm_schema`` and ``arm_coordinates`` in its meta), like the feature schema. Adding a method, or a
parameter to a method, changes the version and breaks no home:

- the engine learns from the log with each decision's descriptor recomputed from its operator (operators are
  immutable rows of the catalog), so a rebuild folds decisions logged under any version alike;
- a snapshot of another version is mapped by name (:func:`adapt`: each coordinate both versions have keeps what
  was learned on it, a new one starts from the prior) when its policy can re-express its state (the fitted
  predictor, whose fit is not in the log); any other is rebuilt from the log.

Layout 1, before this module, was a one-hot over the registry's order of 12 methods, the raw values of 11
parameters and two flags, stored without a version; it reads as version ``"1"`` (:func:`legacy_schema`).

>>> schema = current()
>>> z = schema.describe({"method": "ties", "params": {"density": 0.5}})
>>> float(z[schema.index["param:density"]]), float(z[schema.index["method:ties"]])
(0.5, 1.0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InvalidInput, NotFound

log = logging.getLogger(__name__)
#: The coordinate scheme (what kinds of coordinates there are and how a value becomes one). Part of every version.
LAYOUT = 2
#: Layout 1: the descriptor before versions existed (``engine.py`` before this module).
LEGACY_VERSION = "1"
#: The registry's order when layout 1 was frozen, and the parameters it listed, raw, after the method one-hot.
LEGACY_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                  "della", "della_linear", "slerp", "nuslerp", "model_stock")
LEGACY_PARAMS = ("weight", "density", "t", "lambda", "gamma", "epsilon", "normalize", "rescale", "filter_wise",
                 "nuslerp_flatten", "nuslerp_row_wise")
FLAGS = ("consensus", "random", "uses_base")
#: Per-model parameters whose inequality across the models is a coordinate (``spread:NAME``) of its own.
SPREAD = ("weight",)


@dataclass(frozen=True)
class Coordinate:
    """One named coordinate; a value ``v`` is stored as ``(v - low) / (high - low)``, clipped to [0, 1]."""

    name: str
    low: float = 0.0
    high: float = 1.0

    def scale(self, v: float) -> float:
        return min(1.0, max(0.0, (v - self.low) / (self.high - self.low)))


class ArmSchema:
    """An ordered tuple of :class:`Coordinate` and its version (a digest of them unless given)."""

    def __init__(self, coordinates: Sequence[Coordinate], version: str | None = None):
        self.coordinates = tuple(coordinates)
        self.names = tuple(c.name for c in self.coordinates)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"arm schema coordinates repeat: {self.names}")
        self.index = {n: i for i, n in enumerate(self.names)}
        self._param_coords = [(i, c) for i, c in enumerate(self.coordinates) if c.name.startswith("param:")]
        self.version = version or _digest(self.coordinates)

    def __len__(self) -> int:
        return len(self.coordinates)

    def __repr__(self) -> str:
        return f"ArmSchema(version={self.version!r}, {len(self)} coordinates)"

    def describe(self, op: Mapping[str, Any]) -> np.ndarray:
        """``z`` of operator ``op`` (``{"method": ..., "params": {...}}``; missing parameters take the method's
        defaults, unknown ones are ignored). Raises :class:`InvalidInput` for an unknown method or a parameter
        that is not a finite number. Values beyond a span are clipped, so an operator stored before its
        parameter was bounded (``weight=1e200``) is still described, finitely.
        """
        from .methods import get_method

        spec = get_method(op["method"])
        params = op.get("params") or {}
        z = np.zeros(len(self.coordinates))
        index, coords = self.index, self.coordinates

        def put(name: str, value: float) -> None:
            i = index.get(name)
            if i is not None:
                z[i] = coords[i].scale(value)

        put(f"method:{spec.name}", 1.0)
        put(f"family:{spec.family}", 1.0)
        if spec.sparsification:
            put(f"sparsification:{spec.sparsification}", 1.0)
        for flag, on in zip(FLAGS, (spec.consensus is not None, spec.random, spec.needs_base)):
            put(f"flag:{flag}", 1.0 if on else 0.0)
        described = set()
        for p in spec.params:
            if p.describe:
                v = params.get(p.name, p.default)
                if isinstance(v, (list, tuple)) and v and p.scope == "model":  # one value per model
                    values = [_number(spec.name, p, x) for x in v]
                    put(f"param:{p.name}", sum(values) / len(values))
                    if p.name in SPREAD:
                        put(f"spread:{p.name}", _spread(values))
                else:
                    put(f"param:{p.name}", _number(spec.name, p, v))
                described.add(f"param:{p.name}")
        for i, c in self._param_coords:  # a parameter the method lacks reads as the value 0 (see the module doc)
            if c.name not in described:
                z[i] = c.scale(0.0)
        return z

    def coordinates_json(self) -> list[list]:
        return [[c.name, c.low, c.high] for c in self.coordinates]

    @classmethod
    def from_json(cls, coordinates: Sequence[Sequence], version: str | None = None) -> "ArmSchema":
        return cls([Coordinate(str(n), float(lo), float(hi)) for n, lo, hi in coordinates], version)


def _number(method: str, p, v: Any) -> float:
    if p.kind == "bool":
        return 1.0 if p.coerce(v) else 0.0
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(v, bool) or not math.isfinite(x):
        raise InvalidInput(f"operator of {method}: parameter {p.name!r} = {v!r} is not a finite number")
    return x


def _spread(values: Sequence[float]) -> float:
    """``1 - n_eff / n`` of ``|values|``, ``n_eff = (sum)^2 / sum of squares`` (0 when all are equal or all 0)."""
    a = [abs(v) for v in values]
    sq = sum(v * v for v in a)
    return 0.0 if sq == 0 else 1.0 - (sum(a) ** 2 / sq) / len(a)


def _digest(coordinates: Sequence[Coordinate]) -> str:
    text = json.dumps([LAYOUT, [[c.name, c.low, c.high] for c in coordinates]])
    return f"{LAYOUT}-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def schema_of(registry: Mapping[str, Any]) -> ArmSchema:
    """The schema a registry of :class:`~.methods.base.MethodSpec` gives. Raises :class:`InvalidInput` when two
    methods give one parameter name different spans (one coordinate cannot mean two scales)."""
    specs = sorted(registry.values(), key=lambda s: s.name)
    coords = [Coordinate(f"method:{s.name}") for s in specs]
    coords += [Coordinate(f"family:{f}") for f in sorted({s.family for s in specs})]
    coords += [Coordinate(f"sparsification:{k}") for k in sorted({s.sparsification for s in specs
                                                                   if s.sparsification})]
    coords += [Coordinate(f"flag:{f}") for f in FLAGS]
    spans: dict[str, tuple[tuple[float, float], str]] = {}
    for s in specs:
        for p in s.params:
            if not p.describe:
                continue
            span = tuple(float(v) for v in p.describe_range())
            first = spans.setdefault(p.name, (span, s.name))
            if first[0] != span:
                raise InvalidInput(f"parameter {p.name!r} spans {list(span)} in method {s.name!r} but "
                                   f"{list(first[0])} in {first[1]!r}; a shared parameter name must share its span")
    coords += [Coordinate(f"param:{n}", *spans[n][0]) for n in sorted(spans)]
    coords += [Coordinate(f"spread:{n}") for n in SPREAD if n in spans]
    return ArmSchema(coords)


def check_registry(registry: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidInput` unless ``registry`` gives a valid schema (see :func:`schema_of`)."""
    schema_of(registry)


_memo: tuple[tuple, ArmSchema] | None = None


def current() -> ArmSchema:
    """The schema of the method registry as it is now (rebuilt when a method is registered or removed)."""
    global _memo
    from .methods import REGISTRY

    specs = tuple(REGISTRY.values())
    memo = _memo
    if memo is not None and len(memo[0]) == len(specs) and all(map(operator.is_, memo[0], specs)):
        return memo[1]
    schema = schema_of(REGISTRY)
    _memo = (specs, schema)
    return schema


def arm_names() -> tuple[str, ...]:
    """The names of the current schema's coordinates, in vector order."""
    return current().names


def operator_descriptor(op: Mapping[str, Any]) -> np.ndarray:
    """``z`` of an operator in the current schema (see :meth:`ArmSchema.describe`)."""
    return current().describe(op)


def legacy_schema() -> ArmSchema:
    """Layout 1 (version ``"1"``) in today's names: ``method:NAME`` one-hot in :data:`LEGACY_METHODS` order, the raw
    value of each :data:`LEGACY_PARAMS` (a span of (0, 1) is the identity; layout 1 did not clip), then
    ``flag:consensus`` and ``flag:random``. For reading old snapshots; nothing is described in it any more."""
    coords = [Coordinate(f"method:{m}") for m in LEGACY_METHODS]
    coords += [Coordinate(f"param:{p}") for p in LEGACY_PARAMS]
    coords += [Coordinate("flag:consensus"), Coordinate("flag:random")]
    return ArmSchema(coords, LEGACY_VERSION)


# ---- snapshots ----

def snapshot_meta(schema: ArmSchema | None = None) -> dict:
    """What a policy snapshot records of the schema its descriptors were made in."""
    schema = schema or current()
    return {"arm_schema": schema.version, "arm_coordinates": schema.coordinates_json()}


def stored_schema(meta: Mapping[str, Any]) -> ArmSchema | None:
    """The schema a snapshot's descriptors were made in: its recorded coordinates, else layout 1 when its
    descriptor width fits it; None when it cannot be told."""
    coords = meta.get("arm_coordinates")
    if coords is not None:
        return ArmSchema.from_json(coords, meta.get("arm_schema"))
    legacy = legacy_schema()
    return legacy if meta.get("k") in (None, len(legacy)) else None


@dataclass(frozen=True)
class DescriptorMap:
    """How an old schema's descriptors relate to the current one's, coordinate by coordinate.

    For each new coordinate ``j`` with ``source[j] >= 0``: ``z_old[source[j]] = scale[j] * z_new[j] + offset[j]``
    (the same name, perhaps another span; exact where neither clips). ``source[j] = -1``: a coordinate the old
    schema did not have (a new method or parameter), which a mapped policy starts at its prior with no weight.
    """

    source: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    old_width: int

    @property
    def new_width(self) -> int:
        return int(self.source.shape[0])


def mapping(old: ArmSchema, new: ArmSchema) -> DescriptorMap | None:
    """The :class:`DescriptorMap` from ``old`` to ``new``, or None when ``new`` lacks a coordinate of ``old`` (a
    method or parameter was removed: what was learned on it has nowhere to go)."""
    if not set(old.names) <= set(new.names):
        return None
    source = np.full(len(new), -1, dtype=np.intp)
    scale, offset = np.ones(len(new)), np.zeros(len(new))
    for j, c in enumerate(new.coordinates):
        i = old.index.get(c.name)
        if i is None:
            continue
        o = old.coordinates[i]
        # v = c.low + (c.high - c.low) z_new, and z_old = (v - o.low) / (o.high - o.low)
        source[j] = i
        scale[j] = (c.high - c.low) / (o.high - o.low)
        offset[j] = (c.low - o.low) / (o.high - o.low)
    return DescriptorMap(source, scale, offset, len(old))


def adapt(policy, meta: Mapping[str, Any]) -> bool:
    """Make ``policy``, restored from a snapshot with ``meta``, read descriptors of the current schema.

    True when it does: the snapshot is of the current schema, learned nothing about descriptors, or its policy
    re-expressed its state through :func:`mapping` (:meth:`~.policies.base.Policy.remap_descriptor`). False when
    it must be rebuilt from the decision log instead.
    """
    schema = current()
    if meta.get("arm_schema") == schema.version or meta.get("k") is None:
        return True
    old = stored_schema(meta)
    m = None if old is None else mapping(old, schema)
    return m is not None and m.old_width == meta.get("k") and bool(policy.remap_descriptor(m))


# ---- the decision log ----

def logged_schemas(store) -> dict[str, ArmSchema]:
    """Every schema the store's decisions were logged in, by version (``decisions.arm_schema``)."""
    return {v: ArmSchema.from_json(json.loads(c), v)
            for v, c in store.fetchall("SELECT version, coordinates FROM arm_schemas")}


class Descriptors:
    """The current schema's descriptors of a store's operators, for the engine: recomputed from the catalog (so
    a decision logged under any version is learned in today's), the log rows a policy can learn, and the
    ``arm_schemas`` rows a transaction must add.

    Operators are immutable once added (retired, never changed), so a descriptor is remembered per (schema
    version, catalog version).
    """

    def __init__(self, store, catalog):
        self.store, self.catalog = store, catalog
        self._memo: tuple[tuple, dict[str, np.ndarray | None]] | None = None
        self._recorded: set[str] | None = None  # versions in arm_schemas (read once, then kept)
        self._reported: set[int] = set()        # reward seqs already reported as unlearnable
        me = weakref.ref(self)

        def forget() -> None:  # a failed transaction may have held rows this object counted as stored
            d = me()
            if d is not None:
                d._recorded = None

        store.on_rollback(forget)

    def vector(self, name: str, params: Mapping[str, Any] | None = None) -> np.ndarray | None:
        """The descriptor of operator ``name`` now (with ``params``, the values a decision chose for a family's
        parameters), or None when it cannot be described (unknown operator or method, a parameter that is not a
        finite number)."""
        return self.arm(name, params)[1]

    def arm(self, name: str, params: Mapping[str, Any] | None = None) -> tuple[str, np.ndarray | None]:
        """``(arm name, descriptor)`` of a logged step: operator ``name``, and for a family the setting
        ``params`` it chose, or a group's scaled weight (:func:`~simmerge_bandit.families.arm_name`: a value that
        differs from the catalog's makes the arm a setting of its own)."""
        schema, memo = self._current()
        key = (name, None if params is None else json.dumps(params, sort_keys=True))
        hit = memo.get(key)
        return hit if hit is not None else self._describe(schema, memo, key, params)

    def _current(self) -> tuple[ArmSchema, dict]:
        """The current schema and the descriptors remembered for it and the catalog's version."""
        schema = current()
        key = (schema.version, self.catalog.version())
        memo = self._memo
        if memo is None or memo[0] != key:
            memo = self._memo = (key, {})
        return schema, memo[1]

    def _describe(self, schema: ArmSchema, memo: dict, key: tuple, params) -> tuple[str, np.ndarray | None]:
        from .families import arm_name

        name = key[0]
        try:
            op = self.catalog.operator(name)
            if params is not None:  # a family's chosen values, or a group's scaled weight
                catalog_params = op["params"]
                op = dict(op, params=dict(params))
                memo[key] = (arm_name(op, op["params"], catalog_params), schema.describe(op))
            else:
                memo[key] = (arm_name(op, op["params"]), schema.describe(op))
        except (NotFound, InvalidInput) as e:
            log.warning("operator %r cannot be described: %s", name, e)
            memo[key] = (name, None)
        return memo[key]

    def learnable(self, rows: Sequence[tuple]) -> list[tuple]:
        """Log rows ``(seq, context, operator JSON, logged descriptor, reward, propensity[, params JSON])`` as
        policy updates ``(x, arm, z, reward, propensity)``, ``z`` recomputed from the operator and the values the
        decision chose (the logged one may be of another schema). A row no policy can learn from (a context that
        is not finite, a propensity outside (0, 1], an operator that cannot be described, as a home made before
        parameters were bounded may hold) is skipped and reported once, so one bad decision never stops the
        policies."""
        out, bad = [], []
        schema, memo = self._current()  # once per call: the daemon folds rewards 32 at a time
        for seq, x, op, _, reward, propensity, *rest in rows:
            name = json.loads(op)[-1] if isinstance(op, str) else op[-1]
            params = rest[0] if rest else None  # the decision's chosen values (JSON [params of each step])
            if isinstance(params, str):
                params = json.loads(params)
            params = params[-1] if params else None
            key = (name, None if params is None else json.dumps(params, sort_keys=True))
            hit = memo.get(key)
            arm, z = hit if hit is not None else self._describe(schema, memo, key, params)
            x = np.asarray(x, dtype=np.float64)
            propensity, reward = float(propensity), float(reward)
            reason = ("its operator cannot be described" if z is None
                      else f"propensity {propensity!r} is not in (0, 1]" if not 0.0 < propensity <= 1.0
                      else f"reward {reward!r} is not finite" if not math.isfinite(reward)
                      else "its context is not finite" if not np.isfinite(x).all() else None)
            if reason is None:
                out.append((x, arm, z, reward, propensity))
            elif seq not in self._reported:
                self._reported.add(seq)
                bad.append(f"reward #{seq} (operator {arm}): {reason}")
        if bad:
            log.warning("skipped %d logged reward(s) that cannot be learned: %s", len(bad), "; ".join(bad[:5])
                        + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
        return out

    def unrecorded(self, schema: ArmSchema) -> list[list]:
        """``[[version, coordinates JSON]]`` when the store's ``arm_schemas`` lacks ``schema``, else ``[]``; the
        caller inserts it in the transaction that logs decisions made in it."""
        known = self._recorded
        if known is None:
            known = self._recorded = {r[0] for r in self.store.fetchall("SELECT version FROM arm_schemas")}
        if schema.version in known:
            return []
        known.add(schema.version)  # (a transaction that fails after this resets the set)
        return [[schema.version, json.dumps(schema.coordinates_json())]]


# ---- the reference page ----

def methods_markdown() -> str:
    """``docs/methods.md``: every registered method, its parameters with their bounds and descriptor spans, and
    the coordinates of the current arm schema (``python -m simmerge_bandit.descriptor --methods-doc``)."""
    from .methods import REGISTRY

    def num(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else f"{v:g}"

    schema = current()
    out = ["# Merge methods", "",
           "<!-- Generated from the method registry by `python -m simmerge_bandit.descriptor --methods-doc > "
           "docs/methods.md`; tests/test_descriptor.py fails when it is out of date. -->", "",
           "Every registered merge method, the parameters an operator of it takes, and the bounds they are "
           "checked against: a value outside is refused when the operator is added (`simmerge operator add`), "
           "when a mergekit config is read and when a merge runs. Names, defaults and meanings follow mergekit; "
           "mergekit accepts any float for `weight` and `lambda`, here they are bounded to [-10, 10] (beyond "
           "that a merge of fine-tuned checkpoints is numerically meaningless, and a huge value once overflowed "
           "the policies). *Span* is the range the arm descriptor spreads over [0, 1] (see below). How to add a "
           "method: [extending/merge-method.md](extending/merge-method.md).", "",
           "| method | family | models | base | random masks | sparsification | consensus | description |",
           "|---|---|---|---|---|---|---|---|"]
    for s in REGISTRY.values():
        models = (f"{s.min_models}" if s.max_models == s.min_models
                  else f"{s.min_models}+" if s.max_models is None else f"{s.min_models}-{s.max_models}")
        out.append(f"| `{s.name}` | {s.family} | {models} | {s.base_role} | {'yes' if s.random else 'no'} | "
                   f"{s.sparsification or '-'} | {s.consensus or '-'} | {s.description} |")
    for s in REGISTRY.values():
        text = s.description.rstrip(".")
        out += ["", f"## {s.name}", "", text[:1].upper() + text[1:] + ".", ""]
        if not s.params:
            out.append("No parameters.")
            continue
        out += ["| parameter | kind | scope | default | valid values | span | describes | meaning |",
                "|---|---|---|---|---|---|---|---|"]
        for p in s.params:
            span = "-" if not p.describe or p.kind == "bool" else "[{}, {}]".format(*map(num, p.describe_range()))
            out.append(f"| `{p.name}` | {p.kind} | {p.scope} | {num(p.default)} | {p.range_text()} | {span} | "
                       f"{'yes' if p.describe else 'no'} | {p.help} |")
    out += ["", "## The arm descriptor", "",
            f"How the policies see an operator (`simmerge_bandit/descriptor.py`): {len(schema)} named coordinates, "
            f"schema version `{schema.version}` with the methods above. `param:NAME` is the value `v` as "
            "`(v - low) / (high - low)` over its span, clipped to [0, 1] (a method without the parameter reads as "
            "`v = 0`; a per-model parameter given one value per model reads as their mean); `spread:weight` is "
            "how unequal per-model weights are, `1 - n_eff / n` with `n_eff = (sum w)^2 / sum w^2` (0 when every "
            "model has the same weight: a group's focused weights, docs/search.md); every other coordinate is 0 or "
            "1. A decision and a policy snapshot record the version they "
            "were made in; a new method or parameter gives a new version, and older snapshots are mapped by name "
            "or rebuilt from the decision log.", "",
            "| coordinate | low | high |", "|---|---|---|"]
    out += [f"| `{c.name}` | {num(c.low)} | {num(c.high)} |" for c in schema.coordinates]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--methods-doc"]:
        sys.exit("usage: python -m simmerge_bandit.descriptor --methods-doc > docs/methods.md")
    sys.stdout.write(methods_markdown())
