"""mergekit YAML in and out.

In: a mergekit config (``mergekit-yaml`` format: ``merge_method``, ``base_model``, ``models`` with per-model
``parameters``, global ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source: base``), or several YAML
documents with ``name`` fields (``mergekit-multi``: a later document uses an earlier one's name as a model), which
becomes a chain evaluated per tensor in memory. Parameter values may be plain values, gradients (a list of
numbers interpolated over the layer index) or filtered values (``[{filter: self_attn, value: 0.3}, {value:
0.5}]``), resolved per tensor exactly as mergekit does. Features we do not run (``slices``, ``modules``,
``tokenizer``, ``chat_template``, LoRA references, a tokenizer from another model) are refused by name.

``dtype`` is what mergekit computes in (its inputs are converted to it when loaded, and every operation of the
method rounds to it), ``out_dtype`` what it writes; without ``dtype`` mergekit computes in the promoted dtype of each
tensor's inputs, without ``out_dtype`` it writes what it computed in. A :class:`Step` keeps both, per document.

Out: :func:`to_yaml` writes the config that reproduces a merge with ``mergekit-yaml`` (``dtype`` the compute dtype we
used, ``out_dtype`` the written dtype; chains as ``mergekit-multi`` documents).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InvalidInput, Unsupported
from .methods import get_method
from .methods.base import MethodSpec, ParamSpec

#: Marks a chain step's input as the previous step's result (``merge_chain``).
PREVIOUS = "@previous"

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "name", "slices", "modules", "tokenizer", "chat_template"}
_UNSUPPORTED = {
    "slices": "layer slices (frankenmerges) are not supported; merge whole models with `models`",
    "modules": "`modules` (per-module configs of multimodal models) is not supported",
    "tokenizer": "`tokenizer` (vocabulary surgery / added tokens) is not supported; the tokenizer files of the "
                 "base model (or the first model) are copied as they are",
    "chat_template": "`chat_template` is not supported; the base model's tokenizer files are copied as they are",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass
class Step:
    """One merge of a plan: a method over ``models`` (paths, or the index of an earlier step's result) with an
    optional ``base``; ``params`` are mergekit settings (scalars, gradients or filtered values) for the whole
    merge, ``model_params`` per model. ``name`` is the step's mergekit-multi name.

    ``dtype`` is the compute dtype (mergekit's ``dtype``; None: the promoted dtype of each tensor's inputs) and
    ``out_dtype`` the dtype of the step's result (None: its compute dtype), both canonical names
    (``float32``, ``float16``, ``bfloat16``)."""

    method: str
    models: list[Any]
    base: Any = None
    params: dict = field(default_factory=dict)
    model_params: list[dict | None] = field(default_factory=list)
    name: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None

    def __post_init__(self):
        if not self.model_params:
            self.model_params = [None] * len(self.models)

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)


@dataclass
class Plan:
    """Steps (the last one is the output) and the written dtype.

    ``out_dtype`` overrides the last step's ``out_dtype``. When neither is set, a plan read from a mergekit config
    writes what its ``dtype`` says (mergekit's rule); any other plan writes the reference model's dtype (the
    base's, else the first model's), so that merging bf16 checkpoints in float32 still gives a bf16 checkpoint.
    """

    steps: list[Step]
    out_dtype: str | None = None
    from_config: bool = False
    #: Computes every step in this dtype instead of its own (an option such as ``--compute-dtype``); each
    #: step's result keeps the dtype the step alone would have given it.
    compute_dtype: str | None = None

    def set_compute_dtype(self, name: str | None) -> None:
        """Override the compute dtype of every step (None: keep each step's)."""
        self.compute_dtype = None if name is None else canonical_dtype(name, "compute dtype")


def canonical_dtype(name: Any, what: str = "dtype") -> str:
    """``float32`` / ``float16`` / ``bfloat16`` for any spelling mergekit accepts; raise :class:`InvalidInput`."""
    if name not in DTYPES:
        raise InvalidInput(f"unknown {what} {name!r} (use float32, float16 or bfloat16)")
    return DTYPES[name]


# ---- reading -----------------------------------------------------------------------------------------------

def load(source: str | Path | dict | list, *, root: Path | None = None) -> Plan:
    """Parse a mergekit config (a path, YAML text, a dict, or a list of dicts) into a :class:`Plan`.

    Relative model paths resolve against the config file's folder (or ``root``).
    """
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and
                                    not source.lstrip().startswith("merge_method")):
        p = Path(source).expanduser()
        if not p.is_file():
            raise InvalidInput(f"{p}: no such config file")
        root = root or p.resolve().parent
        text = p.read_text(encoding="utf-8")
    elif isinstance(source, str):
        text = source
    else:
        text = None
    if text is not None:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            raise InvalidInput(f"mergekit config is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        docs = source if isinstance(source, list) else [source]
    if not docs:
        raise InvalidInput("mergekit config is empty")
    root = root or Path.cwd()
    names: dict[str, int] = {}
    steps: list[Step] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise InvalidInput(f"mergekit config document {i + 1} is not a mapping")
        step = _parse_doc(doc, names, root)
        if step.name is not None:
            if step.name in names:
                raise InvalidInput(f"mergekit config: two documents are named {step.name!r}")
            names[step.name] = len(steps)
        steps.append(step)
    return Plan(steps=steps, from_config=True)


def _parse_doc(doc: dict, names: dict[str, int], root: Path) -> Step:
    for key in doc:
        if key in _UNSUPPORTED:
            raise Unsupported(f"mergekit config: {_UNSUPPORTED[key]}")
        if key not in _TOP_KEYS:
            raise Unsupported(f"mergekit config: unknown or unsupported key {key!r}")
    method = doc.get("merge_method")
    if not isinstance(method, str):
        raise InvalidInput("mergekit config: merge_method is missing")
    spec = get_method(method)
    tok = doc.get("tokenizer_source")
    if tok not in (None, "base"):
        raise Unsupported(f"mergekit config: tokenizer_source {tok!r} is not supported (only 'base': the base "
                          f"model's tokenizer files are copied)")
    if not isinstance(doc.get("models"), list) or not doc["models"]:
        raise InvalidInput("mergekit config: `models` must be a non-empty list")

    def ref(value: Any, what: str) -> Any:
        if isinstance(value, dict) and "model" in value:
            value = value["model"]
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"mergekit config: {what} must be a model path, got {value!r}")
        if value in names:
            return names[value]
        if "+" in value and not Path(value).expanduser().exists():
            raise Unsupported(f"mergekit config: LoRA references ({value!r}) are not supported")
        p = Path(value).expanduser()
        return str((p if p.is_absolute() else root / p).resolve())

    base = ref(doc["base_model"], "base_model") if doc.get("base_model") is not None else None
    models, per_model = [], []
    for j, entry in enumerate(doc["models"]):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise InvalidInput(f"mergekit config: models[{j}] needs a `model`")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise Unsupported(f"mergekit config: models[{j}] has unsupported key(s) {', '.join(sorted(extra))}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"mergekit config: models[{j}].parameters must be a mapping")
        models.append(ref(entry["model"], f"models[{j}].model"))
        per_model.append(params)
    glob = doc.get("parameters") or {}
    if not isinstance(glob, dict):
        raise InvalidInput("mergekit config: `parameters` must be a mapping")
    # mergekit's input list: the models, plus the base appended when it is not among them; for methods with a
    # separate base the base entry is then dropped from the inputs (it is the base, not a model).
    if spec.base_role == "separate" and base is not None:
        keep = [k for k, m in enumerate(models) if m != base]
        models, per_model = [models[k] for k in keep], [per_model[k] for k in keep]
    elif spec.base_role == "optional" and base is not None:
        keep = [k for k, m in enumerate(models) if m != base]
        models, per_model = [models[k] for k in keep], [per_model[k] for k in keep]
    elif spec.base_role == "input":
        if base is None:
            raise InvalidInput(f"mergekit config: {method} needs base_model (its t=0 endpoint)")
        if base not in models:
            models.append(base)
            per_model.append({})
        k = models.index(base)
        models.pop(k)
        per_model.pop(k)
    elif spec.base_role == "none" and base is not None:
        if base not in models:
            models.append(base)
            per_model.append({})
        base = None
    dtypes = {k: canonical_dtype(doc[k], f"mergekit config: {k}") if doc.get(k) is not None else None
              for k in ("dtype", "out_dtype")}
    step = Step(method=method, models=models, base=base, params=dict(glob), model_params=per_model,
                name=doc.get("name"), dtype=dtypes["dtype"], out_dtype=dtypes["out_dtype"])
    for key, setting in list(glob.items()) + [(k, v) for pm in per_model for k, v in pm.items()]:
        p = spec.param(key)
        check_setting(p, setting)
    for pm in per_model:
        for key in pm:
            if spec.param(key).scope != "model":
                raise InvalidInput(f"mergekit config: {method} parameter {key!r} is global; put it under the "
                                   f"top-level `parameters` (mergekit ignores it per model)")
    return step


def check_setting(p: ParamSpec, setting: Any) -> None:
    """Validate the shape of a mergekit parameter setting (values are range-checked when resolved)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        for item in setting:
            if isinstance(item, dict):
                extra = set(item) - {"filter", "value"}
                if "value" not in item or extra:
                    raise InvalidInput(f"parameter {p.name!r}: a filtered value is {{filter: ..., value: ...}}")
                if item.get("filter") is not None and not isinstance(item["filter"], str):
                    raise InvalidInput(f"parameter {p.name!r}: filter must be a string")
                check_setting(p, item["value"])
            elif isinstance(item, list):
                raise InvalidInput(f"parameter {p.name!r}: nested lists are not a mergekit setting")
            else:
                p.coerce(item)
        return
    p.coerce(setting)


# ---- resolving per tensor ------------------------------------------------------------------------------------

def layer_t(tensor_name: str, num_layers: int | None) -> float | None:
    """mergekit's gradient position of a tensor: layer i of L gives i / (L - 1) (1 when L == 1); tensors
    outside the layer stack give 0. None when the tensor is in a layer but the layer count is unknown."""
    m = _LAYER.search(tensor_name)
    if not m:
        return 0.0
    if not num_layers:
        return None
    idx = int(m.group(1))
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(p: ParamSpec, setting: Any, tensor_name: str, t: float | None) -> Any:
    """Value of one setting for one tensor (None when no filter matches), as mergekit's evaluate_setting."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return p.coerce(setting)
    if not setting:
        return None
    if all(not isinstance(e, (dict, list)) for e in setting):
        values = [p.coerce(e) for e in setting]
        if len(values) == 1:
            return values[0]
        if t is None:
            raise Unsupported(f"parameter {p.name!r}: gradients need the layer count (num_hidden_layers) of the "
                              f"model for tensor {tensor_name!r}")
        if p.kind == "bool":
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        v = (1 - frac) * values[i0] + frac * values[i1]
        return p.coerce(int(round(v)) if p.kind == "int" else v)
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(p, cond["value"], tensor_name, t)
    return None


def resolve(step: Step, tensor_name: str, t: float | None) -> tuple[dict, list[dict]]:
    """Concrete parameters of ``step`` for one tensor: (global params, per-model params), mergekit precedence:
    a model's own setting, then the global one, then the default."""
    spec = step.spec
    glob: dict[str, Any] = {}
    models: list[dict] = [{} for _ in step.models]
    for p in spec.params:
        value = None
        if p.name in step.params:
            value = evaluate(p, step.params[p.name], tensor_name, t)
        if p.scope == "global":
            if value is not None:
                glob[p.name] = value
            continue
        for i, pm in enumerate(step.model_params):
            v = None
            if pm and p.name in pm:
                v = evaluate(p, pm[p.name], tensor_name, t)
            if v is None:
                v = value
            if v is not None:
                models[i][p.name] = v
    return glob, models


# ---- writing -----------------------------------------------------------------------------------------------

def step_doc(step: Step, paths: list[str], base_path: str | None, *, dtype: str | None, out_dtype: str | None,
             name: str | None) -> dict:
    """The mergekit document of one step (``paths``: the models' paths or earlier steps' names); ``dtype`` /
    ``out_dtype`` None leave the key out (mergekit then applies the same default rule as we did)."""
    spec = step.spec
    doc: dict[str, Any] = {}
    if name is not None:
        doc["name"] = name
    doc["merge_method"] = step.method
    entries = []
    if spec.base_role == "input":
        entries.append({"model": base_path})
    for path, pm in zip(paths, step.model_params):
        entry: dict[str, Any] = {"model": path}
        params = {}
        for p in spec.params:
            if p.scope != "model":
                continue
            if pm and p.name in pm:
                params[p.name] = _plain(pm[p.name])
            elif p.name in step.params:
                params[p.name] = _plain(step.params[p.name])
            else:
                params[p.name] = p.default
        if params:
            entry["parameters"] = params
        entries.append(entry)
    if base_path is not None:
        doc["base_model"] = base_path
    doc["models"] = entries
    shared = {p.name: _plain(step.params.get(p.name, p.default)) for p in spec.params if p.scope == "global"}
    if shared:
        doc["parameters"] = shared
    if dtype is not None:
        doc["dtype"] = dtype
    if out_dtype is not None:
        doc["out_dtype"] = out_dtype
    return doc


def _plain(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer() and not math.isinf(v):
        return float(v)
    return v


def to_yaml(docs: list[dict], header: str = "") -> str:
    """Serialize mergekit documents (several become a ``mergekit-multi`` file)."""
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=None) for d in docs)
    return (header + body) if header else body
