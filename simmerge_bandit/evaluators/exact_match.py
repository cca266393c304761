"""Exact match: greedy generation, batched, compared with the answer after trimming.

A generation is cut at the end-of-sequence token and at the first stop string (a newline by default), stripped
of surrounding whitespace and compared with the stripped answer. The generation budget is the longest answer's
token count plus one, which is exactly enough to see whether a model stops after the answer.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from .base import EvalResult, Evaluator, LoadedModel, TaskData, Timer, load_model, read_examples

DEFAULT_STOP = ("\n",)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def encode_left_padded(tokenizer, texts: Sequence[str]):
    """Token ids, attention mask and position ids of ``texts``, padded on the left (positions start at 0)."""
    import torch

    ids = tokenizer(list(texts))["input_ids"]   # one batch call: the same ids as one call per text
    width = max(len(x) for x in ids)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


def _cache_kwarg(model) -> str:
    """The name under which this transformers version takes the KV cache (``cache`` since 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                    batch_size: int = 128) -> list[list[int]]:
    """Greedy continuations (token ids, without the prompt) of ``prompts``, with a KV cache.

    Prompts are sorted by length into batches so that little compute goes to padding; the result is in the
    order of ``prompts``. Generation of a row stops at the end-of-sequence token.
    """
    import torch

    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            input_ids, mask, positions = (t.to(device) for t in
                                          encode_left_padded(tokenizer, [prompts[i] for i in idx]))
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            past = None
            gen = []
            for _ in range(max_new_tokens):
                res = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{cache_kw: past}, **extra)
                past = res.get(cache_kw)
                nxt = res.logits[:, -1, :].argmax(-1)
                gen.append(nxt)
                if eos is not None:
                    done |= nxt == eos
                if bool(done.all()):
                    break
                input_ids = nxt[:, None]
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            tokens = torch.stack(gen, dim=1).tolist()
            for row, i in zip(tokens, idx):
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                out[i] = row
    return out


def clean(text: str, stop: Sequence[str] = DEFAULT_STOP) -> str:
    """The part of a generation that is compared: up to the first stop string, stripped."""
    for s in stop:
        if s and s in text:
            text = text[:text.index(s)]
    return text.strip()


def exact_match_score(model, tokenizer, rows: Sequence[dict[str, str]], *, batch_size: int = 128,
                      stop: Sequence[str] = DEFAULT_STOP, max_new_tokens: int | None = None
                      ) -> tuple[float, list[str]]:
    """Fraction of ``rows`` whose greedy generation equals the answer, and the cleaned generations."""
    if max_new_tokens is None:
        longest = max(map(len, tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]))
        max_new_tokens = longest + 1
    gens = greedy_generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size=batch_size)
    texts = [clean(tokenizer.decode(g, skip_special_tokens=True), stop) for g in gens]
    hits = sum(t == r["answer"].strip() for t, r in zip(texts, rows))
    return hits / len(rows), texts


class ExactMatch(Evaluator):
    """Exact match of greedy generations with the answers of the task's data file."""

    name = "exact_match"

    def evaluate(self, model: Any, task: TaskData, *, limit: int | None = None, batch_size: int = 128,
                 stop: Sequence[str] = DEFAULT_STOP, **_: Any) -> EvalResult:
        if task.data_path is None:
            from ..errors import InvalidInput

            raise InvalidInput(f"task {task.name!r} has no data file for exact_match")
        rows = read_examples(task.data_path, limit)
        with Timer() as t:
            lm = model if isinstance(model, LoadedModel) else load_model(model)
            score, texts = exact_match_score(lm.model, lm.tokenizer, rows, batch_size=batch_size, stop=stop)
        wrong = [{"prompt": r["prompt"], "answer": r["answer"], "output": x}
                 for r, x in zip(rows, texts) if x != r["answer"].strip()][:5]
        return EvalResult(metric=self.name, score=score, n_examples=len(rows), seconds=t.seconds,
                          details={"correct": round(score * len(rows)), "examples_wrong": wrong})


EVALUATOR = ExactMatch()
