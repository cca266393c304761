"""External evaluation: run a command per evaluation and read one number out of the JSON it writes.

The task's ``eval_command`` is a template. Placeholders (each substituted shell-quoted):

- ``{model}``: the checkpoint directory being evaluated
- ``{task}``: the task name
- ``{data}``: the task's data file (may be empty when the task has none)
- ``{output}``: a fresh JSON file the command should write; without it, the command's stdout is read as JSON

For example, an lm-eval-harness call::

    lm_eval --model hf --model_args pretrained={model} --tasks arc_easy --output_path {output}

with metric path ``results.arc_easy.acc,none``. The metric path is dotted; keys may themselves contain dots
(the longest matching key wins) and list items are addressed by their index.

The command runs through ``/bin/sh`` in its own process group, with a time limit; its output is captured
(the last few kilobytes are kept in the result). Any failure (timeout, non-zero exit, missing or invalid JSON,
a metric that is absent or not a finite number) comes back as a failed :class:`EvalResult` with the reason.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from .base import EvalResult, Evaluator, LoadedModel, TaskData

DEFAULT_TIMEOUT = 3600.0
_KEEP = 4000  # characters of stdout / stderr kept in the result


def resolve_metric(obj: Any, path: str) -> Any:
    """Follow a dotted ``path`` into parsed JSON; keys containing dots are matched longest-first.

    Raises ``KeyError`` naming the part that is missing.
    """
    if path == "":
        return obj
    if isinstance(obj, dict):
        if path in obj:
            return obj[path]
        # Longest key first, so that "acc,none" or "mmlu.high_school" can be keys of their own.
        cuts = [i for i, c in enumerate(path) if c == "."]
        for i in reversed(cuts):
            head = path[:i]
            if head in obj:
                try:
                    return resolve_metric(obj[head], path[i + 1:])
                except KeyError:
                    continue
        raise KeyError(path)
    if isinstance(obj, list):
        head, _, rest = path.partition(".")
        if head.lstrip("-").isdigit() and -len(obj) <= int(head) < len(obj):
            return resolve_metric(obj[int(head)], rest)
    raise KeyError(path)


def _tail(text: str) -> str:
    return text[-_KEEP:]


def _parse_json(text: str) -> Any:
    """Parse a whole JSON document, else the last line that parses (tools often log before their result)."""
    try:
        return json.loads(text)
    except ValueError:
        for line in reversed(text.strip().splitlines()):
            line = line.strip()
            if line.startswith(("{", "[")):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
    raise ValueError("no JSON document found")


def render_command(template: str, *, model: str, task: str, data: str, output: str) -> str:
    """Substitute the placeholders of ``template`` (shell-quoted); unknown placeholders are an error."""
    values = {"model": model, "task": task, "data": data, "output": output}
    try:
        return template.format_map({k: shlex.quote(v) for k, v in values.items()})
    except (KeyError, IndexError) as e:
        raise InvalidInput(f"eval command has an unknown placeholder {e}; known: "
                           + ", ".join("{" + k + "}" for k in values)) from None
    except ValueError as e:
        raise InvalidInput(f"eval command is not a valid template ({e}); write literal braces as {{{{ }}}}") from None



def run_group(argv: list[str], *, env: dict, timeout: float, merge_stderr: bool = False):
    """Run ``argv`` in a process group of its own, text output captured; past ``timeout`` seconds kill the whole
    group (an evaluation may have started children: a harness, a server). Returns ``(proc, stdout, stderr,
    timed_out)`` (``stderr`` is None with ``merge_stderr``: it is in ``stdout``)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc, stdout, stderr, False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        return proc, stdout, stderr, True

class External(Evaluator):
    """Run the task's ``eval_command`` and read ``metric_path`` from its JSON (see the module docstring)."""

    name = "external"

    def evaluate(self, model: Any, task: TaskData, *, limit: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, **_: Any) -> EvalResult:
        if not task.eval_command or not task.metric_path:
            raise InvalidInput(f"task {task.name!r} has no eval command and metric path for the external evaluator")
        path = model.path if isinstance(model, LoadedModel) else Path(model)
        if path is None:
            return EvalResult.failed(self.name, "the external evaluator needs a checkpoint on disk")
        with tempfile.TemporaryDirectory(prefix="simmerge-eval-") as tmp:
            out_file = Path(tmp) / "result.json"
            cmd = render_command(task.eval_command, model=str(path), task=task.name,
                                 data=str(task.data_path or ""), output=str(out_file))
            uses_output = "{output}" in task.eval_command
            env = dict(os.environ, SIMMERGE_EVAL_MODEL=str(path), SIMMERGE_EVAL_TASK=task.name)
            start = time.perf_counter()
            proc, stdout, stderr, timed_out = run_group(["/bin/sh", "-c", cmd], env=env, timeout=timeout)
            if timed_out:
                return EvalResult.failed(self.name, f"timed out after {timeout:g} s",
                                         seconds=time.perf_counter() - start, command=cmd,
                                         stdout=_tail(stdout or ""), stderr=_tail(stderr or ""))
            seconds = time.perf_counter() - start
            captured = {"command": cmd, "stdout": _tail(stdout), "stderr": _tail(stderr),
                        "returncode": proc.returncode}
            if proc.returncode != 0:
                last = next((ln for ln in reversed(stderr.strip().splitlines()) if ln.strip()), "")
                reason = f"command exited with status {proc.returncode}" + (f": {last.strip()}" if last else "")
                return EvalResult.failed(self.name, reason, seconds=seconds, **captured)
            try:
                if uses_output:
                    if not out_file.is_file():
                        return EvalResult.failed(self.name, "command did not write {output}", seconds=seconds,
                                                 **captured)
                    doc = _parse_json(out_file.read_text(encoding="utf-8", errors="replace"))
                else:
                    doc = _parse_json(stdout)
            except ValueError as e:
                return EvalResult.failed(self.name, f"output is not JSON ({e})", seconds=seconds, **captured)
            try:
                value = resolve_metric(doc, task.metric_path)
            except KeyError:
                return EvalResult.failed(self.name, f"metric path {task.metric_path!r} not found in the output",
                                         seconds=seconds, **captured)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return EvalResult.failed(self.name, f"metric {task.metric_path!r} is not a finite number: "
                                                    f"{value!r}"[:200], seconds=seconds, **captured)
            return EvalResult(metric=self.name, score=float(value), seconds=seconds, details=captured)


EVALUATOR = External()
