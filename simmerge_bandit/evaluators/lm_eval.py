"""lm-evaluation-harness as an evaluator: a task scored by an lm-eval task and one of its metrics.

A task added with ``--metric lm-eval`` keeps its lm-eval settings in the task row's ``eval_options``::

    {"task": "arc_easy", "metric": "acc,none", "include": "/abs/dir" | None, "args": "num_fewshot=5" | None}

- ``task``: an lm-eval task or group name, looked up in ``include`` (a folder of custom task YAML) when it is
  given, else among lm-eval's own tasks.
- ``metric``: the key of the score in lm-eval's results for that task, ``NAME,FILTER`` (``acc,none``,
  ``exact_match,strict-match``); given as ``NAME`` it means ``NAME,none``, or the one filter the task has. Without
  it, the task's first metric. It must be higher-is-better, like every score here.
- ``args``: ``key=value,...``. Keys of :data:`EVALUATE_KEYS` go to ``lm_eval.simple_evaluate``; the others are
  arguments of lm-eval's Hugging Face model (``HFLM``, as lm-eval's ``--model_args``: ``dtype=bfloat16``,
  ``batch_size=8``, ``add_bos_token=True``, ...).

Evaluating runs ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=<the checkpoint directory>, device=...)`` (lm-eval's
"hf" model: ``AutoModelForCausalLM`` and the checkpoint's own tokenizer) in a child process, started with the
Hugging Face libraries in offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``,
``HF_EVALUATE_OFFLINE``) and a time limit: nothing downloads, a task whose data set is not on this machine fails
with lm-eval's own "couldn't reach" message, and one that would wait on the network is stopped by the limit. The
device is the one the job runs on: CUDA when the process sees a GPU, else the CPU (``device=`` overrides). The full
results JSON (``results``, ``configs``, ``versions``, ``n-samples``, ``higher_is_better``, ``config``; no per-sample
logs) comes back in the result's ``details["lm_eval"]``.

Task names are checked when a task is added, in this process (lm-eval's task index, cached per include folder);
only running a model needs the child. :func:`export_tasks` writes catalog tasks as lm-eval custom tasks over their
local data files, scored as :mod:`.exact_match` scores them (greedy generation, cut at the end-of-sequence token
and the first newline, stripped), so the two evaluators check each other.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import InvalidInput
from .base import EvalResult, Evaluator, LoadedModel, TaskData
from .external import run_group

NAME = "lm-eval"
DEFAULT_TIMEOUT = 3600.0
INSTALL_HINT = "pip install 'simmerge-bandit[lm-eval]'"
#: ``--lm-eval-args`` keys that are arguments of ``simple_evaluate``; every other key goes to lm-eval's HF model.
EVALUATE_KEYS = frozenset({"num_fewshot", "fewshot_random_seed", "random_seed", "numpy_random_seed",
                           "torch_random_seed", "apply_chat_template", "fewshot_as_multiturn", "system_instruction",
                           "bootstrap_iters"})
#: Model arguments that name something to fetch from the Hugging Face Hub unless they are local paths.
LOCAL_PATH_KEYS = ("tokenizer", "peft", "delta")
#: Arguments that let a task or a model run code from outside this package (refused through a daemon's API unless
#: it allows evaluation commands).
CODE_KEYS = frozenset({"trust_remote_code", "confirm_run_unsafe_code"})
#: Environment of the child process: the Hugging Face libraries never reach the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_KEEP = 4000  # characters of the child's output kept in a failed result


def installed() -> bool:
    """Whether lm-evaluation-harness can be imported here (without importing it: that takes seconds)."""
    return importlib.util.find_spec("lm_eval") is not None


def _require_installed() -> None:
    if not installed():
        raise InvalidInput(f"metric {NAME!r} needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------------------------
# task options


def parse_args(text: str | None) -> dict[str, str]:
    """``key=value,...`` as a dict of strings (lm-eval converts the values), refusing what would download.

    >>> parse_args("num_fewshot=5,dtype=bfloat16")
    {'num_fewshot': '5', 'dtype': 'bfloat16'}
    """
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise InvalidInput(f"lm-eval args are key=value pairs separated by commas, got {part.strip()!r}")
        if key in out:
            raise InvalidInput(f"lm-eval arg {key!r} is given twice")
        if key == "pretrained":
            raise InvalidInput("lm-eval arg 'pretrained' is the checkpoint being evaluated; it is not an argument")
        if key in ("device", "limit"):
            raise InvalidInput(f"lm-eval arg {key!r} is set per evaluation (the job's device, --limit)")
        if key == "revision":
            raise InvalidInput("lm-eval arg 'revision' names a Hub revision, and nothing is downloaded here")
        if key in LOCAL_PATH_KEYS and not Path(value).expanduser().exists():
            raise InvalidInput(f"lm-eval arg {key}={value!r} is not a path on this machine: a Hub name would be "
                               f"downloaded, and nothing is downloaded here")
        out[key] = value
    return out


def task_options(task: str | None, *, metric: str | None = None, include: str | os.PathLike | None = None,
                 args: str | None = None) -> dict[str, Any]:
    """The ``eval_options`` of an lm-eval task from the ``task add`` flags, checked for what needs no lm-eval."""
    if not task or not str(task).strip():
        raise InvalidInput(f"metric {NAME!r} needs an lm-eval task (--lm-eval-task)")
    inc = None
    if include is not None:
        p = Path(include).expanduser()
        if not p.is_dir():
            raise InvalidInput(f"{p}: no such directory (--lm-eval-include is a folder of lm-eval task YAML)")
        inc = str(p.resolve())
    parse_args(args)
    return {"task": str(task).strip(), "metric": metric.strip() if metric else None, "include": inc,
            "args": args.strip() if args and args.strip() else None}


def runs_code(options: Mapping[str, Any] | None) -> bool:
    """Whether these options may run code from outside this package: custom task YAML can name Python functions
    (``!function``), and some arguments allow a model's or a task's own code."""
    if not options:
        return False
    if options.get("include"):
        return True
    try:
        return any(k in CODE_KEYS for k in parse_args(options.get("args")))
    except InvalidInput:
        return True


def _index_stamp(include: str | None) -> tuple:
    """What the cached task index of ``include`` depends on: its YAML files and their modification times."""
    if not include:
        return ()
    root = Path(include)
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*.y*ml")))


@lru_cache(maxsize=8)
def _task_manager(include: str | None, with_defaults: bool, stamp: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=with_defaults)


def _find(task: str, include: str | None):
    """lm-eval's TaskManager over ``include``'s folder alone when there is one, else over lm-eval's own tasks, and
    the index entry of ``task`` in it (None if unknown). One folder or the other, not both: indexing lm-eval's own
    thousands of tasks takes over ten seconds of CPU, and a custom task then depends on its folder only."""
    tm = _task_manager(include, not include, _index_stamp(include))
    return tm, tm.task_index.get(task)


def _metric_keys(cfg: Mapping[str, Any]) -> tuple[list[str], dict[str, bool]]:
    """The results keys (``metric,filter``) a task config gives, and which metrics are higher-is-better."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    listed = cfg.get("metric_list")
    if listed:
        names = [m["metric"] for m in listed if isinstance(m, Mapping) and isinstance(m.get("metric"), str)]
        better = {m["metric"]: bool(m.get("higher_is_better", True)) for m in listed
                  if isinstance(m, Mapping) and isinstance(m.get("metric"), str)}
    else:
        names = list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), []))
        better = {}
    filters = [f["name"] for f in cfg.get("filter_list") or [] if isinstance(f, Mapping) and f.get("name")] \
        or ["none"]
    return [f"{m},{f}" for f in filters for m in names], better


