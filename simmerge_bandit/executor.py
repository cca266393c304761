"""The merge executor: streams checkpoints tensor by tensor into a new checkpoint, atomically.

Inputs are memory-mapped safetensors (sharded or not, fp32 / fp16 / bf16). Each output tensor is computed in the
compute dtype on the chosen device, in row chunks (see :mod:`.methods.job`), and written straight into its place in
a pre-planned output shard; a background thread maps in the next tensor's pages while the current one is computed,
another writes finished chunks, and every input tensor's pages are dropped from the process once merged, so peak
memory is a few chunks plus the current and the next tensors' mapped bytes, whatever the model size.

The compute dtype is mergekit's: a mergekit config computes in its ``dtype`` (without one, in the promoted dtype of
each tensor's inputs), so a ``dtype: bfloat16`` config gives mergekit's bf16 tensors; a merge from the Python API or
the catalog computes in float32. ``compute_dtype`` (``--compute-dtype``) overrides either, and the written
``mergekit_config.yml`` records what was used, so that ``mergekit-yaml`` reproduces the output.

The output is written into a temporary directory beside the target and renamed into place only when complete; an
exception, Ctrl-C, a kill or a full disk leaves the target as it was. ``force`` replaces an existing target by an
atomic exchange of the two directories (Linux ``renameat2``); where the file system cannot exchange, by two
renames, and a kill between them is repaired by the next merge into that target, which puts the old model back and
says so (:func:`recover`). With ``fsync`` every file written, the new directory and its parent are fsynced before
the call returns. Every output holds ``mergekit_config.yml`` (run it with ``mergekit-yaml`` to reproduce the merge)
and ``provenance.json`` (operator, inputs with fingerprints, seed, compute dtype, package versions, timings).

Python API: :func:`merge` (one method over N models), :func:`merge_chain` (((a op1 b) op2 c) in memory, per
tensor), :func:`merge_config` (a mergekit YAML), and :func:`merge_pair` / :func:`merge_chain_pairs` (the
catalog's ordered-pair convention, :func:`~.methods.pair_roles`).

Why one module of this size: planning the output shards, the prefetch and writer threads, the device staging
buffers and the publish / :func:`recover` protocol share one invariant (the target holds the complete old or the
complete new model) and buffers whose lifetimes overlap; the arithmetic per tensor is :mod:`.methods`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import mmap
import os
import queue
import re
import resource
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import mergekit_config as mkc
from .checkpoint import DTYPE_BYTES, INDEX_FILE, TOKENIZER_FILES, Checkpoint, read_checkpoint
from .errors import IncompatibleModels, InvalidInput, SimmergeError
from .methods import get_method
from .methods.job import Source, TensorJob, TensorSink, bind_params, check_arity, pair_roles, run
from .mergekit_config import PREVIOUS, Plan, Step
from .threads import torch_threads

#: Default largest output shard (bytes), as mergekit's and transformers' default of 5 GB.
DEFAULT_SHARD_SIZE = 5 * 1000 ** 3
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_FLOAT_CODES = ("F32", "F16", "BF16", "F64")
_PAGE = mmap.PAGESIZE
_EXTRA_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json")
VOCAB_CHOICES = ("refuse", "truncate")
#: Intra-op threads of the compute thread. Chunks are small and a reader and a writer thread run beside it, so
#: one compute thread is fastest on a small or busy machine (OpenMP threads that wait for a descheduled peer
#: cost more than they give: 6x slower on a loaded 2-core box); raise it on an idle many-core machine.
DEFAULT_THREADS = 1
#: Size of the pinned buffer through which tensors are uploaded to a GPU, piece by piece.
STAGING_BYTES = 64 << 20
#: What an API or catalog merge computes in (a mergekit config computes in its own ``dtype``).
DEFAULT_COMPUTE_DTYPE = "float32"
log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """Where the merged model is and how the merge went (seconds, bytes read and written, throughput, peak RSS)."""

    out: Path
    stats: dict = field(default_factory=dict)


# ---- public API ------------------------------------------------------------------------------------------------

def merge(models: Sequence[str | os.PathLike], method: str, params: dict | None, out: str | os.PathLike, *,
          base: str | os.PathLike | None = None, device: str = "auto", seed: int = 0, dtype: str | None = None,
          force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE, per_model: Sequence[dict | None] | None = None,
          exact_ties: bool = False, vocab: str = "refuse", progress: bool = False, fsync: bool = False,
          operator: str | None = None, threads: int | None = DEFAULT_THREADS,
          compute_dtype: str | None = None) -> MergeResult:
    """Merge ``models`` with ``method`` into the checkpoint directory ``out``.

    ``base`` is mergekit's ``base_model``: the reference of task vectors (task-arithmetic family, model_stock,
    nuslerp) or slerp's t=0 endpoint. ``params`` are the method's parameters with mergekit semantics: a
    per-model parameter given here applies to every model, ``per_model[i]`` overrides it for model ``i``; values
    may be gradients or filtered values as in a mergekit config. ``dtype`` is the output dtype (default: the
    base's, else the first model's), ``compute_dtype`` what the arithmetic runs in (default float32; mergekit's
    ``dtype``). ``vocab="truncate"`` merges models whose vocabularies differ by keeping the rows of the smallest.
    ``exact_ties`` picks among exactly equal magnitudes as mergekit does (slow).

    >>> merge(["ft-a", "ft-b"], "ties", {"density": 0.5}, "out", base="base")  # doctest: +SKIP
    """
    step = Step(method=method, models=[str(m) for m in models], base=None if base is None else str(base),
                params=dict(params or {}), model_params=list(per_model) if per_model else [],
                name=None, dtype=mkc.canonical_dtype(compute_dtype or DEFAULT_COMPUTE_DTYPE, "compute dtype"))
    return execute(Plan([step], out_dtype=dtype), out, device=device, seed=seed, force=force,
                   shard_size=shard_size, exact_ties=exact_ties, vocab=vocab, progress=progress, fsync=fsync,
                   operators=[operator] if operator else None, threads=threads)


def merge_chain(steps: Sequence[Any], out: str | os.PathLike, *, device: str = "auto", seed: int = 0,
                dtype: str | None = None, force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                exact_ties: bool = False, vocab: str = "refuse", progress: bool = False, fsync: bool = False,
                operators: Sequence[str] | None = None, threads: int | None = DEFAULT_THREADS,
                compute_dtype: str | None = None) -> MergeResult:
    """Run merges that feed each other, per tensor in memory, writing only the last result.

    A step is ``(models, method, params)`` or ``(models, method, params, base)``; in ``models`` (and ``base``)
    :data:`PREVIOUS` stands for the previous step's result (kept in the compute dtype, float32 unless
    ``compute_dtype`` says otherwise, never rounded to the output dtype).

    >>> merge_chain([(["a", "b"], "ties", {"density": 0.5}, "base"),
    ...              ([PREVIOUS, "c"], "slerp", {"t": 0.3}, PREVIOUS)], "out")  # doctest: +SKIP
    """
    plan_steps = []
    for i, s in enumerate(steps):
        if isinstance(s, Step):
            plan_steps.append(s)
            continue
        if not isinstance(s, (tuple, list)) or len(s) not in (3, 4):
            raise InvalidInput(f"chain step {i + 1}: expected (models, method, params[, base])")
        models, method, params = s[0], s[1], s[2]
        base = s[3] if len(s) == 4 else None

        def ref(x):
            if x is PREVIOUS or x == PREVIOUS:
                if i == 0:
                    raise InvalidInput("chain step 1 has no previous result")
                return i - 1
            return str(x)

        plan_steps.append(Step(method=method, models=[ref(m) for m in models],
                               base=None if base is None else ref(base), params=dict(params or {})))
    plan = Plan(plan_steps, out_dtype=dtype)
    for st in plan.steps:
        st.dtype = mkc.canonical_dtype(compute_dtype or st.dtype or DEFAULT_COMPUTE_DTYPE, "compute dtype")
    return execute(plan, out, device=device, seed=seed, force=force,
                   shard_size=shard_size, exact_ties=exact_ties, vocab=vocab, progress=progress, fsync=fsync,
                   operators=operators, threads=threads)


def merge_pair(models: Sequence[str | os.PathLike], method: str, params: dict | None, out: str | os.PathLike, *,
               base: str | os.PathLike | None = None, **kwargs) -> MergeResult:
    """Merge an ordered pair (or N models) with the catalog's roles (:func:`~.methods.pair_roles`): ``base`` is
    the models' shared base; slerp takes the first model as its base model."""
    inputs, b = pair_roles(method, [str(m) for m in models], None if base is None else str(base))
    return merge(inputs, method, params, out, base=b, **kwargs)


