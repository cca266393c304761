"""Parameter schemas shared by every merge method.

A method is described by a :class:`MethodSpec`: its name, its family, its parameters (global or per model, with
mergekit's names and defaults) and the kernel that merges one tensor (see :mod:`.job`). Operators are *data*: a
method name plus validated parameter values (see :func:`MethodSpec.validate`).

Names, defaults and edge-case rules follow mergekit 0.1.5 (``mergekit/merge_methods/*.py``, ``sparsify.py``). Where
mergekit has no default (``weight`` of linear / task arithmetic / nuslerp, ``t`` of slerp) we keep one so that an
operator can be written without it, and the exported ``mergekit_config.yml`` always spells the value out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import InvalidInput


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    ``scope`` is ``"global"`` (one value for the merge) or ``"model"`` (mergekit's per-model ``parameters``;
    an operator's value applies to every model of the merge).
    """

    name: str
    kind: str  # "float" | "bool" | "int"
    default: Any
    scope: str = "global"
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    help: str = ""
    #: Whether the parameter describes the operator to the policies (a coordinate ``param:NAME`` of the arm
    #: descriptor, :mod:`simmerge_bandit.descriptor`). False for settings that do not change the result
    #: (``int8_mask``).
    describe: bool = True
    #: ``(low, high)``: the values the descriptor spreads over [0, 1] (beyond them it is 0 or 1). Default: the
    #: valid range, which must then be finite. A typical range narrower than the valid one keeps the usual
    #: values apart (``weight`` may be 10, but 0.5 and 1 are what operators use).
    span: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # A broken declaration is a programming error in a method module: raised when the module is imported.
        if self.kind not in ("float", "bool", "int"):
            raise ValueError(f"parameter {self.name!r}: kind must be float, bool or int, not {self.kind!r}")
        if self.scope not in ("global", "model"):
            raise ValueError(f"parameter {self.name!r}: scope must be 'global' or 'model', not {self.scope!r}")
        if self.kind != "bool" and (self.low is None or self.high is None
                                    or not (math.isfinite(self.low) and math.isfinite(self.high))
                                    or self.low >= self.high):
            # unbounded numbers are how `weight=1e200` once made every propensity NaN (issue 20)
            raise ValueError(f"parameter {self.name!r}: a number needs finite bounds low < high")
        if self.span is not None and not (len(self.span) == 2 and all(math.isfinite(v) for v in self.span)
                                          and self.span[0] < self.span[1]):
            raise ValueError(f"parameter {self.name!r}: span must be two finite numbers, low < high")
        self.coerce(self.default)  # the default must be a valid value

    def describe_range(self) -> tuple[float, float]:
        """``(low, high)`` that the arm descriptor scales this parameter's values from (see ``span``)."""
        if self.kind == "bool":
            return 0.0, 1.0
        return self.span if self.span is not None else (float(self.low), float(self.high))

    def range_text(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.low is None and self.high is None:
            return f"any finite {self.kind}"
        lo = "(" if not self.low_inclusive else "["
        hi = ")" if not self.high_inclusive else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{self.kind} in {lo}{low}, {high}{hi}"

    def coerce(self, value: Any) -> Any:
        """Parse and range-check ``value``; raise :class:`InvalidInput` naming the parameter."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "y", "on"}:
                return True
            if isinstance(value, str) and value.strip().lower() in {"false", "0", "no", "n", "off"}:
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise InvalidInput(f"parameter {self.name!r} must be true or false, got {value!r}")
        try:
            if isinstance(value, bool):
                raise ValueError
            if self.kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                v: float = int(value) if not isinstance(value, str) else int(value.strip())
            else:
                v = float(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"parameter {self.name!r} must be a {self.kind}, got {value!r}") from None
        if not math.isfinite(v):
            raise InvalidInput(f"parameter {self.name!r} must be finite, got {value!r}")
        ok_low = self.low is None or (v >= self.low if self.low_inclusive else v > self.low)
        ok_high = self.high is None or (v <= self.high if self.high_inclusive else v < self.high)
        if not (ok_low and ok_high):
            raise InvalidInput(f"parameter {self.name!r} = {value!r} is out of range: {self.range_text()}")
        return v


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: name, family, parameters and the kernel that merges one tensor.

    ``min_models`` / ``max_models`` count the models an operator combines, as the catalog sees them: the
    fine-tuned models for methods with a separate base (task-arithmetic family, model_stock, nuslerp), both
    endpoints for slerp (whose base model is one of its two inputs) and every input for linear.
    ``base_role`` says what the base is: ``"separate"`` (a reference the task vectors are taken from),
    ``"input"`` (slerp: the t=0 endpoint, one of the inputs), ``"optional"`` (nuslerp: task vectors when given)
    or ``"none"`` (linear).
    """

    name: str
    family: str  # "linear" | "task_arithmetic" | "slerp" | "nuslerp" | "model_stock"
    params: tuple[ParamSpec, ...]
    needs_base: bool
    min_models: int = 2
    max_models: int | None = None
    random: bool = False
    description: str = ""
    #: Sparsification and consensus of the generic task-arithmetic engine (None for other families).
    sparsification: str | None = None
    consensus: str | None = None
    base_role: str = "separate"
    #: ``merge(spec, job)`` streams one tensor through :class:`~.job.TensorJob` (set by each method module).
    merge: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r}: parameter names repeat: {names}")
        if self.base_role not in ("separate", "input", "optional", "none"):
            raise ValueError(f"method {self.name!r}: base_role must be separate, input, optional or none")

    def merges(self, n: int) -> bool:
        """Whether an operator of this method combines ``n`` models at once (counted as ``min_models`` is)."""
        return n >= self.min_models and (self.max_models is None or n <= self.max_models)

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "(none)"
        raise InvalidInput(f"method {self.name!r} has no parameter {name!r}; known: {known}")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Return the full, typed parameter dict (defaults filled in) or raise :class:`InvalidInput`."""
        out = self.defaults()
        for key, value in params.items():
            out[key] = self.param(key).coerce(value)
        check = _CROSS_CHECKS.get(self.sparsification)
        if check:
            check(self.name, out)
        return out


def _check_della(name: str, p: dict) -> None:
    # mergekit's della_magprune raises unless density +/- epsilon lies strictly inside (0, 1); it only looks
    # when density < 1 (density 1 keeps everything). Breadcrumbs has no such rule: when density + gamma > 1
    # mergekit removes fewer outliers so that the density is kept.
    if p["density"] < 1 and (p["density"] + p["epsilon"] >= 1 or p["density"] - p["epsilon"] <= 0):
        raise InvalidInput(
            f"{name}: density +/- epsilon must lie strictly inside (0, 1) (got density={p['density']:g}, "
            f"epsilon={p['epsilon']:g})")


_CROSS_CHECKS = {"della_magprune": _check_della}


def check_model_params(spec: "MethodSpec", p: dict) -> None:
    """Cross-parameter rules of one model's parameter set (raises :class:`InvalidInput`)."""
    check = _CROSS_CHECKS.get(spec.sparsification)
    if check:
        check(spec.name, p)