def _resolve_metric(metric: str | None, keys: list[str], where: str) -> str:
    if not keys:
        raise InvalidInput(f"{where} lists no metrics; name one with --lm-eval-metric NAME,FILTER")
    if metric is None:
        return keys[0]
    if metric in keys:
        return metric
    if "," not in metric:
        mine = [k for k in keys if k.split(",", 1)[0] == metric]
        if f"{metric},none" in mine:
            return f"{metric},none"
        if len(mine) == 1:
            return mine[0]
        if mine:
            raise InvalidInput(f"lm-eval metric {metric!r} of {where} has several filters; name one of: "
                               + ", ".join(mine))
    raise InvalidInput(f"unknown lm-eval metric {metric!r} for {where}; it has: {', '.join(keys)}")


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check an lm-eval task's options against lm-eval's task index and return them with the metric resolved
    (``acc`` -> ``acc,none``; none given -> the task's first metric). One-line :class:`InvalidInput` for a missing
    install, an unknown task or metric, a lower-is-better metric or an argument that would download."""
    if not isinstance(options, Mapping):
        raise InvalidInput(f"metric {NAME!r} needs an lm-eval task (--lm-eval-task)")
    opts = task_options(options.get("task"), metric=options.get("metric"), include=options.get("include"),
                        args=options.get("args"))
    _require_installed()
    task = opts["task"]
    try:
        tm, entry = _find(task, opts["include"])
    except Exception as e:  # a YAML file lm-eval cannot read: its message, on one line
        raise InvalidInput(f"lm-eval could not index its tasks: {_one_line(e)}") from None
    if entry is None:
        where = f"in {opts['include']}" if opts["include"] else "among lm-eval's tasks"
        close = difflib.get_close_matches(task, tm.all_tasks, n=3)
        raise InvalidInput(f"unknown lm-eval task {task!r} ({where})"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
    cfg = entry.cfg if getattr(entry.kind, "name", "") in ("TASK",) and isinstance(entry.cfg, Mapping) else None
    if cfg is None:  # a group, a tag or a Python task: its metrics are known once it has run
        if opts["metric"] is None:
            raise InvalidInput(f"lm-eval task {task!r} is a group or a Python task; name its metric with "
                               f"--lm-eval-metric")
        return opts
    keys, better = _metric_keys(cfg)
    key = _resolve_metric(opts["metric"], keys, f"lm-eval task {task!r}")
    if not better.get(key.split(",", 1)[0], True) or key.split(",", 1)[0] in ("perplexity", "word_perplexity",
                                                                             "byte_perplexity", "bits_per_byte"):
        raise InvalidInput(f"lm-eval metric {key!r} is lower-is-better; scores here are higher-is-better")
    return {**opts, "metric": key}


# ---------------------------------------------------------------------------------------------------------------
# custom tasks over the catalog's files


def answer_budget(path: str | os.PathLike, tokenizer=None) -> int:
    """The exact_match evaluator's generation budget for a data file: the longest answer's token count + 1
    (characters without ``tokenizer``: the micro-zoo's tokenizer has one token per character)."""
    from ..taskfiles import iter_jsonl

    longest = 0
    for r in iter_jsonl(path, need=("prompt", "answer")):
        n = len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) if tokenizer else len(r["answer"])
        longest = max(longest, n)
    return longest + 1


def task_yaml(name: str, data_path: str | os.PathLike, max_gen_toks: int) -> dict[str, Any]:
    """An lm-eval custom task over a ``{"prompt", "answer"}`` JSON-lines file, scored as :mod:`.exact_match` does:
    the prompt as it is (no few-shot, no chat template), greedy generation of at most ``max_gen_toks`` tokens cut at
    the end-of-sequence token and the first newline, exact match after stripping surrounding whitespace."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_path).resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        "num_fewshot": 0,
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": int(max_gen_toks)},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
        "metadata": {"version": 1.0, "source": "simmerge zoo export-lm-eval"},
    }


def export_tasks(tasks: Iterable[Mapping[str, Any]], directory: str | os.PathLike, *,
                 tokenizer_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Write each catalog task (rows with ``name`` and ``data_path``) as ``DIRECTORY/NAME.yaml``, an lm-eval
    custom task of the same name over the task's local data file (see :func:`task_yaml`). The generation budget
    counts answer tokens with the tokenizer of ``tokenizer_path`` (a checkpoint directory), else characters.
    Returns what was written: ``{"task", "path", "max_gen_toks", "data_path"}`` per task."""
    import yaml

    tok = None
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(Path(tokenizer_path).expanduser(), local_files_only=True)
        except (OSError, ValueError) as e:
            raise InvalidInput(f"{tokenizer_path}: no usable tokenizer ({_one_line(e)})") from None
    rows = list(tasks)
    out_dir = Path(directory).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir}: exists and is not a directory")
    plans = []
    for t in rows:
        budget = answer_budget(t["data_path"], tok)
        plans.append((t, budget))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for t, budget in plans:
        path = out_dir / f"{t['name']}.yaml"
        doc = task_yaml(t["name"], t["data_path"], budget)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(f"# lm-eval custom task written by `simmerge zoo export-lm-eval` from task {t['name']!r}\n"
                       + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        os.replace(tmp, path)
        written.append({"task": t["name"], "path": str(path), "max_gen_toks": budget, "data_path": doc[
            "dataset_kwargs"]["data_files"]["test"]})
    return written


# ---------------------------------------------------------------------------------------------------------------
# the evaluator


def _one_line(e: BaseException | str) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())[:500]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[-1].split())[:500] if lines else ""