def merge_chain_pairs(models: Sequence[str | os.PathLike], ops: Sequence[tuple[str, dict]],
                      out: str | os.PathLike, *, base: str | os.PathLike | None = None, **kwargs) -> MergeResult:
    """((m0 op0 m1) op1 m2) ...: ``len(models) == len(ops) + 1``; each step uses the catalog's roles with the
    previous result as the first model of the pair."""
    models = [str(m) for m in models]
    if len(models) != len(ops) + 1:
        raise InvalidInput(f"a chain of {len(ops)} operators merges {len(ops) + 1} models, got {len(models)}")
    shared = None if base is None else str(base)
    steps = []
    first: Any = models[0]
    for i, (method, params) in enumerate(ops):
        inputs, b = pair_roles(method, [first, models[i + 1]], shared)
        steps.append((inputs, method, params, b))
        first = PREVIOUS
    return merge_chain(steps, out, **kwargs)


def merge_config(config: str | os.PathLike | dict | list, out: str | os.PathLike, *, dtype: str | None = None,
                 compute_dtype: str | None = None, **kwargs) -> MergeResult:  # kwargs: those of :func:`execute`
    """Run a mergekit YAML config (a path, YAML text or parsed dict) as mergekit would; see
    :mod:`.mergekit_config`. ``dtype`` overrides the written dtype, ``compute_dtype`` the config's ``dtype``."""
    plan = mkc.load(config if not isinstance(config, os.PathLike) else Path(config))
    if dtype is not None:
        plan.out_dtype = mkc.canonical_dtype(dtype, "output dtype")
    plan.set_compute_dtype(compute_dtype)
    return execute(plan, out, **kwargs)


