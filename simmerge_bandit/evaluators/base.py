"""What every evaluator shares: the result record, the evaluator interface, loading models and task data.

An evaluator turns (model, task) into an :class:`EvalResult`. It never raises for a model or a command that
misbehaves: it returns a result with ``status="failed"`` and the reason, so that a bandit loop records the
failure and carries on. Bad *arguments* (no such data file, unknown metric) still raise
:class:`~simmerge_bandit.errors.InvalidInput`, because nothing could be evaluated at all.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import InvalidCheckpoint


@dataclass
class EvalResult:
    """The outcome of one evaluation. ``score`` is higher-is-better and ``None`` exactly when it failed."""

    metric: str
    score: float | None
    n_examples: int = 0
    status: str = "ok"            # "ok" | "failed"
    reason: str | None = None     # why it failed (timeout, exit status, missing metric, ...)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def failed(cls, metric: str, reason: str, *, seconds: float = 0.0, **details: Any) -> "EvalResult":
        return cls(metric=metric, score=None, status="failed", reason=reason, seconds=seconds, details=details)


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer in memory (``path`` is where it came from, if anywhere)."""

    model: Any
    tokenizer: Any
    path: Path | None = None


@dataclass(frozen=True)
class TaskData:
    """What an evaluator needs to know about a task (a subset of a catalog task row)."""

    name: str
    data_path: Path | None = None
    eval_command: str | None = None
    metric_path: str | None = None
    options: Mapping[str, Any] | None = None  # the evaluator's own settings (a task row's eval_options JSON)

    @classmethod
    def from_mapping(cls, task: Mapping[str, Any]) -> "TaskData":
        data = task.get("data_path") or task.get("data")
        options = task.get("eval_options")
        if isinstance(options, str):
            options = json.loads(options)
        return cls(name=str(task.get("name", "task")), data_path=Path(data) if data else None,
                   eval_command=task.get("eval_command"), metric_path=task.get("metric_path"), options=options)


class Evaluator:
    """Interface of an evaluator: a registry name and :meth:`evaluate`."""

    name: str = ""

    def evaluate(self, model: "LoadedModel | str | os.PathLike", task: TaskData, *,
                 limit: int | None = None, **options: Any) -> EvalResult:  # pragma: no cover - interface
        raise NotImplementedError


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars (loading, saving) for the block: they would mix into JSON output."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_model(path: str | os.PathLike, *, device: str = "cpu") -> LoadedModel:
    """Load a Hugging Face checkpoint directory (model and tokenizer) from disk, never from the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise InvalidCheckpoint(f"{p}: not a checkpoint directory (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InvalidCheckpoint(f"{p}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    import torch

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32).to(device)
    model.eval()
    return LoadedModel(model, tok, p)


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """Read ``{"prompt", "answer"}`` JSON lines (the catalog's reader); errors name the file and the line."""
    from ..catalog import read_jsonl

    rows = read_jsonl(path, need=("prompt", "answer"))
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows[:limit]]


def finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
