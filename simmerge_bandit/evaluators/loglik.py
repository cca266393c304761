"""Answer log-likelihood: how much probability a model puts on the reference answers.

The score is ``exp(mean log p(answer token | prompt, previous answer tokens))`` over all answer tokens of the
data file: the geometric-mean per-token probability, in (0, 1] and higher-is-better like every score here, so
that it can be normalized by a ratio. The raw mean log-likelihood is kept in ``details["mean_loglik"]``.
Prompt and answer are tokenized separately (the context/continuation split that lm-eval-harness uses).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .base import EvalResult, Evaluator, LoadedModel, TaskData, Timer, load_model, read_examples
from .exact_match import _pad_id


def answer_logprobs(model, tokenizer, rows: Sequence[dict[str, str]], *, batch_size: int = 128
                    ) -> tuple[float, int]:
    """Sum of answer-token log-probabilities over ``rows`` and the number of answer tokens."""
    import torch

    seqs = []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        seqs.append((p, a))
    total, count = 0.0, 0
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [seqs[i] for i in order[start:start + batch_size]]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            target = torch.zeros_like(ids, dtype=torch.bool)
            for j, (p, a) in enumerate(batch):
                x = p + a
                ids[j, width - len(x):] = torch.tensor(x, dtype=torch.long)
                mask[j, width - len(x):] = 1
                if a:
                    target[j, width - len(a):] = True
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok = logp.gather(-1, ids[:, 1:, None].to(device))[..., 0]
            sel = target[:, 1:].to(device)
            total += float(tok[sel].sum())
            count += int(sel.sum())
    return total, count


def loglik_score(model, tokenizer, rows: Sequence[dict[str, str]], *, batch_size: int = 128) -> tuple[float, float]:
    """``(score, mean_loglik)`` where score = exp(mean answer-token log-likelihood)."""
    total, count = answer_logprobs(model, tokenizer, rows, batch_size=batch_size)
    mean = total / max(count, 1)
    return math.exp(mean), mean


class LogLik(Evaluator):
    """Geometric-mean probability of the answer tokens (see the module docstring)."""

    name = "loglik"

    def evaluate(self, model: Any, task: TaskData, *, limit: int | None = None, batch_size: int = 128,
                 **_: Any) -> EvalResult:
        if task.data_path is None:
            from ..errors import InvalidInput

            raise InvalidInput(f"task {task.name!r} has no data file for loglik")
        rows = read_examples(task.data_path, limit)
        with Timer() as t:
            lm = model if isinstance(model, LoadedModel) else load_model(model)
            score, mean = loglik_score(lm.model, lm.tokenizer, rows, batch_size=batch_size)
        if not math.isfinite(mean):
            return EvalResult.failed(self.name, f"non-finite log-likelihood ({mean})", seconds=t.seconds)
        return EvalResult(metric=self.name, score=score, n_examples=len(rows), seconds=t.seconds,
                          details={"mean_loglik": mean})


EVALUATOR = LogLik()