# ---- planning ----------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` = the first GPU when there is one, else the CPU; ``cuda[:N]`` must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInput(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"device {device!r} asked for, but torch sees no CUDA GPU here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInput(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) present")
    elif dev.type != "cpu":
        raise InvalidInput(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    return dev


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, mkc.canonical_dtype(name, "output dtype"))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class _TensorPlan:
    name: str
    shape: tuple
    rows: dict           # checkpoint path -> rows to read (vocabulary truncation), or None
    floating: bool
    out_code: str
    #: Per step: (compute dtype, dtype of the step's result); the last step's result is written as out_code.
    dtypes: list = field(default_factory=list)


class _Planned:
    def __init__(self, plan: Plan, vocab: str):
        if vocab not in VOCAB_CHOICES:
            raise InvalidInput(f"vocab must be one of {', '.join(VOCAB_CHOICES)}, got {vocab!r}")
        self.plan = plan
        steps = plan.steps
        if not steps:
            raise InvalidInput("nothing to merge: no steps")
        paths: list[str] = []
        for si, st in enumerate(steps):
            spec = get_method(st.method)
            if len(st.model_params) != len(st.models):
                raise InvalidInput(f"{st.method}: {len(st.model_params)} per-model parameter sets for "
                                   f"{len(st.models)} models")
            check_arity(spec, len(st.models), st.base is not None)
            for r in list(st.models) + ([st.base] if st.base is not None else []):
                if isinstance(r, int):
                    if not 0 <= r < si:
                        raise InvalidInput(f"step {si + 1} refers to step {r + 1}, which does not come before it")
                elif r not in paths:
                    paths.append(r)
        if not paths:
            raise InvalidInput("nothing to merge: no input checkpoint")
        self.ckpts: dict[str, Checkpoint] = {p: read_checkpoint(p) for p in paths}
        # read_checkpoint resolves paths; key the plan by what the user gave and keep the resolved ones too.
        first_step = steps[0]
        ref_path = first_step.base if isinstance(first_step.base, str) else \
            next(m for m in first_step.models if isinstance(m, str))
        self.ref = self.ckpts[ref_path]
        self.tensors = self._tensors(vocab)
        self.num_layers = (self.ref.config.get("num_hidden_layers") or self.ref.config.get("n_layer")
                           or self.ref.config.get("num_layers"))
        for tp in self.tensors:
            if tp.floating:
                tp.dtypes = self._dtypes_for(tp.name)
                tp.out_code = _CODES[tp.dtypes[-1][1]]
            else:
                tp.out_code = self.ref.tensors[tp.name].dtype
        # The dtype config.json names: the one most of the merged elements are written in.
        weights = Counter()
        for tp in self.tensors:
            if tp.floating:
                weights[tp.dtypes[-1][1]] += math.prod(tp.shape)
        self.out_dtype = weights.most_common(1)[0][0] if weights else getattr(torch, self.ref.dtype)
        self.params = [self._params_for(tp.name) for tp in self.tensors]

    def _dtypes_for(self, name: str) -> list[tuple[torch.dtype, torch.dtype]]:
        """mergekit's dtypes of one tensor, step by step: a step computes in its ``dtype``, else in the promoted
        dtype of its inputs (as stored, or as the earlier step left them); its result has its ``out_dtype``, else
        that dtype. The plan's ``compute_dtype`` replaces the compute dtype only. The written dtype is the plan's
        ``out_dtype``, else the last step's result dtype, except that an API merge without ``out_dtype`` writes
        the reference model's dtype."""
        steps = self.plan.steps
        res: list[tuple[torch.dtype, torch.dtype]] = []
        for si, st in enumerate(steps):
            refs = list(st.models) + ([st.base] if st.base is not None else [])
            ins = [res[r][1] if isinstance(r, int) else _TORCH_DTYPES[self.ckpts[r].tensors[name].dtype]
                   for r in refs]
            natural = _torch_dtype(st.dtype) if st.dtype else _promote(ins)
            cd = _torch_dtype(self.plan.compute_dtype) if self.plan.compute_dtype else natural
            out = _torch_dtype(st.out_dtype) if st.out_dtype else natural
            if si == len(steps) - 1:
                if self.plan.out_dtype:
                    out = _torch_dtype(self.plan.out_dtype)
                elif not st.out_dtype and not self.plan.from_config:
                    out = getattr(torch, self.ref.dtype)
            res.append((cd, out))
        return res

    def step_dtypes(self, si: int, which: int) -> list[torch.dtype]:
        """The distinct compute (``which=0``) or result (1) dtypes of step ``si`` over the floating tensors."""
        return sorted({tp.dtypes[si][which] for tp in self.tensors if tp.floating}, key=str)

    def _tensors(self, vocab: str) -> list[_TensorPlan]:
        ref = self.ref
        names_ref = set(ref.tensors)
        vocabs = {p: c.vocab_size for p, c in self.ckpts.items()}
        distinct = {v for v in vocabs.values() if v is not None}
        small = min(distinct) if distinct else None
        if len(distinct) > 1 and vocab == "refuse":
            detail = ", ".join(f"{Path(p).name}: {v}" for p, v in vocabs.items())
            raise IncompatibleModels(f"vocabulary sizes differ ({detail}); pass vocab='truncate' (--vocab "
                                     f"truncate) to keep the first {small} rows of the embedding and output "
                                     f"tensors (token ids must agree on them)")
        for p, c in self.ckpts.items():
            if c is ref:
                continue
            for n in sorted(names_ref | set(c.tensors)):
                if n not in c.tensors:
                    raise IncompatibleModels(f"tensor {n!r} is in {ref.path} but not in {c.path}")
                if n not in names_ref:
                    raise IncompatibleModels(f"tensor {n!r} is in {c.path} but not in {ref.path}")
        out = []
        order = sorted(ref.tensors.values(), key=lambda t: (t.file, t.start))
        for info in order:
            shapes = {p: c.tensors[info.name].shape for p, c in self.ckpts.items()}
            floating = info.dtype in _FLOAT_CODES
            for p, c in self.ckpts.items():
                other = c.tensors[info.name]
                if (other.dtype in _FLOAT_CODES) != floating:
                    raise IncompatibleModels(f"tensor {info.name!r} is floating point in one model and not in "
                                             f"another ({ref.path} vs {c.path})")
            rows = None
            shape = info.shape
            if len(set(shapes.values())) > 1:
                tails = {s[1:] for s in shapes.values()}
                vocab_rows = all(vocabs[p] is not None and s and s[0] == vocabs[p] for p, s in shapes.items())
                if vocab == "truncate" and len(tails) == 1 and vocab_rows and floating:
                    rows = {p: small for p in shapes}
                    shape = (small,) + tuple(info.shape[1:])
                else:
                    (pa, sa), (pb, sb) = next((a, b) for a in shapes.items() for b in shapes.items()
                                              if a[1] != b[1])
                    raise IncompatibleModels(f"tensor {info.name!r} has shape {list(sa)} in {pa} but "
                                             f"{list(sb)} in {pb}")
            out.append(_TensorPlan(info.name, tuple(shape), rows, floating, ""))
        return out

    def _params_for(self, name: str) -> list[tuple[dict, list[dict]]]:
        t = mkc.layer_t(name, self.num_layers)
        res = []
        for st in self.plan.steps:
            glob, models = mkc.resolve(st, name, t)
            spec = get_method(st.method)
            try:
                res.append(bind_params(spec, glob, len(st.models), models))
            except SimmergeError as e:
                raise type(e)(f"{e} (tensor {name!r})") from None
        return res


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