# Shared parameter definitions (mergekit names and meanings).
#: Bounds of ``weight`` and ``lambda``. mergekit takes any float; beyond +-10 a merge of fine-tuned checkpoints is
#: numerically meaningless (the merged weights leave the models' range by an order of magnitude), and ``1e200``
#: overflowed the policies (issue 20). Negative values stay valid: task negation uses ``weight=-1``.
SCALE_BOUNDS = (-10.0, 10.0)
#: What the descriptor spreads over [0, 1] for them: the values operators use (negation to double strength).
SCALE_SPAN = (-1.0, 2.0)


def weight(default: float = 1.0) -> ParamSpec:
    return ParamSpec("weight", "float", default, scope="model", low=SCALE_BOUNDS[0], high=SCALE_BOUNDS[1],
                     span=SCALE_SPAN,
                     help="weight of each model's contribution (mergekit requires it; default here 1)")


def density(default: float = 1.0) -> ParamSpec:
    return ParamSpec("density", "float", default, scope="model", low=0.0, high=1.0, low_inclusive=False,
                     help="fraction of task-vector entries kept (1 keeps all and skips rescaling)")


def normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "bool", default, help="divide by the sum of weights")


def rescale(default: bool) -> ParamSpec:
    return ParamSpec("rescale", "bool", default,
                     help="scale the kept entries so the task vector keeps its L1 norm (mergekit's RescaleNorm.l1)")


def lambda_() -> ParamSpec:
    return ParamSpec("lambda", "float", 1.0, low=SCALE_BOUNDS[0], high=SCALE_BOUNDS[1], span=SCALE_SPAN,
                     help="scale of the merged task vector")


def int8_mask() -> ParamSpec:
    return ParamSpec("int8_mask", "bool", False, describe=False,
                     help="store masks as int8 (memory only; same result)")


def task_arithmetic_params(*, normalize_default: bool, rescale_default: bool, sparsify: str | None) -> tuple:
    # mergekit declares density for every generalized task-arithmetic method, even without sparsification
    # (where it is ignored), so a task_arithmetic config that carries density stays valid.
    params = [weight(), density()]
    if sparsify == "magnitude_outliers":
        params.append(ParamSpec("gamma", "float", 0.01, scope="model", low=0.0, high=1.0, high_inclusive=False,
                                help="fraction of largest-magnitude entries removed as outliers"))
    if sparsify == "della_magprune":
        params.append(ParamSpec("epsilon", "float", 0.15, scope="model", low=0.0, high=1.0, high_inclusive=False,
                                help="spread of drop probabilities around 1 - density"))
    params += [normalize(normalize_default), rescale(rescale_default), lambda_(), int8_mask()]
    return tuple(params)
