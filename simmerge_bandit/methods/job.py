"""One tensor of a merge, streamed in row chunks: the machinery every method kernel runs on.

A tensor is seen as ``[n_rows, row_len]`` (``row_len`` = its last dimension; a 1-D tensor is one row). Kernels
walk it in chunks of whole rows, each input chunk converted to the job's compute dtype on the compute device, so
the working set is a few chunks (:data:`CHUNK_ELEMENTS` elements each) whatever the tensor size. Methods that need
a statistic of the whole tensor (a magnitude threshold, an L1 norm, the angle between two models) make a first pass
that only accumulates it, then a second pass that writes the output; inputs are memory-mapped, so the second pass
costs a conversion, not a read.

The compute dtype is mergekit's ``dtype``: inputs are rounded to it when read, and kernels run mergekit's
operations in it (each rounds to it), so a bf16 or fp16 config gives mergekit's tensors bit for bit. Whole-tensor
sums are the one place a streamed kernel cannot run mergekit's own call: they are accumulated in float64 and
rounded once to the compute dtype (:func:`total`), which is what a single-threaded torch sum gives; with more
threads, torch rounds per-thread partial sums of half-precision tensors to half precision, so mergekit's own
result then depends on its thread count.

Random masks come from a generator seeded by (seed, step, tensor name, model index, chunk index). The same seed
gives the same tensors whatever order tensors are processed in, and :func:`merge_tensors` reproduces what the
executor writes. Masks are drawn on the compute device, so CPU and CUDA runs of a random method differ (as they
do in mergekit).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Mapping, Sequence

from ..lazy import torch

from ..errors import InvalidInput
from .base import MethodSpec, check_model_params

#: Elements per chunk on the CPU. 1 M elements keeps temporaries in the allocator's free lists and the cache.
CHUNK_ELEMENTS = 1 << 20
#: On a GPU, chunks are larger: kernel launches, not the cache, are what costs there.
CUDA_CHUNK_ELEMENTS = 1 << 24
#: Compute dtypes a merge may run in (mergekit's ``dtype``), by torch's name (torch is imported on first use).
COMPUTE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def total(x: torch.Tensor) -> float:
    """Sum of all elements, accumulated in float64 (exact enough that rounding it to any compute dtype gives the
    correctly rounded sum nearly always)."""
    return float(x.sum(dtype=torch.float64))


def scalar(value: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A 0-dim tensor of ``value`` rounded to ``dtype``: the form in which mergekit holds a reduced statistic."""
    return torch.tensor(value, dtype=torch.float64).to(device=device, dtype=dtype)


def finite(x: torch.Tensor) -> bool:
    """Whether every value is finite: its smallest and largest values are (one reduction pass, no temporary;
    NaN propagates to both). Measured 2-3x faster on the CPU than testing the exponent bits with numpy, and
    ``isfinite().all()`` is 20x slower there."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class Source:
    """One input tensor: its data (any float dtype, CPU or device, possibly a memory-mapped view) read as row
    chunks in the compute dtype on the compute device. ``label`` names the model in error messages."""

    def __init__(self, data: torch.Tensor, label: str, device: torch.device, dtype: torch.dtype | None = None):
        dtype = torch.float32 if dtype is None else dtype
        self.data = data.reshape(-1)
        self.label = label
        self.device = device
        self.dtype = dtype
        self._checked_to = 0

    def rows(self, lo: int, hi: int, row_len: int, tensor_name: str) -> torch.Tensor:
        """Rows ``[lo, hi)`` as a ``[hi - lo, row_len]`` tensor of the compute dtype on the device; NaN/Inf are
        refused. When the data already has that dtype and device this is a view: kernels never write into it."""
        return self.flat(lo * row_len, hi * row_len, tensor_name).view(hi - lo, row_len)

    def flat(self, lo: int, hi: int, tensor_name: str) -> torch.Tensor:
        """Elements ``[lo, hi)`` of the flattened tensor, as :meth:`rows`."""
        raw = self.data[lo:hi]
        x = raw.to(device=self.device, dtype=self.dtype, non_blocking=True)
        if hi > self._checked_to:
            # Checked in the narrower of the two dtypes (fewer bytes to scan): widening keeps finiteness either
            # way, and a value that overflows a narrower compute dtype is an infinity once converted.
            if not finite(x if x.element_size() <= raw.element_size() else raw):
                raise InvalidInput(f"tensor {tensor_name!r} of {self.label} contains NaN or Inf values")
            self._checked_to = hi
        return x

    def gather(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Values at flat positions in the compute dtype (used to sample a tensor before a pass)."""
        idx = flat_index.to(self.data.device)
        return self.data.index_select(0, idx).to(device=self.device, dtype=self.dtype)