# ---- reading -----------------------------------------------------------------------------------------------

class _Reader:
    """Memory-mapped access to one checkpoint's tensors, with read-ahead and page release per tensor."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self._maps: dict[str, mmap.mmap] = {}
        self._bytes: dict[str, torch.Tensor] = {}

    def _file(self, fname: str) -> tuple[mmap.mmap, torch.Tensor]:
        if fname not in self._maps:
            with open(self.ck.path / fname, "rb") as fh:
                # ACCESS_COPY gives a writable (private, copy-on-write) view that torch can wrap without
                # warnings; nothing writes to it, so nothing is ever copied.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[fname] = mm
            self._bytes[fname] = torch.frombuffer(mm, dtype=torch.uint8)
        return self._maps[fname], self._bytes[fname]

    def raw(self, name: str, rows: int | None = None) -> torch.Tensor:
        """The tensor's values, flat, in its stored dtype (a view of the mapping when aligned)."""
        info = self.ck.tensors[name]
        _, u8 = self._file(info.file)
        end = info.end
        if rows is not None:
            row_bytes = (info.end - info.start) // max(1, info.shape[0])
            end = info.start + rows * row_bytes
        b = u8[info.start:end]
        dt = _TORCH_DTYPES[info.dtype]
        if info.start % DTYPE_BYTES[info.dtype]:
            b = b.clone()
        return b.view(dt)

    def _span(self, name: str) -> tuple[mmap.mmap, int, int]:
        info = self.ck.tensors[name]
        mm, _ = self._file(info.file)
        lo = info.start - info.start % _PAGE
        return mm, lo, info.end - lo

    def prefetch(self, name: str) -> None:
        mm, lo, length = self._span(name)
        if length <= 0:
            return
        try:
            mm.madvise(mmap.MADV_WILLNEED, lo, length)
        except (AttributeError, OSError, ValueError):
            pass
        # Touch one byte per page so the next tensor's pages are mapped before the compute thread needs them.
        _, u8 = self._file(self.ck.tensors[name].file)
        u8[lo:lo + length:_PAGE].sum()

    def release(self, name: str) -> None:
        mm, lo, length = self._span(name)
        # Drop whole pages only, so the neighbours' boundary pages stay mapped for their own tensors.
        first = lo + (_PAGE if lo < self.ck.tensors[name].start else 0)
        last = (self.ck.tensors[name].end // _PAGE) * _PAGE
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self._bytes.clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor view is still alive somewhere; the mapping goes with it
                pass
        self._maps.clear()


# ---- writing -----------------------------------------------------------------------------------------------

class _ShardWriter:
    """Writes planned shards: headers first (every offset is known in advance), then data in order, from a
    background thread fed through a bounded queue."""

    def __init__(self, tmp: Path, tensors: list[_TensorPlan], shard_size: int, fsync: bool):
        self.fsync = fsync
        self.shards: list[list[_TensorPlan]] = [[]]
        size = 0
        for tp in tensors:
            nbytes = math.prod(tp.shape) * DTYPE_BYTES[tp.out_code]
            if self.shards[-1] and size + nbytes > shard_size:
                self.shards.append([])
                size = 0
            self.shards[-1].append(tp)
            size += nbytes
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total = sum(math.prod(tp.shape) * DTYPE_BYTES[tp.out_code] for tp in tensors)
        self.tmp = tmp
        self._q: queue.Queue = queue.Queue(maxsize=16)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="simmerge-writer", daemon=True)
        self._files: list = []
        self.bytes_written = 0
        self._thread.start()

    def index(self) -> dict:
        return {"metadata": {"total_size": self.total},
                "weight_map": {tp.name: self.names[i] for i, shard in enumerate(self.shards) for tp in shard}}

    def open_shard(self, i: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for tp in self.shards[i]:
            nbytes = math.prod(tp.shape) * DTYPE_BYTES[tp.out_code]
            header[tp.name] = {"dtype": tp.out_code, "shape": list(tp.shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._put(("open", self.tmp / self.names[i], len(raw).to_bytes(8, "little") + raw))

    def write(self, data: torch.Tensor) -> None:
        self._put(("data", data))

    def _put(self, item) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _loop(self) -> None:
        fh = None
        try:
            while True:
                item = self._q.get()
                if item[0] == "stop":
                    break
                if self._error is not None:
                    continue
                if item[0] == "open":
                    if fh is not None:
                        self._close(fh)
                    fh = open(item[1], "wb")
                    fh.write(item[2])
                else:
                    t = item[1]
                    fh.write(memoryview(t.view(torch.uint8).numpy()))
                    self.bytes_written += t.numel() * t.element_size()
        except BaseException as e:  # surfaced to the merging thread at its next write or at finish()
            self._error = e
        finally:
            if fh is not None:
                try:
                    self._close(fh)
                except BaseException as e:
                    self._error = self._error or e

    def _close(self, fh) -> None:
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())
        fh.close()

    def finish(self) -> None:
        self._q.put(("stop",))
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        try:
            self._q.put_nowait(("stop",))
        except queue.Full:
            pass
        self._thread.join(timeout=10)


class _FileSink:
    """Converts each output chunk to the output dtype and hands it to the writer, in order."""

    def __init__(self, writer: _ShardWriter, dtype: torch.dtype):
        self.writer, self.dtype = writer, dtype
        self._next = 0

    def write(self, lo: int, hi: int, rows: torch.Tensor) -> None:
        if lo != self._next:  # pragma: no cover - every kernel writes its chunks once, in order
            raise RuntimeError(f"kernel wrote rows {lo}:{hi} out of order (expected {self._next})")
        self._next = hi
        out = rows.to(self.dtype)
        if out.device.type != "cpu":
            out = out.cpu()
        self.writer.write(out.contiguous())  # kernels do not modify what they write (TensorJob.write)


# ---- execution ---------------------------------------------------------------------------------------------

def execute(plan: Plan, out: str | os.PathLike, *, device: str = "auto", seed: int = 0, force: bool = False,
            shard_size: int = DEFAULT_SHARD_SIZE, exact_ties: bool = False, vocab: str = "refuse",
            progress: bool = False, fsync: bool = False, operators: Sequence[str] | None = None,
            threads: int | None = DEFAULT_THREADS) -> MergeResult:
    """Run a :class:`~.mergekit_config.Plan` into ``out`` (what every public entry point calls).

    ``threads`` is torch's intra-op thread count while merging on the CPU (None: leave it as it is); the compiled
    TIES loops (:mod:`.methods.fused`) run on as many threads.
    """
    if threads is not None and threads < 1:
        raise InvalidInput(f"threads must be at least 1, got {threads}")
    with torch_threads(threads), _reused_heap():
        return _execute(plan, out, device=device, seed=seed, force=force, shard_size=shard_size,
                        exact_ties=exact_ties, vocab=vocab, progress=progress, fsync=fsync, operators=operators)


#: glibc ``mallopt`` parameters: allocations under the threshold come from the heap (32 MiB, glibc's largest
#: dynamic value), and up to TRIM bytes of freed heap stay with the process until :func:`_reused_heap` ends.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 << 20, 1 << 30


@contextmanager
def _reused_heap() -> Iterator[None]:
    """Keep freed chunk buffers in the process while merging, and give them back at the end (glibc only).

    Kernels allocate and free tensors of a few MB per chunk. glibc returns such memory to the kernel as soon as
    it is freed (the top of the heap beyond twice the last freed size, or an mmap'd block), so every next chunk
    page-faults its buffers in again and the kernel zeroes them: 700 000 faults and 2.7 s of system time in a
    7 s TIES merge of the benchmark's 0.29 B-parameter family, against 70 000 and 0.35 s with this. Peak memory
    is unchanged (freed buffers are reused, not added); ``malloc_trim`` returns what is left at the end.
    """
    global _merging
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        if _merging == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        _merging += 1
    try:
        yield
    finally:
        with _heap_lock:
            _merging -= 1
            if _merging == 0:  # the last of concurrent merges (daemon threads) gives the memory back
                libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)  # glibc's default
                libc.malloc_trim(0)


_heap_lock = threading.Lock()
_merging = 0


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):  # not glibc
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def _execute(plan: Plan, out, *, device, seed, force, shard_size, exact_ties, vocab, progress, fsync,
             operators) -> MergeResult:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if shard_size <= 0:
        raise InvalidInput(f"shard size must be positive, got {shard_size}")
    out = Path(out).expanduser().absolute()
    planned = _Planned(plan, vocab)
    for p, ck in planned.ckpts.items():
        if out == ck.path or ck.path in out.parents:
            raise InvalidInput(f"the output {out} would overwrite or sit inside input model {ck.path}")
    try:
        notes = recover(out)
    except OSError as e:  # an unreadable or read-only parent: said in one line below, when writing fails too
        notes = [f"could not look for leftovers of interrupted merges beside {out} ({e.strerror or e})"]
    for note in notes:
        log.warning("%s", note)
    if out.exists() and not force:
        raise InvalidInput(f"{out} already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a directory")
    tmp = _sibling(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # a read-only file system, a parent that is a file, no permission
        raise SimmergeError(f"cannot write the merged model at {out}: {e.strerror or e}"
                            f"{f' ({e.filename})' if e.filename else ''}; nothing was written") from None
    readers = {p: _Reader(ck) for p, ck in planned.ckpts.items()}
    writer = None
    try:
        writer = _ShardWriter(tmp, planned.tensors, shard_size, fsync)
        bytes_read = _run(planned, readers, writer, dev, seed, exact_ties, progress)
        writer.finish()
        seconds = time.perf_counter() - t0
        stats = {"seconds": round(seconds, 4), "bytes_read": bytes_read, "bytes_written": writer.bytes_written,
                 "gb_per_s": round((bytes_read + writer.bytes_written) / seconds / 1e9, 4) if seconds else None,
                 "n_tensors": len(planned.tensors), "n_shards": len(writer.names), "device": str(dev),
                 "peak_rss_bytes": _peak_rss()}
        if notes:
            stats["recovered"] = notes
        _finish_dir(tmp, planned, writer, dev, seed, exact_ties, vocab, stats, operators, fsync)
        _commit(tmp, out, force, fsync)
        return MergeResult(out=out, stats=stats)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise SimmergeError(f"writing the merged model failed ({e.strerror or e}); nothing was written at "
                                f"{out}") from None
        raise
    finally:
        for r in readers.values():
            r.close()


def _run(planned: _Planned, readers: dict[str, _Reader], writer: _ShardWriter, dev: torch.device, seed: int,
         exact_ties: bool, progress: bool) -> int:
    steps = planned.plan.steps
    specs = [get_method(st.method) for st in steps]
    tensors = planned.tensors
    shard_of = {tp.name: i for i, shard in enumerate(writer.shards) for tp in shard}
    opened = -1
    bytes_read = 0
    prefetcher = _Prefetcher(readers, dev)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tensors), unit="tensor", desc="merging", disable=None, file=sys.stderr)
    try:
        prefetcher.request(tensors[0]) if tensors else None
        for k, tp in enumerate(tensors):
            data = prefetcher.get(tp)
            if k + 1 < len(tensors):
                prefetcher.request(tensors[k + 1])
            if shard_of[tp.name] != opened:
                opened = shard_of[tp.name]
                writer.open_shard(opened)
            bytes_read += sum(t.numel() * t.element_size() for t in data.values())
            if not tp.floating:
                _copy_exact(tp, data, writer)
            else:
                _merge_tensor(tp, planned.params[k], steps, specs, data, writer, dev, seed, exact_ties)
            del data
            for p in planned.ckpts:
                readers[p].release(tp.name)
            if bar is not None:
                bar.update(1)
    finally:
        prefetcher.close()
        if bar is not None:
            bar.close()
    return bytes_read


