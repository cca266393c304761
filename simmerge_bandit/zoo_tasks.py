"""Synthetic text tasks of the micro-zoo: every answer can be checked exactly.

Each task turns a seeded :class:`random.Random` into one ``(prompt, answer)`` pair. Prompts start with a short
task tag and end with ``=`` so that one model can hold several skills and a merge can be asked for any of them.
Tasks come in families that share sub-skills (letter transforms, digit manipulation, counting), so that experts
of related tasks are closer to each other than experts of unrelated ones: the zoo needs pairs of every degree of
similarity.

>>> import random
>>> TASKS["add"].sample(random.Random(0))            # doctest: +SKIP
('add:49+97=', '146')
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from .errors import InvalidInput

LETTERS = string.ascii_lowercase[:12]   # a small alphabet keeps the tasks learnable by a 100k-parameter model
DIGITS = string.digits


@dataclass(frozen=True)
class SynthTask:
    """A synthetic task: its name, family and sampler."""

    name: str
    family: str
    sampler: Callable[[random.Random], tuple[str, str]]
    description: str

    def sample(self, rng: random.Random) -> tuple[str, str]:
        return self.sampler(rng)


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add:{a}+{b}=", str(a + b)


def _rev(rng):
    w = _word(rng, 3, 6)
    return f"rev:{w}=", w[::-1]


def _copy(rng):
    w = _word(rng, 3, 7)
    return f"cpy:{w}=", w


def _shift(rng):
    # Caesar shift by one inside the small alphabet: a per-character mapping.
    w = _word(rng, 3, 6)
    return f"shf:{w}=", "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in w)


def _upper(rng):
    w = _word(rng, 3, 6)
    return f"upc:{w}=", w.upper()


def _sort(rng):
    w = _word(rng, 3, 6, DIGITS)
    return f"srt:{w}=", "".join(sorted(w))


def _max(rng):
    w = _word(rng, 3, 7, DIGITS)
    return f"max:{w}=", max(w)


def _count(rng):
    target = rng.choice(LETTERS[:4])
    w = _word(rng, 4, 8, LETTERS[:4])
    return f"cnt:{target}|{w}=", str(w.count(target))


def _dup(rng):
    w = _word(rng, 2, 5)
    return f"dup:{w}=", "".join(c + c for c in w)


def _dsum(rng):
    w = _word(rng, 2, 5, DIGITS)
    return f"dsm:{w}=", str(sum(int(c) for c in w))


def _rev_short(rng):
    w = _word(rng, 2, 4)
    return f"rv2:{w}=", w[::-1]


def _dup_long(rng):
    w = _word(rng, 4, 7)
    return f"dpl:{w}=", "".join(c + c for c in w)


TASKS: dict[str, SynthTask] = {t.name: t for t in (
    SynthTask("add", "digits", _add, "sum of two numbers below 100"),
    SynthTask("rev", "letters", _rev, "reverse a word"),
    SynthTask("copy", "letters", _copy, "repeat a word"),
    SynthTask("shift", "letters", _shift, "shift each letter by one (a->b, l->a)"),
    SynthTask("upper", "letters", _upper, "upper-case a word"),
    SynthTask("sort", "digits", _sort, "sort the digits"),
    SynthTask("max", "digits", _max, "largest digit"),
    SynthTask("count", "counting", _count, "how often a letter occurs in a word"),
    SynthTask("dup", "letters", _dup, "double every letter"),
    SynthTask("dsum", "digits", _dsum, "sum of the digits"),
    SynthTask("rev_short", "letters", _rev_short, "reverse a word of 2-4 letters"),
    SynthTask("dup_long", "letters", _dup_long, "double every letter of a word of 4-7 letters"),
)}


def task_rows(name: str, n: int, seed: int, *, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` distinct examples of task ``name`` (``{"prompt", "answer"}``), none of whose prompts is in ``exclude``.

    Distinct prompts keep the eval split honest: a prompt seen in training never reappears in evaluation.
    """
    task = TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    seen = set(exclude or ())
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise InvalidInput(f"task {name!r} has too few distinct prompts for {n} examples")
        prompt, answer = task.sample(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer})
    return rows