class TensorSink:
    """Collects a kernel's output chunks into one tensor of ``dtype`` on the device."""

    def __init__(self, n_rows: int, row_len: int, device: torch.device, dtype: torch.dtype | None = None):
        dtype = torch.float32 if dtype is None else dtype
        self.out = torch.empty((n_rows, row_len), dtype=dtype, device=device)

    def write(self, lo: int, hi: int, rows: torch.Tensor) -> None:
        self.out[lo:hi].copy_(rows)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    h = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class TensorJob:
    """Everything a kernel needs to merge one tensor: inputs, resolved parameters, chunking, randomness, sink.

    ``models`` are the method's non-base inputs in order (for slerp: the non-base endpoint), ``base`` the base
    input or None; ``params`` the global parameters, ``model_params`` one dict per model (validated, defaults
    filled). ``dtype`` is the compute dtype (the sources are read in it). ``exact_ties`` selects magnitudes the
    way mergekit does (a full ``torch.argsort`` per tensor: same tensors even among exactly equal magnitudes, at
    mergekit's speed).
    """

    def __init__(self, name: str, shape: Sequence[int], models: list[Source], base: Source | None,
                 params: dict, model_params: list[dict], sink: Any, *, device: torch.device, seed: int = 0,
                 step: int = 0, exact_ties: bool = False, chunk_elements: int | None = None,
                 dtype: torch.dtype | None = None):
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or str(dtype).removeprefix("torch.") not in COMPUTE_DTYPES:
            raise InvalidInput(f"compute dtype {dtype} is not supported; use float32, float16 or bfloat16")
        self.dtype = dtype
        for src in [*models, *([base] if base is not None else [])]:
            src.dtype = dtype
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.models = models
        self.base = base
        self.params = params
        self.model_params = model_params
        self.sink = sink
        self.device = device
        self.seed = seed
        self.step = step
        self.exact_ties = exact_ties
        self.numel = math.prod(self.shape)
        self.row_len = self.shape[-1] if len(self.shape) >= 1 and self.shape[-1] > 0 else 1
        self.n_rows = self.numel // self.row_len if self.numel else 0
        if chunk_elements is None:
            chunk_elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
        self.chunk_elements = chunk_elements

    def chunks(self, whole: bool = False) -> list[tuple[int, int]]:
        """Row ranges covering the tensor; ``whole`` gives one chunk (kernels that need every row at once)."""
        if self.n_rows == 0:
            return []
        if whole:
            return [(0, self.n_rows)]
        step = max(1, self.chunk_elements // self.row_len)
        return [(lo, min(lo + step, self.n_rows)) for lo in range(0, self.n_rows, step)]

    def model_rows(self, i: int, lo: int, hi: int) -> torch.Tensor:
        return self.models[i].rows(lo, hi, self.row_len, self.name)

    def base_rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.base.rows(lo, hi, self.row_len, self.name)

    def model_flat(self, i: int, lo: int, hi: int) -> torch.Tensor:
        return self.models[i].flat(lo, hi, self.name)

    def base_flat(self, lo: int, hi: int) -> torch.Tensor:
        return self.base.flat(lo, hi, self.name)

    def generator(self, model: int, chunk: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, self.step, self.name, model, chunk))
        return g

    def write(self, lo: int, hi: int, rows: torch.Tensor) -> None:
        """Hand rows ``[lo, hi)`` of the result to the sink. The sink may keep ``rows`` itself until it is written
        out, so a kernel passes a tensor it will not modify afterwards."""
        self.sink.write(lo, hi, rows)