def _copy_exact(tp: _TensorPlan, data: dict[str, torch.Tensor], writer: _ShardWriter) -> None:
    items = list(data.items())
    first = items[0][1]
    for p, t in items[1:]:
        if not torch.equal(t.cpu(), first.cpu()):
            raise IncompatibleModels(f"tensor {tp.name!r} is not floating point and differs between models "
                                     f"({items[0][0]} vs {p}); it cannot be merged")
    writer.write(first.cpu().contiguous())


def _merge_tensor(tp, params, steps, specs, data, writer, dev, seed, exact_ties) -> None:
    results: list[torch.Tensor] = []
    last = len(steps) - 1
    for si, (st, spec) in enumerate(zip(steps, specs)):
        compute, result = tp.dtypes[si]

        def src(r):
            if isinstance(r, int):
                return Source(results[r], f"the result of step {r + 1}", dev, compute)
            return Source(data[r], r, dev, compute)

        models = [src(r) for r in st.models]
        base = src(st.base) if st.base is not None else None
        numel = math.prod(tp.shape)
        row_len = tp.shape[-1] if tp.shape and tp.shape[-1] > 0 else 1
        n_rows = numel // row_len if numel else 0
        # An intermediate result is what mergekit-multi would write and read back: rounded to its result dtype.
        sink = _FileSink(writer, result) if si == last else TensorSink(n_rows, row_len, dev, result)
        glob, mp = params[si]
        job = TensorJob(tp.name, tp.shape, models, base, glob, mp, sink, device=dev, seed=seed, step=si,
                        exact_ties=exact_ties, dtype=compute)
        run(spec, job)
        results.append(None if si == last else sink.out.reshape(-1))