class LmEval(Evaluator):
    """Score a checkpoint with an lm-evaluation-harness task (see the module docstring)."""

    name = NAME

    def evaluate(self, model: Any, task: TaskData, *, limit: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                 device: str | None = None, **_: Any) -> EvalResult:
        options = task.options
        if not isinstance(options, Mapping) or not options.get("task"):
            raise InvalidInput(f"task {task.name!r} has no lm-eval task for the {NAME} evaluator (add it with "
                               f"--metric {NAME} --lm-eval-task TASK)")
        if not installed():
            return EvalResult.failed(self.name, f"lm-evaluation-harness is not installed: {INSTALL_HINT}")
        path = model.path if isinstance(model, LoadedModel) else Path(model)
        if path is None:
            return EvalResult.failed(self.name, f"the {NAME} evaluator needs a checkpoint on disk")
        spec = {"model": str(Path(path).resolve()), "task": options["task"], "metric": options.get("metric"),
                "include": options.get("include"), "args": options.get("args"), "limit": limit,
                "device": device if device not in (None, "auto") else None}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="simmerge-lm-eval-") as tmp:
            spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "results.json"
            spec_file.write_text(json.dumps(spec), encoding="utf-8")
            env = {**os.environ, **OFFLINE_ENV}
            argv = [sys.executable, "-m", "simmerge_bandit.evaluators._lm_eval_run", str(spec_file), str(out_file)]
            proc, output, _, timed_out = run_group(argv, env=env, timeout=timeout, merge_stderr=True)
            if timed_out:
                return EvalResult.failed(self.name, f"lm-eval timed out after {timeout:g} s (a task that waits on "
                                                    f"the network never finishes here)",
                                         seconds=time.perf_counter() - start, output=(output or "")[-_KEEP:])
            seconds = time.perf_counter() - start
            try:
                doc = json.loads(out_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                last = _last_line(output or "")
                return EvalResult.failed(self.name, f"lm-eval exited with status {proc.returncode}"
                                         + (f": {last}" if last else ""), seconds=seconds,
                                         output=(output or "")[-_KEEP:])
        if "error" in doc:
            return EvalResult.failed(self.name, doc["error"], seconds=seconds, output=(output or "")[-_KEEP:])
        return score_of(doc, spec["task"], spec["metric"], seconds=seconds, device=doc.get("device"))


def score_of(doc: Mapping[str, Any], task: str, metric: str | None, *, seconds: float = 0.0,
             device: str | None = None) -> EvalResult:
    """The :class:`EvalResult` of lm-eval's results JSON ``doc`` for ``task`` and its results key ``metric``."""
    results = (doc.get("results") or {}).get(task)
    if not isinstance(results, Mapping):
        return EvalResult.failed(NAME, f"lm-eval's results have no entry for task {task!r}", seconds=seconds,
                                 lm_eval=dict(doc))
    keys = [k for k in results if "," in k and "_stderr," not in k]
    try:
        key = _resolve_metric(metric, keys, f"lm-eval task {task!r}")
    except InvalidInput as e:
        return EvalResult.failed(NAME, str(e), seconds=seconds, lm_eval=dict(doc))
    value = results[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return EvalResult.failed(NAME, f"lm-eval metric {key!r} of {task!r} is not a finite number: {value!r}"[:300],
                                 seconds=seconds, lm_eval=dict(doc))
    better = ((doc.get("higher_is_better") or {}).get(task) or {}).get(key.split(",", 1)[0])
    if better is False:
        return EvalResult.failed(NAME, f"lm-eval metric {key!r} is lower-is-better; scores here are "
                                       f"higher-is-better", seconds=seconds, lm_eval=dict(doc))
    counts = (doc.get("n-samples") or {}).get(task) or {}
    n = counts.get("effective")
    if n is None:  # a group: the sum over its tasks
        subtasks = (doc.get("group_subtasks") or {}).get(task) or []
        n = sum(((doc.get("n-samples") or {}).get(s) or {}).get("effective", 0) for s in subtasks)
    return EvalResult(metric=NAME, score=float(value), n_examples=int(n or 0), seconds=seconds,
                      details={"lm_eval_task": task, "lm_eval_metric": key, "device": device, "lm_eval": dict(doc)})


EVALUATOR = LmEval()