# ---- parameters ------------------------------------------------------------------------------------------------

def bind_params(spec: MethodSpec, params: Mapping[str, Any] | None, n_models: int,
                per_model: Sequence[Mapping[str, Any] | None] | None = None) -> tuple[dict, list[dict]]:
    """Split parameters into the global set and one set per model, coerced, range-checked, defaults filled.

    A model-scoped parameter in ``params`` applies to every model (a list or tuple of ``n_models`` values gives
    one per model); ``per_model[i]`` overrides it for model ``i`` (mergekit's per-model ``parameters``).
    """
    params = dict(params or {})
    per_model = list(per_model) if per_model is not None else [None] * n_models
    if len(per_model) != n_models:
        raise InvalidInput(f"{spec.name}: {len(per_model)} per-model parameter sets for {n_models} models")
    glob: dict[str, Any] = {}
    models: list[dict] = [{} for _ in range(n_models)]
    known = {p.name for p in spec.params}
    for key in params:
        if key not in known:
            spec.param(key)  # raises, listing the known parameters
    for i, pm in enumerate(per_model):
        for key in pm or {}:
            p = spec.param(key)
            if p.scope != "model":
                raise InvalidInput(f"{spec.name}: parameter {key!r} is global; give it once for the merge, not "
                                   f"per model (mergekit ignores it there)")
    for p in spec.params:
        value = params.get(p.name, p.default)
        if p.scope == "global":
            if isinstance(value, (list, tuple)):
                raise InvalidInput(f"{spec.name}: parameter {p.name!r} takes one value, got a list")
            glob[p.name] = p.coerce(value)
            continue
        if isinstance(value, (list, tuple)):
            if len(value) != n_models:
                raise InvalidInput(f"{spec.name}: parameter {p.name!r} has {len(value)} values for "
                                   f"{n_models} models")
            values = list(value)
        else:
            values = [value] * n_models
        for i in range(n_models):
            v = (per_model[i] or {}).get(p.name, values[i])
            models[i][p.name] = p.coerce(v)
    for mp in models:
        check_model_params(spec, mp)
    return glob, models


# ---- roles -----------------------------------------------------------------------------------------------------

def pair_roles(method: str | MethodSpec, models: Sequence[Any], shared_base: Any = None) -> tuple[list, Any]:
    """The catalog's convention for merging an ordered pair (or chain step) ``models`` = [a, b, ...].

    Returns ``(inputs, base)`` for :func:`merge_tensors` or the executor: the task-arithmetic family and
    model_stock take the shared base as base model; slerp takes ``a`` as its base model (t=0 gives ``a``);
    linear takes ``[a, b]``; nuslerp takes ``[a, b]`` and the shared base when there is one (it then
    interpolates task vectors, as mergekit does with a ``base_model``).
    """
    from . import get_method

    spec = method if isinstance(method, MethodSpec) else get_method(method)
    models = list(models)
    if spec.base_role == "input":
        return models[1:], models[0]
    if spec.base_role == "none":
        return models, None
    if spec.base_role == "optional":
        return models, shared_base
    if shared_base is None:
        raise InvalidInput(f"{spec.name} needs a base model (the models' shared base)")
    return models, shared_base