class _Prefetcher:
    """Maps in (CPU) or uploads (CUDA, through a pinned staging buffer) the next tensor's inputs in a thread.

    One thread for the whole merge, handed one tensor at a time: starting a thread per tensor made the merging
    thread wait for each new one to be scheduled (0.9 s of a 5 s linear merge on a loaded 2-core machine)."""

    def __init__(self, readers: dict[str, _Reader], dev: torch.device):
        self.readers, self.dev = readers, dev
        self._result: dict | None = None
        self._error: BaseException | None = None
        self._name: str | None = None
        self._stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        self._staging: torch.Tensor | None = None
        self._requests: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="simmerge-prefetch")
        self._thread.start()

    def request(self, tp: _TensorPlan) -> None:
        """Start loading ``tp``'s inputs (after :meth:`get` of the previous request)."""
        self._name = tp.name
        self._result, self._error = None, None
        self._done.clear()
        self._requests.put(tp)

    def _loop(self) -> None:
        while (tp := self._requests.get()) is not None:
            self._load(tp)
            self._done.set()

    def _load(self, tp: _TensorPlan) -> None:
        try:
            out = {}
            for p, r in self.readers.items():
                r.prefetch(tp.name)
                rows = tp.rows.get(p) if tp.rows else None
                raw = r.raw(tp.name, rows)
                out[p] = self._upload(raw) if self.dev.type == "cuda" and tp.floating else raw
            self._result = out
        except BaseException as e:
            self._error = e

    def _upload(self, raw: torch.Tensor) -> torch.Tensor:
        nbytes = raw.numel() * raw.element_size()
        dst = torch.empty(raw.numel(), dtype=raw.dtype, device=self.dev)
        piece = STAGING_BYTES
        if self._staging is None:
            self._staging = torch.empty(piece, dtype=torch.uint8).pin_memory()
        src, dst_u8 = raw.view(torch.uint8), dst.view(torch.uint8)
        with torch.cuda.stream(self._stream):
            for lo in range(0, nbytes, piece):
                n = min(piece, nbytes - lo)
                self._staging[:n].copy_(src[lo:lo + n])
                dst_u8[lo:lo + n].copy_(self._staging[:n], non_blocking=True)
                self._stream.synchronize()  # the staging buffer is reused by the next piece
        return dst

    def get(self, tp: _TensorPlan) -> dict[str, torch.Tensor]:
        assert self._name == tp.name
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- finishing ---------------------------------------------------------------------------------------------

