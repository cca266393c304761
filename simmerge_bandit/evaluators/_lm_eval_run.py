"""The child process of the lm-eval evaluator: ``python -m simmerge_bandit.evaluators._lm_eval_run SPEC OUT``.

Runs ``lm_eval.simple_evaluate`` as :mod:`.lm_eval` describes and writes lm-eval's results JSON (without per-sample
logs) to OUT, or ``{"error": "one line"}`` when the task cannot run. Its parent sets the offline environment before
this process imports anything of Hugging Face's, which is why this is a process of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(spec: dict) -> dict:
    from .lm_eval import EVALUATE_KEYS, _find, _one_line, parse_args

    task, include = spec["task"], spec.get("include")
    try:
        tm, entry = _find(task, include)
    except Exception as e:
        return {"error": f"lm-eval could not index its tasks: {_one_line(e)}"}
    if entry is None:
        return {"error": f"unknown lm-eval task {task!r}"}
    args = parse_args(spec.get("args"))
    evaluate_args = {k: v for k, v in args.items() if k in EVALUATE_KEYS}
    model_args = {k: v for k, v in args.items() if k not in EVALUATE_KEYS}

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_arg_string, handle_non_serializable

    device = _device(spec.get("device"))
    model_kwargs = {"batch_size": 16, **{k: handle_arg_string(v) for k, v in model_args.items()}}
    try:
        lm = HFLM(pretrained=spec["model"], device=device, **model_kwargs)
    except Exception as e:
        return {"error": f"lm-eval could not load {spec['model']}: {_one_line(e)}"}
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=spec.get("limit"),
                                      log_samples=False,
                                      **{k: handle_arg_string(v) for k, v in evaluate_args.items()})
    except ConnectionError as e:  # datasets' offline error: what is missing, and that nothing downloads here
        return {"error": f"lm-eval task {task!r} needs the network ({_one_line(e)}); nothing is downloaded here: "
                         f"put its data set in the Hugging Face cache, or write a custom task over a local file"}
    except Exception as e:
        return {"error": f"lm-eval failed on {task!r}: {type(e).__name__}: {_one_line(e)}"}
    if res is None:
        return {"error": "lm-eval returned no results"}
    res.pop("samples", None)
    doc = json.loads(json.dumps(res, default=handle_non_serializable))
    doc["device"] = device
    return doc


def main(argv: list[str]) -> int:
    spec_file, out_file = argv
    doc = run(json.loads(Path(spec_file).read_text(encoding="utf-8")))
    Path(out_file).write_text(json.dumps(doc), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