def check_arity(spec: MethodSpec, n_models: int, has_base: bool) -> None:
    """Refuse a merge whose number of inputs the method does not take (``n_models`` excludes the base)."""
    count = n_models + (1 if spec.base_role == "input" and has_base else 0)
    if spec.needs_base and not has_base:
        raise InvalidInput(f"{spec.name} needs a base model")
    if spec.base_role == "none" and has_base:
        raise InvalidInput(f"{spec.name} takes no base model (give every model as an input)")
    if not spec.merges(count):
        want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                else f"at least {spec.min_models}" if spec.max_models is None
                else f"{spec.min_models} to {spec.max_models}")
        what = "models including the base" if spec.base_role == "input" else "models besides the base" \
            if spec.base_role in ("separate",) else "models"
        raise InvalidInput(f"{spec.name} takes {want} {what}, got {count}")


# ---- in-memory entry point ---------------------------------------------------------------------------------------

def merge_tensors(method: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None,
                  params: Mapping[str, Any] | None = None, *, seed: int = 0, tensor_name: str | None = None,
                  per_model: Sequence[Mapping[str, Any] | None] | None = None, exact_ties: bool = False,
                  device: str | torch.device | None = None, out_dtype: torch.dtype | None = None,
                  step: int = 0, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Merge one tensor of several models in memory, with exactly the math the executor runs.

    ``tensors`` are the method's inputs besides the base, in order; ``base`` the base model's tensor. For slerp
    the base is the t=0 endpoint and may also be given as one of two ``tensors`` (``merge_tensors("slerp",
    [a, b], a, {"t": 0.3})``). Computation is in ``compute_dtype`` (float32 unless given; mergekit's ``dtype``);
    the result has ``out_dtype`` (default: the base's dtype, else the first tensor's). ``seed`` and
    ``tensor_name`` seed the random masks of DARE / DELLA as the executor does for a tensor of that name, so
    ``merge(..., seed=s)`` writes ``merge_tensors(..., seed=s, tensor_name=name)``.

    >>> import torch
    >>> a, b = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])
    >>> merge_tensors("linear", [a, b], None, {"weight": 1.0})
    tensor([2., 4.])
    """
    from . import get_method

    spec = get_method(method)
    tensors = list(tensors)
    if spec.base_role == "input" and base is not None and len(tensors) == 2:
        ids = [i for i, t in enumerate(tensors) if t is base]
        if not ids:
            raise InvalidInput(f"{spec.name}: the base model must be one of its two inputs")
        tensors = [t for i, t in enumerate(tensors) if i != ids[0]]
    if spec.base_role == "none" and base is not None:
        raise InvalidInput(f"{spec.name} takes no base model (give every model as an input)")
    check_arity(spec, len(tensors), base is not None)
    ref = base if base is not None else tensors[0]
    shape = tuple(ref.shape)
    for t in tensors:
        if tuple(t.shape) != shape:
            raise InvalidInput(f"tensor {tensor_name or '(unnamed)'!r}: shapes differ "
                               f"({list(shape)} vs {list(t.shape)})")
    dev = torch.device(device) if device is not None else ref.device
    glob, mp = bind_params(spec, params, len(tensors), per_model)
    name = tensor_name or ""
    sources = [Source(t.detach(), f"model {i}", dev) for i, t in enumerate(tensors)]
    bsrc = Source(base.detach(), "the base model", dev) if base is not None else None
    numel = math.prod(shape)
    row_len = shape[-1] if shape and shape[-1] > 0 else 1
    sink = TensorSink(numel // row_len if numel else 0, row_len, dev, compute_dtype)
    job = TensorJob(name, shape, sources, bsrc, glob, mp, sink, device=dev, seed=seed, step=step,
                    exact_ties=exact_ties, dtype=compute_dtype)
    run(spec, job)
    return sink.out.reshape(shape).to(out_dtype or ref.dtype)


def run(spec: MethodSpec, job: TensorJob) -> None:
    """Run ``spec``'s kernel on ``job`` (a non-floating or empty tensor is refused / passed through upstream)."""
    if spec.merge is None:  # pragma: no cover - every registered module sets its kernel
        raise InvalidInput(f"merge method {spec.name!r} has no kernel")
    if job.numel == 0:
        return
    spec.merge(spec, job)


Kernel = Callable[[MethodSpec, TensorJob], None]