def _finish_dir(tmp: Path, planned: _Planned, writer: _ShardWriter, dev, seed, exact_ties, vocab, stats,
                operators, fsync: bool) -> None:
    ref = planned.ref
    config = dict(ref.config)
    dtype_name = _name(planned.out_dtype)
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "dtype" and "torch_dtype" not in config:
            config[key] = dtype_name
    sizes = {tp.shape[0] for tp in planned.tensors if tp.rows}
    if sizes and "vocab_size" in config:
        config["vocab_size"] = min(sizes)
    written = [_write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")]
    for f in TOKENIZER_FILES + _EXTRA_FILES:
        if (ref.path / f).is_file():
            shutil.copy2(ref.path / f, tmp / f)
            written.append(tmp / f)
    if len(writer.names) > 1:
        written.append(_write_text(tmp / INDEX_FILE, json.dumps(writer.index(), indent=2) + "\n"))
    written.append(_write_text(tmp / "mergekit_config.yml", _mergekit_yaml(planned)))
    written.append(_write_text(tmp / "provenance.json", json.dumps(
        _provenance(planned, dev, seed, exact_ties, vocab, stats, operators), indent=2, default=str) + "\n"))
    if fsync:  # the shards were fsynced by the writer as it closed them
        for f in written:
            _fsync_path(f)
        _fsync_path(tmp)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries, e.g. a rename into it, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _uniform(dtypes: list[torch.dtype]) -> str | None:
    return _name(dtypes[0]) if len(dtypes) == 1 else None


def _mergekit_yaml(planned: _Planned) -> str:
    steps = planned.plan.steps
    names = [f"step{i + 1}" for i in range(len(steps))]
    docs = []
    for i, st in enumerate(steps):
        last = i == len(steps) - 1

        def show(r):
            return names[r] if isinstance(r, int) else str(planned.ckpts[r].path)

        # The dtypes we used, spelled out; a step whose tensors computed in several (promoted) dtypes leaves its
        # `dtype` out, and mergekit promotes per tensor as we did.
        doc = mkc.step_doc(st, [show(r) for r in st.models], None if st.base is None else show(st.base),
                           dtype=_uniform(planned.step_dtypes(i, 0)),
                           out_dtype=_uniform(planned.step_dtypes(i, 1)),
                           name=None if last else names[i])
        docs.append(doc)
    header = (f"# Written by simmerge-bandit {_version('simmerge-bandit')}. Reproduce with: "
              f"{'mergekit-multi' if len(docs) > 1 else 'mergekit-yaml'} mergekit_config.yml OUT\n"
              f"# dtype is the dtype the merge computed in. Random methods (dare_*, della*) draw other masks in "
              f"mergekit.\n")
    return mkc.to_yaml(docs, header)


def _provenance(planned: _Planned, dev, seed, exact_ties, vocab, stats, operators) -> dict:
    import platform
    from datetime import datetime, timezone

    steps = []
    for i, st in enumerate(planned.plan.steps):
        def show(r):
            return {"step": r + 1} if isinstance(r, int) else {"path": str(planned.ckpts[r].path)}

        computed = [_name(d) for d in planned.step_dtypes(i, 0)]
        steps.append({"method": st.method, "operator": (operators or [None] * (i + 1))[i]
                      if operators and i < len(operators) else None,
                      "params": st.params, "per_model_params": st.model_params,
                      "models": [show(r) for r in st.models], "base": None if st.base is None else show(st.base),
                      "compute_dtype": computed[0] if len(computed) == 1 else computed,
                      "result_dtype": [_name(d) for d in planned.step_dtypes(i, 1)]})
    return {
        "tool": "simmerge-bandit",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": steps,
        "inputs": [{"path": str(ck.path), "fingerprint": ck.fingerprint(), "architecture": ck.architecture,
                    "dtype": ck.dtype} for ck in planned.ckpts.values()],
        "seed": seed,
        "compute_dtype": steps[-1]["compute_dtype"],
        "compute_dtype_option": planned.plan.compute_dtype,
        "output_dtype": _name(planned.out_dtype),
        "device": str(dev),
        "exact_ties": exact_ties,
        "vocab": vocab,
        "versions": {"simmerge-bandit": _version("simmerge-bandit"), "torch": torch.__version__,
                     "python": platform.python_version()},
        "stats": stats,
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# ---- putting the output in place -------------------------------------------------------------------------------
#
# Beside OUT live, at most for the length of one merge: .OUT.tmp-PID-X (the model being written, then after an
# exchange the old model), .OUT.old-PID-X (the old model, between the two renames of a replacement that could not
# exchange) and .OUT.trash-PID-X (an old model being deleted). A kill at any point leaves OUT complete (old or new)
# or, only between the two renames, missing with .OUT.old-PID-X complete: recover() puts that back.

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace(tmp: Path, out: Path, fsync: bool) -> Iterator[str]:
    """Put the complete model ``tmp`` at ``out``, one atomic file-system operation per step (each yields what it
    did), so that stopping between any two steps is a kill at that point."""
    parent = out.parent
    if not out.exists():
        os.rename(tmp, out)
        if fsync:
            _fsync_committed(parent, out)
        yield "renamed"
        return
    if _exchange(tmp, out):
        if fsync:
            _fsync_committed(parent, out)
        yield "exchanged"
        old = tmp
    else:
        old = _sibling(out, "old")
        os.rename(out, old)
        yield "moved the old model aside"
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        if fsync:
            _fsync_committed(parent, out)
        yield "renamed"
    trash = _sibling(out, "trash")
    try:
        os.rename(old, trash)
    except OSError as e:  # the new model is in place; a leftover is recover()'s to remove
        log.warning("could not remove the replaced model %s: %s", old, e)
        return
    yield "discarding the old model"
    shutil.rmtree(trash, ignore_errors=True)
    yield "discarded the old model"


def _fsync_committed(parent: Path, out: Path) -> None:
    try:
        _fsync_path(parent)
    except OSError as e:
        raise SimmergeError(f"the merged model is at {out}, but making its rename durable failed (fsync of "
                            f"{parent}: {e.strerror or e})") from None


def _commit(tmp: Path, out: Path, force: bool, fsync: bool) -> None:
    if out.exists() and not force:
        raise InvalidInput(f"{out} appeared while merging; pass --force to replace it")
    for _ in _replace(tmp, out, fsync):
        pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: What :func:`_sibling` names: ``.NAME.KIND-PID-HEX8``.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|trash)-(?P<pid>\d+)-[0-9a-f]{8}$")


def recover(out: str | os.PathLike) -> list[str]:
    """Repair what killed merges left in ``out``'s parent; return one sentence per thing done.

    The old model of an interrupted ``force`` replacement goes back to ``out`` when ``out`` is missing; partial
    outputs, replaced models and half-deleted ones of processes that no longer run are removed. Partial outputs
    and half-deleted models of other names in the same parent go too (nothing else would ever remove them); a
    replaced model of another name waits for a merge into that name, which may have to put it back. Every merge
    into ``out`` calls this first (and logs what it did).
    """
    out = Path(out).expanduser().absolute()
    notes: list[str] = []
    if not out.parent.is_dir():
        return notes
    found = []
    for p in out.parent.iterdir():
        m = _SIBLING.match(p.name)
        if m is None or (m["name"] != out.name and m["kind"] == "old"):
            continue
        kind, pid = m["kind"], int(m["pid"])
        if not _alive(pid):
            found.append((kind, p))
    for kind, p in sorted(found, key=lambda kp: (kp[0] != "old", -kp[1].stat().st_mtime)):
        if kind == "old" and not out.exists():
            os.rename(p, out)
            notes.append(f"restored the previous model at {out} (a --force replacement of it was interrupted)")
            continue
        shutil.rmtree(p, ignore_errors=True)
        what = {"tmp": "an incomplete merge", "old": "a replaced model", "trash": "a half-deleted model"}[kind]
        notes.append(f"removed {what} left in {out.parent} by an interrupted merge ({p.name})")
    return notes
