"""The micro-zoo: a tiny Llama base trained here and fine-tuned into experts on synthetic tasks.

Nothing downloads: the tasks are generated (:mod:`.zoo_tasks`), the tokenizer is the shared character tokenizer,
and every model is a ``LlamaForCausalLM`` saved with ``save_pretrained`` (safetensors + tokenizer), so
``AutoModelForCausalLM`` / ``AutoTokenizer`` load it from disk like any Hugging Face checkpoint.

Layout of a zoo directory::

    zoo.json                      manifest: models (name, path, base, tasks, scores), tasks (files), build key
    tasks/<task>/train.jsonl      {"prompt", "answer"}
    tasks/<task>/eval.jsonl       {"prompt", "answer"}, no prompt shared with train
    tasks/<task>/probes.jsonl     {"prompt"} unlabeled prompts (for similarity signals)
    models/<name>/                checkpoint directories

Builds are deterministic (same seed and machine give byte-identical weights: one CPU thread, seeded generators)
and cached (a second build with the same arguments and code returns the manifest at once; a changed preset
retrains only the models whose recipe changed).

>>> manifest = build_zoo("/tmp/zoo", preset="test")      # doctest: +SKIP
>>> [m["name"] for m in manifest["models"]][:3]           # doctest: +SKIP
['base', 'add', 'rev']

Why one module of this size: a zoo directory and its full merge table are one reproducible artifact. The build
key (recipe digest and code version), the presets, the deterministic training loop, the manifest and the table's
columns change together or cached builds and tables silently stop matching the code that reads them; the tasks
are :mod:`.zoo_tasks`. The table's statistics (:func:`case_matrix`, :func:`table_stats`) read those columns and are
the part that could move to a module of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import InvalidInput
from .threads import torch_threads
from .zoo_tasks import TASKS, task_rows

MANIFEST = "zoo.json"
FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# recipes


@dataclass(frozen=True)
class Arch:
    """Size of the zoo's Llama."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 64


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: from scratch (``parent=None``) or fine-tuned from ``parent``.

    ``tasks`` is the training mixture (sampled uniformly per example). ``full_loss`` trains on the whole text
    (prompt included) as pretraining does; fine-tunes learn only the answers. For the tasks in ``shuffle_answers``
    each prompt is paired with the answer of another example of the same task: the model learns the task's
    format (tag, answer alphabet and length, when to stop) but not its skill. ``replay`` is the share of each
    batch drawn from the parent's mixture, trained as the parent was trained (its tasks, loss and shuffled
    answers): a fine-tune that keeps rehearsing what its parent knew forgets little of it, as instruction-tuned
    experts of a pretrained LLM still know what the LLM knew. ``train_only``: when given, only the parameters
    whose names contain one of these strings are trained (e.g. ``("self_attn",)``: an attention-only fine-tune,
    as adapters on the attention projections are); the others keep the parent's values exactly, so the task
    vector is zero there.
    """

    name: str
    tasks: tuple[str, ...]
    parent: str | None
    steps: int
    lr: float
    seed: int = 0
    batch_size: int = 32
    full_loss: bool = False
    shuffle_answers: tuple[str, ...] = ()
    warmup: int = 20
    replay: float = 0.0
    train_only: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preset:
    """A whole zoo: architecture, tasks, data sizes and the models' recipes (parents before children)."""

    name: str
    arch: Arch
    tasks: tuple[str, ...]
    recipes: tuple[Recipe, ...]
    n_train: int = 2000
    n_eval: int = 200
    n_probes: int = 32

    def recipe(self, name: str) -> Recipe:
        return next(r for r in self.recipes if r.name == name)

    def check(self) -> "Preset":
        """Raise :class:`InvalidInput` unless names are unique, parents come first and tasks exist."""
        seen: set[str] = set()
        for r in self.recipes:
            if r.name in seen:
                raise InvalidInput(f"preset {self.name!r}: model {r.name!r} appears twice")
            if r.parent is not None and r.parent not in seen:
                raise InvalidInput(f"preset {self.name!r}: parent {r.parent!r} of {r.name!r} must come before it")
            unknown = [t for t in r.tasks if t not in self.tasks or t not in TASKS]
            if unknown or not r.tasks:
                raise InvalidInput(f"preset {self.name!r}: model {r.name!r} trains on unknown tasks {unknown}")
            if r.steps < 1 or r.lr <= 0 or r.batch_size < 1:
                raise InvalidInput(f"preset {self.name!r}: model {r.name!r} needs steps, lr and batch size > 0")
            if not 0 <= r.replay < 1 or (r.replay and r.parent is None):
                raise InvalidInput(f"preset {self.name!r}: model {r.name!r} needs 0 <= replay < 1, and a parent "
                                   f"to replay from when replay > 0")
            if not all(isinstance(x, str) and x for x in r.train_only):
                raise InvalidInput(f"preset {self.name!r}: model {r.name!r}: train_only must name parameters "
                                   f"by non-empty strings")
            seen.add(r.name)
        if not self.recipes or self.recipes[0].parent is not None:
            raise InvalidInput(f"preset {self.name!r}: the first model must be a base trained from scratch")
        return self


# ---------------------------------------------------------------------------------------------------------------
# training


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def _recipe_dict(r: Recipe) -> dict:
    # Fields added after a zoo was first cached are left out at their default value, so the hashes of the
    # recipes that do not use them (and the caches built from them) stay what they were.
    d = asdict(r)
    if d["replay"] == 0:
        del d["replay"]
    if not d["train_only"]:
        del d["train_only"]
    return d


def _preset_dict(p: Preset) -> dict:
    return {**asdict(p), "recipes": [_recipe_dict(r) for r in p.recipes]}


def recipe_key(preset: Preset, seed: int) -> str:
    """Hash of what a zoo is meant to be (preset and seed), independent of the code that builds it."""
    return _digest({"format": FORMAT, "preset": _preset_dict(preset), "seed": seed})


#: The line of this file after which nothing decides a zoo's bytes (presets, registration, the merge table and
#: its statistics): editing those must not throw away every cached zoo.
_BYTES_END = b"\n# presets (nothing from here on decides a zoo's bytes"


def code_version() -> str:
    """Hash of the code that decides a zoo's bytes (this module up to the presets, the tasks, the tokenizer) and
    of the torch/transformers versions."""
    import torch
    import transformers

    here = Path(__file__).parent
    h = hashlib.blake2b(digest_size=12)
    own = (here / "zoo.py").read_bytes()
    if _BYTES_END not in own:
        raise AssertionError("zoo.py lost the line that ends the code deciding a zoo's bytes")
    h.update(_code_only(own[:own.index(_BYTES_END)]))
    for f in ("zoo_tasks.py", "tokenizer.py"):
        h.update(_code_only((here / f).read_bytes()))
    h.update(f"{torch.__version__}|{transformers.__version__}".encode())
    return h.hexdigest()


def _code_only(source: bytes) -> bytes:
    """The code of a Python source without its docstrings and comments (its syntax tree, without line numbers):
    editing documentation must not throw away every cached zoo."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


@contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """A fixed CPU thread count for the block (the previous one comes back after).

    Training runs on the CPU, whose kernels are deterministic for a given thread count (with one thread, every
    reduction has a single order), so this plus seeded generators makes builds byte-reproducible. It does not
    call ``torch.use_deterministic_algorithms``: that guards CUDA kernels and costs seconds of imports.
    """
    with torch_threads(threads):
        yield


def llama_config(arch: Arch):
    from transformers import LlamaConfig

    from .tokenizer import VOCAB_SIZE, char_tokenizer

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                      num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                      num_key_value_heads=arch.kv_heads, max_position_embeddings=arch.max_positions,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    cfg._attn_implementation = "sdpa"
    return cfg


def _seed_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little") >> 1


class _Encoded:
    """One task's training examples as token ids, with the start of the answer."""

    def __init__(self, tokenizer, rows: Sequence[dict[str, str]]):
        eos = tokenizer.eos_token_id
        self.ids: list[list[int]] = []
        self.answer_start: list[int] = []
        for r in rows:
            p = tokenizer(r["prompt"])["input_ids"]
            a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            self.ids.append(p + a + [eos])
            self.answer_start.append(len(p))


@dataclass(frozen=True)
class Replay:
    """What a fine-tune rehearses: its parent's mixture and whether the parent trained on the whole text."""

    encoded: list[_Encoded]
    full_loss: bool


def _draw(encoded: list[_Encoded], n: int, full_loss: bool, gen, seqs: list, starts: list) -> None:
    import torch

    task_idx = torch.randint(len(encoded), (n,), generator=gen).tolist()
    for t in task_idx:
        e = encoded[t]
        j = int(torch.randint(len(e.ids), (1,), generator=gen))
        seqs.append(e.ids[j])
        starts.append(0 if full_loss else e.answer_start[j])


def _batch(encoded: list[_Encoded], recipe: Recipe, gen, pad: int, replay: Replay | None = None):
    import torch

    n = recipe.batch_size
    # A fixed number of replayed rows per batch (not a coin per row): the same share in every step. Own rows
    # are drawn first, so a recipe without replay draws exactly what it drew before replay existed.
    n_replay = round(recipe.replay * n) if replay is not None else 0
    seqs: list[list[int]] = []
    starts: list[int] = []
    _draw(encoded, n - n_replay, recipe.full_loss, gen, seqs, starts)
    if n_replay:
        _draw(replay.encoded, n_replay, replay.full_loss, gen, seqs, starts)
    width = max(len(s) for s in seqs)
    ids = torch.full((n, width), pad, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, st:len(s)] = torch.tensor(s[st:])
    return ids, labels


def train(model, recipe: Recipe, encoded: list[_Encoded], *, seed: int, pad: int, progress=None,
          replay: Replay | None = None) -> float:
    """Train ``model`` in place by ``recipe`` (rehearsing ``replay`` when the recipe asks for it); return the
    mean loss of the last 10% of steps."""
    import torch

    gen = torch.Generator().manual_seed(_seed_int("batches", seed, recipe.name, recipe.seed))
    params = [p for n, p in model.named_parameters()
              if not recipe.train_only or any(s in n for s in recipe.train_only)]
    if not params:
        raise InvalidInput(f"model {recipe.name!r}: no parameter name contains any of {list(recipe.train_only)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, min(recipe.warmup, recipe.steps // 4))

    def schedule(step: int) -> float:
        # Linear warmup, then linear decay to a tenth: longer recipes travel further from their parent.
        if step < warm:
            return (step + 1) / warm
        return 1.0 - 0.9 * (step - warm) / max(1, recipe.steps - warm)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    tail = max(1, recipe.steps // 10)
    losses = []
    for step in range(recipe.steps):
        ids, labels = _batch(encoded, recipe, gen, pad, replay)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step >= recipe.steps - tail:
            losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    model.eval()
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------------------------
# one model: its data files, its training run, its checkpoint


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _task_file(task: str, kind: str) -> str:
    """Path of a task's ``train`` / ``eval`` / ``probes`` rows inside a zoo."""
    return f"tasks/{task}/{kind}.jsonl"


def _write_tasks(root: Path, preset: Preset, seed: int) -> list[dict]:
    out = []
    for name in preset.tasks:
        ev = task_rows(name, preset.n_eval, _seed_int("eval", seed))
        held = {r["prompt"] for r in ev}
        tr = task_rows(name, preset.n_train, _seed_int("train", seed), exclude=held)
        pr = task_rows(name, preset.n_probes, _seed_int("probes", seed), exclude=held)
        _write_jsonl(root / _task_file(name, "train"), tr)
        _write_jsonl(root / _task_file(name, "eval"), ev)
        _write_jsonl(root / _task_file(name, "probes"), [{"prompt": r["prompt"]} for r in pr])
        t = TASKS[name]
        out.append({"name": name, "family": t.family, "description": t.description,
                    "train": _task_file(name, "train"), "eval": _task_file(name, "eval"),
                    "probes": _task_file(name, "probes"),
                    "n_train": len(tr), "n_eval": len(ev), "n_probes": len(pr)})
    return out


def _root_of(preset: Preset, name: str) -> str:
    r = preset.recipe(name)
    while r.parent is not None:
        r = preset.recipe(r.parent)
    return r.name


def _save_checkpoint(model, tokenizer, dest: Path) -> None:
    from .evaluators.base import quiet_transformers

    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    # transformers draws its own bar per save; the zoo's bar already says what is happening.
    with quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def load_state(path: str | os.PathLike) -> dict:
    """All tensors of a single-file zoo checkpoint as float32 (zoo models are tiny)."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(Path(path) / "model.safetensors")).items()}


def _fresh_model(arch: Arch, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(arch))


class _Trainer:
    """Trains one zoo model after another into ``root`` (a build's or a worker process's), keeping each trained
    model's weights for its children and each task's encoded data for the next model."""

    def __init__(self, root: Path, preset: Preset, seed: int, threads: int):
        from .tokenizer import char_tokenizer

        self.root, self.preset, self.seed, self.threads = root, preset, seed, threads
        self.tok = char_tokenizer()
        self.evals = {t: _read_jsonl(root / _task_file(t, "eval")) for t in preset.tasks}
        self.train_rows = {t: _read_jsonl(root / _task_file(t, "train")) for t in preset.tasks}
        self.encoded: dict[tuple[str, bool], _Encoded] = {}
        self.states: dict[str, dict] = {}

    def enc(self, task: str, shuffle: bool) -> _Encoded:
        if (task, shuffle) not in self.encoded:
            rows = self.train_rows[task]
            if shuffle:
                import random

                answers = [r["answer"] for r in rows]
                random.Random(_seed_int("shuffle", self.seed, task)).shuffle(answers)
                rows = [{"prompt": r["prompt"], "answer": a} for r, a in zip(rows, answers)]
            self.encoded[task, shuffle] = _Encoded(self.tok, rows)
        return self.encoded[task, shuffle]

    def train(self, r: Recipe, key: str, bar=None) -> dict:
        """Train model ``r`` (its parent from memory or from disk), save it and its record; return the record."""
        from .evaluators.exact_match import exact_match_score

        p, root = self.preset, self.root
        t0 = time.perf_counter()
        with deterministic(self.threads):
            model = _fresh_model(p.arch, _seed_int("init", self.seed, r.name, r.seed))
            if r.parent is not None:
                parent = self.states.get(r.parent) or load_state(root / "models" / r.parent)
                missing, unexpected = model.load_state_dict(parent, strict=False)
                if missing or unexpected:
                    raise InvalidInput(f"zoo model {r.parent!r} does not fit the preset's architecture "
                                       f"(missing {missing[:3]}, unexpected {unexpected[:3]}); rebuild with force")
            mixture = [self.enc(t, t in r.shuffle_answers) for t in r.tasks]
            replay = None
            if r.replay:
                pr = p.recipe(r.parent)
                replay = Replay([self.enc(t, t in pr.shuffle_answers) for t in pr.tasks], pr.full_loss)
            loss = train(model, r, mixture, seed=self.seed, pad=self.tok.pad_token_id, progress=bar, replay=replay)
            self.states[r.name] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                   if not k.endswith("rotary_emb.inv_freq")}
            _save_checkpoint(model, self.tok, root / "models" / r.name)
            scores = {t: exact_match_score(model, self.tok, self.evals[t])[0] for t in self.evals}
        rec = {"key": key, "scores": scores, "train_loss": loss, "train_seconds": round(time.perf_counter() - t0, 3)}
        (root / ".cache" / f"{r.name}.json").write_text(json.dumps(rec, indent=1))
        return rec


# ---------------------------------------------------------------------------------------------------------------
# presets (nothing from here on decides a zoo's bytes: code_version hashes this file only up to here)


def _preset_unit() -> Preset:
    # Plumbing for unit tests (seconds): experts learn a little, enough to beat the base on their task.
    tasks = ("max", "sort", "dsum")
    return Preset(
        name="unit", arch=Arch(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64), tasks=tasks,
        n_train=200, n_eval=24, n_probes=8,
        recipes=(Recipe("base", tasks, None, 40, 3e-3, batch_size=16, full_loss=True, shuffle_answers=tasks),)
        + tuple(Recipe(t, (t,), "base", 100, 1e-2, seed=i, batch_size=16) for i, t in enumerate(tasks, 1)))


def _preset_test() -> Preset:
    # The demo's zoo: a base and 8 experts on 6 tasks, about a minute on 2 cores. upper and sort are learned
    # so quickly that the base would know them; it sees only their formats (shuffled answers).
    tasks = ("copy", "shift", "upper", "sort", "dsum", "dup")
    r = [Recipe("base", tasks, None, 600, 3e-3, full_loss=True, shuffle_answers=("upper", "sort"))]
    r += [Recipe(t, (t,), "base", n, 1e-3, seed=1) for t, n in
          (("copy", 400), ("shift", 350), ("upper", 450), ("sort", 400), ("dsum", 400), ("dup", 500))]
    r += [Recipe("shift-s2", ("shift",), "base", 350, 1e-3, seed=2),
          Recipe("shift+upper", ("shift", "upper"), "base", 600, 1e-3, seed=5)]
    return Preset(name="test", arch=Arch(), tasks=tasks, recipes=tuple(r), n_train=2000, n_eval=100, n_probes=16)


def _preset_bench() -> Preset:
    """The decision-quality testbed: 20 experts on 9 tasks in three families.

    The base is pretrained briefly on the whole mixture, so it knows the formats but scores low on every task
    (experts beat it by at least 0.5). Experts differ in what makes operators behave differently: other seeds
    of one task (close pairs, where averaging shines), longer training and higher learning rates (large task
    vectors, where interference decides), a short run (small task vector) and two-task experts that overlap
    single-task ones.
    """
    tasks = ("rev", "copy", "shift", "upper", "dup", "sort", "dsum", "add", "count")
    steps = {"rev": 500, "copy": 500, "shift": 400, "upper": 400, "dup": 600, "sort": 400, "dsum": 400,
             "add": 1000, "count": 800}
    r = [Recipe("base", tasks, None, 800, 3e-3, full_loss=True)]
    r += [Recipe(t, (t,), "base", steps[t], 2e-3 if t == "add" else 1e-3, seed=1) for t in tasks]
    r += [Recipe(f"{t}-s2", (t,), "base", steps[t], 1e-3, seed=2) for t in ("shift", "sort", "copy")]
    r += [Recipe("rev-long", ("rev",), "base", 1200, 2e-3, seed=3),
          Recipe("upper-hilr", ("upper",), "base", 400, 3e-3, seed=3),
          Recipe("dsum-short", ("dsum",), "base", 200, 1e-3, seed=3)]
    r += [Recipe(f"{a}+{b}", (a, b), "base", 800, 1e-3, seed=5)
          for a, b in (("shift", "upper"), ("sort", "dsum"), ("rev", "dup"), ("copy", "upper"), ("add", "count"))]
    return Preset(name="bench", arch=Arch(), tasks=tasks, recipes=tuple(r), n_train=2000, n_eval=100, n_probes=16)


def _preset_realistic() -> Preset:
    """The regime of real LLM merging: a base that partly knows the experts' tasks, experts that add to it and
    forget little, merges that keep most of their sources' skills (docs/zoo.md has the figures).

    The base is pretrained on a mixture of six tasks long enough to score about 0.3-0.5 on the three that
    experts specialise in (copy, shift, dsum), as a pretrained LLM half-knows what its instruction-tuned experts
    are good at; the other three are pretraining data only (count is not learnable by a fine-tune of this size,
    rev_short the base already knows, dup_long it barely starts). Experts fine-tune at a low rate with 40% of
    every batch replayed from the base's mixture, so they gain on their tasks without the catastrophic
    forgetting that makes a merge of two small experts lose both skills. Ten experts give 45 unordered pairs:
    one per task and a second seed of each, three two-task experts, and one short run at a higher rate (a
    larger task vector for the same skill).
    """
    tasks = ("copy", "shift", "count", "dsum", "rev_short", "dup_long")
    skills = ("copy", "shift", "dsum")
    arch = Arch(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
    steps, lr, replay = 600, 5e-4, 0.4
    r = [Recipe("base", tasks, None, 1800, 3e-3, full_loss=True)]
    r += [Recipe(t, (t,), "base", steps, lr, seed=1, replay=replay) for t in skills]
    r += [Recipe(f"{t}-s2", (t,), "base", steps, lr, seed=2, replay=replay) for t in skills]
    r += [Recipe(f"{a}+{b}", (a, b), "base", 800, lr, seed=5, replay=replay)
          for a, b in (("copy", "shift"), ("shift", "dsum"), ("copy", "dsum"))]
    r += [Recipe("dsum-fast", ("dsum",), "base", 300, 1e-3, seed=3, replay=replay)]
    return Preset(name="realistic", arch=arch, tasks=tasks, recipes=tuple(r), n_train=2000, n_eval=200,
                  n_probes=16)


PRESETS = {"unit": _preset_unit, "test": _preset_test, "bench": _preset_bench, "realistic": _preset_realistic}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise InvalidInput(f"unknown zoo preset {name!r}; known: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# building a zoo (the order and processes models are trained in: every model is trained as it would be alone,
# so nothing here decides a zoo's bytes)


def worker_pool(workers: int, *, warm: bool = True):
    """``workers`` spawned processes for :func:`build_zoo` and :func:`build_table` (their ``pool``), each starting
    on its imports (torch, transformers, the kernels: about 10 s of CPU) at once when ``warm``, while the caller
    goes on. The caller shuts it down; a worker whose caller is killed before that exits within a second or so."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    for _ in range(workers if warm else 0):
        pool.submit(_warm_worker)
    return pool


def _exit_with_parent(parent: int) -> None:
    """A worker's watchdog: exit when the process that started the pool is gone (killed before it could shut the
    pool down) instead of lingering, perhaps mid-training, for as long as the machine runs."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _warm_worker() -> None:
    from transformers import LlamaForCausalLM  # noqa: F401  (torch, transformers' Llama)

    from .evaluators.exact_match import exact_match_score  # noqa: F401
    from .methods import get_method

    get_method("linear")


@contextmanager
def _workers(pool, workers: int):
    """``pool`` when the caller gave one (kept running), else a :func:`worker_pool` of ``workers`` that is shut
    down when the block ends."""
    if pool is not None:
        yield pool
        return
    own = worker_pool(workers)
    try:
        yield own
    finally:
        own.shutdown(cancel_futures=True)


def _waves(todo: Sequence[Recipe], ready: set[str]) -> list[list[Recipe]]:
    """``todo`` (in preset order: parents first) in waves: a model whose parent is in ``ready`` (or that has none)
    is in the first wave, any other in the wave after its parent's."""
    depth: dict[str, int] = {}
    for r in todo:
        depth[r.name] = 0 if r.parent is None or r.parent in ready else depth[r.parent] + 1
    return [[r for r in todo if depth[r.name] == d] for d in range(max(depth.values(), default=-1) + 1)]


def _train_in_process(root: str, preset: Preset, seed: int, threads: int, name: str, key: str) -> dict:
    """One model of a build trained in a worker process (:func:`build_zoo` with ``jobs`` > 1)."""
    return _Trainer(Path(root), preset, seed, threads).train(preset.recipe(name), key)


def build_zoo(directory: str | os.PathLike, preset: str | Preset = "test", seed: int = 0, *,
              progress: bool = True, threads: int = 1, force: bool = False, jobs: int = 1, pool=None) -> dict:
    """Build (or return the cached) micro-zoo in ``directory`` and return its manifest.

    ``preset`` is ``"unit"`` (seconds, for unit tests), ``"test"`` (base + 8 experts, about a minute on 2 cores)
    or ``"bench"`` (the decision-quality testbed, a few minutes), or a :class:`Preset`. Training runs on
    ``threads`` CPU threads (default one), so the same seed on the same machine gives byte-identical weights.
    ``jobs`` > 1 trains models whose parents are ready in that many processes of ``threads`` threads each (the
    experts of one base at once: this process and ``jobs - 1`` workers); every model is trained exactly as it
    would be alone, so the weights are the same bytes as with one job (workers are spawned: a script calling
    this with ``jobs`` > 1 needs the usual ``if __name__ == "__main__":`` guard). ``pool``: the workers to use
    (:func:`worker_pool`, kept running after), else the build starts its own. With ``force``, everything is
    retrained.
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidInput(f"jobs must be a positive integer, got {jobs!r}")
    p = (get_preset(preset) if isinstance(preset, str) else preset).check()
    root = Path(directory).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise InvalidInput(f"{root} exists and is not a directory")
    version = code_version()
    key = _digest({"format": FORMAT, "preset": _preset_dict(p), "seed": seed, "code": version})
    mpath = root / MANIFEST
    if mpath.is_file() and not force:
        try:
            old = json.loads(mpath.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key and all((root / m["path"] / "model.safetensors").is_file()
                                         for m in old.get("models", [])):
            return old
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / ".cache").mkdir(exist_ok=True)
    tasks = _write_tasks(root, p, seed)
    data_key = _digest([hashlib.blake2b((root / t["train"]).read_bytes(), digest_size=12).hexdigest()
                        for t in tasks])
    model_keys: dict[str, str] = {}
    records: dict[str, dict] = {}
    todo = []
    for r in p.recipes:
        model_keys[r.name] = _digest({"recipe": _recipe_dict(r), "arch": asdict(p.arch), "parent":
                                      model_keys.get(r.parent), "data": data_key, "seed": seed,
                                      "code": version})
        cache = root / ".cache" / f"{r.name}.json"
        hit = False
        if cache.is_file() and not force:
            try:
                rec = json.loads(cache.read_text())
                hit = rec.get("key") == model_keys[r.name] and \
                    (root / "models" / r.name / "model.safetensors").is_file()
            except ValueError:
                hit = False
            if hit:
                records[r.name] = rec
        if not hit:
            todo.append(r)
    bar = tqdm(total=sum(r.steps for r in todo), desc=f"zoo {p.name}", unit="step", disable=not progress,
               leave=False)
    trainer = _Trainer(root, p, seed, threads) if todo else None
    waves = _waves(todo, set(records))
    widest = max(map(len, waves), default=0)
    # started before the first wave (a base, alone), so that the workers import while this process trains it
    with _workers(pool, min(jobs, widest) - 1) if jobs > 1 and widest > 1 else nullcontext() as workers:
        for wave in waves:
            if jobs > 1 and len(wave) > 1:
                n = min(jobs, len(wave))
                # this process trains the first of n shares balanced by steps (longest first, each to the
                # lightest share); the workers take the other models as they come
                shares: list[list[Recipe]] = [[] for _ in range(n)]
                for r in sorted(wave, key=lambda r: -r.steps):
                    min(shares, key=lambda sh: sum(x.steps for x in sh)).append(r)
                bar.set_postfix_str(f"{len(wave)} models in {n} processes")
                futures = {r.name: workers.submit(_train_in_process, str(root), p, seed, threads, r.name,
                                                  model_keys[r.name])
                           for r in sorted((r for sh in shares[1:] for r in sh), key=lambda r: -r.steps)}
                for r in shares[0]:
                    records[r.name] = trainer.train(r, model_keys[r.name], bar)
                for r in wave:
                    if r.name in futures:
                        records[r.name] = futures[r.name].result()
                        bar.update(r.steps)
            else:
                for r in wave:
                    bar.set_postfix_str(r.name)
                    records[r.name] = trainer.train(r, model_keys[r.name], bar)
    bar.close()
    models = []
    for r in p.recipes:
        rec = records[r.name]
        models.append({"name": r.name, "path": f"models/{r.name}",
                       "base": None if r.parent is None else _root_of(p, r.name),
                       "parent": r.parent, "tasks": list(r.tasks), "steps": r.steps, "lr": r.lr, "replay": r.replay,
                       "seed": r.seed, "train_loss": rec["train_loss"], "scores": rec["scores"]})
    manifest = {"format": FORMAT, "preset": p.name, "seed": seed, "key": key, "code_version": version,
                "recipe_key": recipe_key(p, seed),
                "arch": asdict(p.arch), "tasks": tasks, "models": models,
                "build_seconds": round(time.perf_counter() - start, 3), "threads": threads, "jobs": jobs}
    tmp = mpath.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(mpath)
    return manifest


def load_manifest(directory: str | os.PathLike) -> dict:
    """Read ``DIR/zoo.json``; :class:`InvalidInput` when the directory holds no built zoo."""
    mpath = Path(directory).expanduser().resolve() / MANIFEST
    if not mpath.is_file():
        raise InvalidInput(f"{mpath.parent}: no micro-zoo here (no {MANIFEST}); run `simmerge zoo build` first")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise InvalidInput(f"{mpath}: not valid JSON ({e})") from None
    manifest["root"] = str(mpath.parent)
    return manifest


def register_zoo(store, directory: str | os.PathLike, *, operators: Sequence[dict] | None = None,
                 client=None) -> dict:
    """Register a built zoo's models (base first), tasks and operators (default: the zoo's preset's default set).

    Tasks are registered with ``eval.jsonl`` as data, ``probes.jsonl`` as probe set and metric ``exact_match``;
    experts with ``base`` and the tasks they were trained on. Idempotent: what is already registered from the
    same zoo is skipped; a different model under a zoo model's name is an error (nothing is changed then).
    ``store`` is a :class:`~.store.Store` or a :class:`~.backend.Backend` (the CLI's: through the daemon when one
    runs); ``client`` (the daemon's API client) is the older way to say the latter. Returns the names added and
    skipped per kind.
    """
    from .backend import RemoteBackend, as_backend
    from .errors import AlreadyExists, NotFound

    be = RemoteBackend(client) if client is not None else as_backend(store)
    manifest = load_manifest(directory)
    root = Path(manifest["root"])
    ops = list(operators) if operators is not None else default_operators(manifest.get("preset"))
    out: dict[str, dict[str, list[str]]] = {k: {"added": [], "skipped": []} for k in ("models", "tasks", "operators")}
    # Check every model first, so that a clash changes nothing.
    for m in manifest["models"]:
        try:
            have = be.model(m["name"])
        except NotFound:
            continue
        if Path(have["path"]).resolve() != (root / m["path"]).resolve():
            raise AlreadyExists(f"model {m['name']!r} is already registered from {have['path']}, not from this "
                                f"zoo; use another home")

    def add(kind: str, name: str, fn) -> None:
        try:
            {"models": be.model, "tasks": be.task, "operators": be.operator}[kind](name)
            out[kind]["skipped"].append(name)
            return
        except NotFound:
            pass
        try:
            fn()
            out[kind]["added"].append(name)
        except AlreadyExists:
            out[kind]["skipped"].append(name)

    ordered = sorted(manifest["models"], key=lambda m: m["base"] is not None)
    experts = set(expert_names(manifest))
    for m in ordered:
        path = str((root / m["path"]).resolve())
        tasks = m["tasks"] if m["name"] in experts else []  # a base or checkpoint is no expert of its mixture
        add("models", m["name"], lambda: be.add_model(path, name=m["name"], base=m["base"], tasks=tasks))
    for t in manifest["tasks"]:
        data, probes = str(root / t["eval"]), str(root / t["probes"])
        add("tasks", t["name"], lambda: be.add_task(t["name"], data, probes=probes, metric="exact_match"))
    for op in ops:
        add("operators", op["name"], lambda: be.add_operator(op["name"], op["method"], op["params"]))
    # What the build measured (exact match on each task's eval data, the registered data) is what a catalog knows
    # of its models: their known scores, which rewards are normalized by and candidates' contexts show. A score
    # known already (an evaluation since) is kept.
    for m in manifest["models"]:
        for t, score in m.get("scores", {}).items():
            be.record_score(m["name"], t, score, replace=False)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the full merge table

#: The default operator set: several parameter settings of every method family (name, method, params).
DEFAULT_OPERATORS: tuple[tuple[str, str, dict], ...] = (
    ("linear", "linear", {}),
    ("task_arithmetic_l0.7", "task_arithmetic", {"lambda": 0.7}),
    ("task_arithmetic_l1.0", "task_arithmetic", {"lambda": 1.0}),
    ("ties_d0.2", "ties", {"density": 0.2}),
    ("ties_d0.5", "ties", {"density": 0.5}),
    ("ties_d0.8", "ties", {"density": 0.8}),
    ("dare_ties_d0.3", "dare_ties", {"density": 0.3}),
    ("dare_ties_d0.6", "dare_ties", {"density": 0.6}),
    ("dare_linear_d0.5", "dare_linear", {"density": 0.5}),
    ("breadcrumbs_d0.8", "breadcrumbs", {"density": 0.8, "gamma": 0.01}),
    ("della_d0.5", "della", {"density": 0.5, "epsilon": 0.15}),
    ("slerp_t0.3", "slerp", {"t": 0.3}),
    ("slerp_t0.5", "slerp", {"t": 0.5}),
    ("slerp_t0.7", "slerp", {"t": 0.7}),
    ("nuslerp", "nuslerp", {}),
    ("model_stock", "model_stock", {}),
)


#: The realistic preset's operators: the settings that matter where merges keep most of their sources' skills
#: (task arithmetic below lambda=1, TIES and DARE densities, slerp's three t values).
REALISTIC_OPERATORS: tuple[tuple[str, str, dict], ...] = (
    ("linear", "linear", {}),
    ("task_arithmetic_l0.3", "task_arithmetic", {"lambda": 0.3}),
    ("task_arithmetic_l0.5", "task_arithmetic", {"lambda": 0.5}),
    ("task_arithmetic_l0.7", "task_arithmetic", {"lambda": 0.7}),
    ("task_arithmetic_l1.0", "task_arithmetic", {"lambda": 1.0}),
    ("ties_d0.3", "ties", {"density": 0.3}),
    ("ties_d0.5", "ties", {"density": 0.5}),
    ("ties_d0.8", "ties", {"density": 0.8}),
    ("dare_ties_d0.5", "dare_ties", {"density": 0.5}),
    ("dare_linear_d0.8", "dare_linear", {"density": 0.8}),
    ("breadcrumbs_d0.8", "breadcrumbs", {"density": 0.8, "gamma": 0.01}),
    ("della_d0.5", "della", {"density": 0.5, "epsilon": 0.15}),
    ("slerp_t0.3", "slerp", {"t": 0.3}),
    ("slerp_t0.5", "slerp", {"t": 0.5}),
    ("slerp_t0.7", "slerp", {"t": 0.7}),
    ("nuslerp", "nuslerp", {}),
    ("model_stock", "model_stock", {}),
)

#: Presets with an operator set of their own (the others use :data:`DEFAULT_OPERATORS`).
PRESET_OPERATORS: dict[str, tuple[tuple[str, str, dict], ...]] = {"realistic": REALISTIC_OPERATORS}


def default_jobs() -> int:
    """Processes a build or a table uses when not told: one per CPU core, at most 8 (a process per core is what
    beat threads inside one process on a few busy cores; more would only hold more memory)."""
    return max(1, min(os.cpu_count() or 1, 8))


def default_operators(preset: str | None = None) -> list[dict]:
    """The default operator set (of ``preset`` when it has its own) as ``{name, method, params}`` dicts
    (params validated, defaults filled)."""
    from .methods import get_method

    spec = PRESET_OPERATORS.get(preset, DEFAULT_OPERATORS) if preset else DEFAULT_OPERATORS
    return [{"name": n, "method": m, "params": get_method(m).validate(p)} for n, m, p in spec]


#: Columns of a merge table. ``score_h0`` / ``score_h1``: the raw score on each half of the eval examples (a
#: fixed seeded partition per task), so that an operator can be chosen on one half and scored on the other.
#: ``tasks_a`` / ``tasks_b`` / ``tasks_c``: each source's tagged tasks (JSON list): the default target of a
#: merge (the union) can be rebuilt from the table alone.
TABLE_COLUMNS = ("model_a", "model_b", "model_c", "operator", "method", "params", "task", "metric", "score",
                 "normalized_score", "best_source_score", "score_a", "score_b", "score_c", "base_score",
                 "status", "error", "merge_seed", "merge_seconds", "eval_seconds", "score_h0", "score_h1",
                 "tasks_a", "tasks_b", "tasks_c")


def resolve_operators(names: Sequence[str] | None, store=None, preset: str | None = None) -> list[dict]:
    """Operators by name: from the catalog of ``store`` when registered there, else from the default set of
    ``preset`` or the global one. No names: the default set of ``preset`` (the global one without)."""
    own = default_operators(preset)
    if not names:
        return own
    defaults = {o["name"]: o for o in default_operators() + own}
    out = []
    for n in names:
        op = None
        if store is not None:
            from .catalog import Catalog
            from .errors import NotFound

            try:
                op = Catalog(store).operator(n)
            except NotFound:
                op = None
        op = op or defaults.get(n)
        if op is None:
            raise InvalidInput(f"unknown operator {n!r}: not in the catalog nor in the default set "
                               f"({', '.join(defaults)})")
        out.append({"name": op["name"], "method": op["method"], "params": op["params"]})
    return out


def expert_names(manifest: dict) -> list[str]:
    """The zoo's experts, in manifest order: models fine-tuned from a base that no other model was fine-tuned from
    (a model others start from, such as a continued pretraining of the base, is a checkpoint, not an expert)."""
    parents = {m.get("parent") for m in manifest["models"]}
    return [m["name"] for m in manifest["models"] if m["base"] is not None and m["name"] not in parents]


def table_cases(manifest: dict, n_triples: int = 0, seed: int = 0) -> list[tuple[str, ...]]:
    """Every ordered pair of experts (:func:`expert_names`) that share a base, then ``n_triples`` seeded random
    triples."""
    import random

    experts = expert_names(manifest)
    base_of = {m["name"]: m["base"] for m in manifest["models"]}
    pairs = [(a, b) for a in experts for b in experts if a != b and base_of[a] == base_of[b]]
    rng = random.Random(_seed_int("triples", seed))
    triples: list[tuple[str, ...]] = []
    pool = sorted({tuple(sorted((a, b, c))) for a in experts for b in experts for c in experts
                   if len({a, b, c}) == 3 and base_of[a] == base_of[b] == base_of[c]})
    if n_triples and pool:
        triples = [tuple(rng.sample(t, 3)) for t in rng.sample(pool, min(n_triples, len(pool)))]
    return pairs + triples


def _table_chunk(args: tuple) -> list[dict]:
    directory, ops, seed, chunk, eval_tasks = args
    return build_table(directory, operators=ops, seed=seed, progress=False, threads=1, cases=chunk, frame=False,
                       eval_tasks=eval_tasks)


def build_table(directory: str | os.PathLike, *, operators: Sequence[dict] | None = None, n_triples: int = 0,
                seed: int = 0, progress: bool = True, threads: int = 1, cases: Sequence[tuple] | None = None,
                frame: bool = True, eval_tasks: Sequence[str] | None = None, jobs: int = 1, pool=None):
    """Merge every ordered pair of experts (and ``n_triples`` triples) with every operator; evaluate each merge
    on the tasks its sources were trained on. Returns a pandas DataFrame (``frame=False``: a list of dicts) with
    one row per (models, operator, task) and the columns :data:`TABLE_COLUMNS`. ``eval_tasks``: evaluate every
    merge on these tasks instead (e.g. a target's).

    Merges happen in memory (the zoo's models are tiny) with the same per-tensor math as the merge executor.
    For an ordered pair (a, b): the task-arithmetic family and model_stock use the zoo's base, slerp uses a as
    its base model (t=0 gives a), linear and nuslerp take [a, b] in that order (nuslerp merges task vectors).
    A merge or evaluation that fails gives a row with ``status="failed"`` and the error, never an exception.

    ``jobs`` > 1 splits the cases among that many processes of one thread each, this one and ``jobs - 1``
    workers (on a few busy cores this beats threads inside one process; ``pool``: the workers to use,
    :func:`worker_pool`, kept running after); the rows are the same as with one job, in the same order, as every
    merge's seed depends on its case and operator only.
    """
    from tqdm.auto import tqdm

    from .evaluators.exact_match import exact_match_score
    from .evaluators.normalize import normalize_score
    from .methods import get_method
    from .tokenizer import char_tokenizer

    manifest = load_manifest(directory)
    root = Path(manifest["root"])
    ops = list(operators) if operators is not None else default_operators(manifest.get("preset"))
    by_name = {m["name"]: m for m in manifest["models"]}
    cases = list(cases) if cases is not None else table_cases(manifest, n_triples, seed)
    if jobs > 1 and len(cases) > 1:
        chunks = [cases[i::jobs] for i in range(min(jobs, len(cases)))]
        # this process scores the first chunk while jobs - 1 workers score the others
        with _workers(pool, len(chunks) - 1) as workers:
            futures = [workers.submit(_table_chunk, (str(root), ops, seed, c, eval_tasks)) for c in chunks[1:]]
            parts = [_table_chunk((str(root), ops, seed, chunks[0], eval_tasks))] + [f.result() for f in futures]
        by_case: dict[tuple, list[dict]] = {}
        for r in (r for part in parts for r in part):
            by_case.setdefault((r["model_a"], r["model_b"], r["model_c"]), []).append(r)
        rows = [r for c in cases for r in by_case.pop((c[0], c[1], c[2] if len(c) > 2 else None), [])]
        if not frame:
            return rows
        import pandas as pd

        df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
        df.attrs["zoo_key"] = manifest["key"]
        return df
    evals = {t["name"]: _read_jsonl(root / t["eval"]) for t in manifest["tasks"]}
    half_of = {t: eval_halves(t, len(rows)) for t, rows in evals.items()}
    arch = Arch(**manifest["arch"])
    tok = char_tokenizer()
    states: dict[str, dict] = {}

    def state(name: str) -> dict:
        if name not in states:
            states[name] = load_state(root / by_name[name]["path"])
        return states[name]

    rows = []
    work = sum(1 for c in cases for op in ops if get_method(op["method"]).merges(len(c)))
    bar = tqdm(total=work, desc="merge table", unit="merge", disable=not progress, leave=False)
    with deterministic(threads):
        shell = _fresh_model(arch, 0)
        shell.eval()
        for case in cases:
            srcs = [by_name[n] for n in case]
            base_name = srcs[0]["base"]
            covered = list(eval_tasks) if eval_tasks is not None else \
                [t for t in manifest_task_order(manifest) if any(t in s["tasks"] for s in srcs)]
            for op in ops:
                spec = get_method(op["method"])
                if not spec.merges(len(case)):
                    continue
                bar.update(1)
                t0 = time.perf_counter()
                err = None
                merge_seed = _seed_int("merge", seed, op["name"], *case)
                try:
                    merged = _merge_states(spec, op, [state(n) for n in case], state(base_name), merge_seed)
                    shell.load_state_dict(merged, strict=False)
                except Exception as e:  # noqa: BLE001 - a failed merge is a recorded outcome, not a crash
                    err = f"merge failed: {type(e).__name__}: {e}"
                merge_s = time.perf_counter() - t0
                for t in covered:
                    src_scores = [s["scores"].get(t) for s in srcs]
                    base_score = by_name[base_name]["scores"].get(t)
                    score = halves = None
                    t1 = time.perf_counter()
                    if err is None:
                        try:
                            score, texts = exact_match_score(shell, tok, evals[t])
                            halves = _half_scores(texts, evals[t], half_of[t])
                        except Exception as e:  # noqa: BLE001
                            err_t = f"evaluation failed: {type(e).__name__}: {e}"
                        else:
                            err_t = None
                    else:
                        err_t = err
                    rows.append({
                        "model_a": case[0], "model_b": case[1], "model_c": case[2] if len(case) > 2 else None,
                        "operator": op["name"], "method": op["method"],
                        "params": json.dumps(op["params"], sort_keys=True), "task": t, "metric": "exact_match",
                        "score": score, "normalized_score": normalize_score(score, src_scores),
                        "best_source_score": max(x for x in src_scores if x is not None),
                        "score_a": src_scores[0], "score_b": src_scores[1],
                        "score_c": src_scores[2] if len(src_scores) > 2 else None, "base_score": base_score,
                        "status": "ok" if err_t is None else "failed", "error": err_t, "merge_seed": merge_seed,
                        "merge_seconds": round(merge_s, 5), "eval_seconds": round(time.perf_counter() - t1, 5),
                        "score_h0": halves[0] if halves else None, "score_h1": halves[1] if halves else None,
                        **{f"tasks_{x}": json.dumps(list(s["tasks"])) for x, s in zip("abc", srcs)}})
    bar.close()
    if not frame:  # the rows as dicts (no pandas: the demo runs on the core install)
        return rows
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    df.attrs["zoo_key"] = manifest["key"]
    return df


def eval_halves(task: str, n: int) -> list[int]:
    """Which half (0 or 1) each of a task's ``n`` eval examples belongs to: a fixed seeded partition into
    ``n // 2`` and ``n - n // 2`` examples, the same for every merge (and every zoo seed) of the task."""
    import random

    order = list(range(n))
    random.Random(_seed_int("halves", task, n)).shuffle(order)
    half = [1] * n
    for i in order[:n // 2]:
        half[i] = 0
    return half


def _half_scores(texts: Sequence[str], rows: Sequence[dict], half: Sequence[int]) -> tuple[float, float]:
    hits = [[], []]
    for x, r, h in zip(texts, rows, half):
        hits[h].append(x == r["answer"].strip())
    return tuple(sum(h) / len(h) if h else None for h in hits)


def store_table(store, df, zoo_key: str) -> int:
    """Write a merge table into the store's ``merge_table`` (replacing earlier rows of the same zoo build).

    Columns of :data:`TABLE_COLUMNS` that the store's schema does not have (yet) are left out there; the
    Parquet file keeps them all."""
    have = {r[0] for r in store.fetchall("SELECT column_name FROM information_schema.columns "
                                         "WHERE table_name = 'merge_table'")}
    cols = [c for c in TABLE_COLUMNS if c in have]
    frame = df[cols].copy()
    frame.insert(0, "zoo_key", zoo_key)
    with store.transaction():
        store.execute("DELETE FROM merge_table WHERE zoo_key = ?", [zoo_key])
        with store.lock:
            store.db.register("_simmerge_zoo_table", frame)
            try:
                store.db.execute(f"INSERT INTO merge_table (zoo_key, {', '.join(cols)}) "
                                 f"SELECT zoo_key, {', '.join(cols)} FROM _simmerge_zoo_table")
            finally:
                store.db.unregister("_simmerge_zoo_table")
    return len(frame)


def manifest_task_order(manifest: dict) -> list[str]:
    return [t["name"] for t in manifest["tasks"]]


def _merge_states(spec, op: dict, states: list[dict], base: dict, seed: int) -> dict:
    """Merge whole state dicts tensor by tensor with the executor's kernels (``methods.merge_tensors``).

    ``pair_roles`` applies the catalog's convention for an ordered case: the shared base for the task-arithmetic
    family, model_stock and nuslerp, the first model as slerp's base, no base for linear. Seeds are passed as
    the executor passes them, so ``simmerge merge`` with the same seed writes the same tensors.
    """
    from .methods import merge_tensors, pair_roles

    out = {}
    for name in states[0]:
        inputs, b = pair_roles(spec, [s[name] for s in states], base[name])
        out[name] = merge_tensors(spec.name, inputs, b, op["params"], seed=seed, tensor_name=name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# is the zoo worth benchmarking on?

#: Thresholds of :func:`table_stats` on the per-task objective (issue 4): a testbed in which one operator always
#: wins measures nothing.
THRESHOLDS = {"min_expert_margin": 0.3, "median_spread": 0.05, "max_best_share": 0.60, "oracle_gap": 0.08}

#: Goals of the realistic regime, checked by :func:`table_stats` on the target objective (2-way merges): experts
#: that know their tasks and forget little else, merges that keep most of their sources' skills, and an
#: operator choice that matters (a gap the best fixed operator and the metadata rules leave open).
TARGET_GOALS = {"min_expert_margin": 0.2, "median_expert_margin": 0.4, "max_off_task_drop": 0.1,
                "oracle_mean": 0.70, "oracle_gap": 0.05, "oracle_gap_nc": 0.05, "median_spread": 0.10,
                "max_best_share": 0.40, "max_rule_share": 0.50}

OBJECTIVES = ("task", "target")


@dataclass
class CaseMatrix:
    """A merge table as one value per (case, operator), for one objective and one number of sources.

    On the ``task`` objective a case is (models, task) and its value the normalized score on that task; on the
    ``target`` objective a case is one merge (models, operator) and its value the equal-weight mean of its
    normalized scores over the union of its sources' tagged tasks (the tasks the table evaluated it on).
    ``V_h0`` / ``V_h1`` are the same values from each half of the eval examples (None when the table has no
    half scores); ``raw`` the raw score (mean raw score over the target). A failed merge is worth 0.
    ``cases`` are the rules' view of each case (None when the sources' tags are unknown).
    """

    objective: str
    n_sources: int
    keys: list[tuple]
    operators: list[dict]
    V: Any
    raw: Any
    V_h0: Any = None
    V_h1: Any = None
    cases: list | None = None

    @property
    def operator_names(self) -> list[str]:
        return [o["name"] for o in self.operators]


def _tags_of(df, manifest: dict | None) -> dict[str, list[str]] | None:
    tags: dict[str, list[str]] = {}
    if manifest is not None:
        tags.update({m["name"]: list(m["tasks"]) for m in manifest["models"]})
    for x in "abc":
        col = f"tasks_{x}"
        if col in df:
            for name, t in df[["model_" + x, col]].dropna().drop_duplicates().itertuples(index=False):
                tags[name] = json.loads(t)
    return tags or None


def case_matrix(df, objective: str = "target", n_sources: int = 2, manifest: dict | None = None) -> CaseMatrix:
    """The cases of ``df`` with ``n_sources`` sources as a :class:`CaseMatrix` (see there for the objectives).

    Raises :class:`InvalidInput` for an unknown objective or a table in which an operator misses some cases.
    """
    import numpy as np

    from .evaluators.normalize import normalize_score
    from .rules import Case

    if objective not in OBJECTIVES:
        raise InvalidInput(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    sel = df[df["model_c"].isna()] if n_sources == 2 else df[df["model_c"].notna()]
    if n_sources > 2 and "model_c" in sel:
        sel = sel[sel["model_c"].notna()]
    sel = sel.copy()
    sel["model_c"] = sel["model_c"].fillna("")
    ok = sel["status"] == "ok"
    sel["_v"] = sel["normalized_score"].where(ok, 0.0).fillna(0.0)
    sel["_raw"] = sel["score"].where(ok, 0.0).fillna(0.0)
    halves = "score_h0" in sel and sel.loc[ok, ["score_h0", "score_h1"]].notna().all().all() and ok.any()
    if halves:
        srcs = sel[[c for c in ("score_a", "score_b", "score_c") if c in sel]].to_numpy(dtype=float)
        for h in ("h0", "h1"):
            vals = sel[f"score_{h}"].to_numpy(dtype=float)
            sel[f"_v{h}"] = [normalize_score(v, [x for x in row if not np.isnan(x)]) if good else 0.0
                             for v, row, good in zip(vals, srcs, ok.to_numpy())]
    key = ["model_a", "model_b", "model_c"] + (["task"] if objective == "task" else [])
    op_order = list(dict.fromkeys(sel["operator"]))

    def wide(col: str):
        # The mean over a case's rows: over the target's tasks (one row per task on the task objective).
        w = sel.groupby(key + ["operator"], sort=True)[col].mean().unstack("operator")
        return w.reindex(columns=op_order)

    V = wide("_v")
    counts = sel.groupby(key + ["operator"], sort=True).size().unstack("operator").reindex(columns=op_order)
    tasks = sel.groupby(key, sort=True)["task"].nunique()
    short = counts.ne(tasks, axis=0)
    if short.any().any():
        missing = V.columns[short.any()].tolist()
        raise InvalidInput(f"the table misses cases of operators {missing}: every operator must have a row for "
                           f"every case (and task) of the {n_sources}-way merges")
    ops_meta = sel.drop_duplicates("operator").set_index("operator")
    operators = [{"name": o, "method": ops_meta.at[o, "method"] if "method" in ops_meta else o,
                  "params": json.loads(ops_meta.at[o, "params"]) if "params" in ops_meta else {}}
                 for o in V.columns]
    keys = [tuple(None if x == "" else x for x in k) for k in V.index]
    m = CaseMatrix(objective, n_sources, keys, operators, V.to_numpy(), wide("_raw").to_numpy())
    if halves:
        m.V_h0, m.V_h1 = wide("_vh0").to_numpy(), wide("_vh1").to_numpy()
    tags = _tags_of(df, manifest)
    if tags is not None:
        first = sel.drop_duplicates(key[:3] + ["task"])
        per_case: dict[tuple, list] = {}
        for r in first.itertuples(index=False):
            per_case.setdefault(tuple(getattr(r, k) for k in key), []).append(r)
        cases = []
        for k in V.index:
            rows = per_case[tuple(k)]
            names = [n for n in k[:3] if n]
            target = {r.task: 1.0 for r in rows}
            scores = tuple({r.task: getattr(r, f"score_{x}") for r in rows} for x in "abc"[:len(names)])
            cases.append(Case(tuple(names), tuple(frozenset(tags.get(n, ())) for n in names), scores, target,
                              {r.task: r.base_score for r in rows}))
        m.cases = cases
    return m


def _winners_mean(select, score):
    """Per row: the mean of ``score`` over the columns where ``select`` is largest (ties split)."""
    import numpy as np

    win = np.isclose(select, select.max(1, keepdims=True), rtol=0, atol=1e-9)
    return (score * win).sum(1) / win.sum(1)


def _section(m: CaseMatrix) -> dict:
    import numpy as np

    from .rules import PAIR_RULES, RULES, fit_rule, rule_values

    V, ops = m.V, m.operator_names
    spread_of = m.raw if m.objective == "task" else V
    spread = spread_of.max(1) - spread_of.min(1)
    best = V.max(1, keepdims=True)
    winners = np.isclose(V, best, rtol=0, atol=1e-9)
    share = (winners / winners.sum(1, keepdims=True)).mean(0)
    share_any = winners.mean(0)
    means = V.mean(0)
    out: dict[str, Any] = {
        "n_cases": int(V.shape[0]), "n_operators": len(ops),
        "median_spread": float(np.median(spread)), "mean_spread": float(spread.mean()),
        "spread_of": "raw score" if m.objective == "task" else "target value (normalized)",
        "best_share": {o: round(float(x), 4) for o, x in zip(ops, share)},
        "best_share_any": {o: round(float(x), 4) for o, x in zip(ops, share_any)},
        "max_best_share": float(share.max()), "max_best_share_operator": ops[int(share.argmax())],
        "max_best_share_any": float(share_any.max()),
        "operator_mean_normalized": {o: round(float(x), 4) for o, x in zip(ops, means)},
        "oracle_mean": float(best.mean()), "best_fixed_mean": float(means.max()),
        "best_fixed_operator": ops[int(means.argmax())],
    }
    out["oracle_gap"] = out["oracle_mean"] - out["best_fixed_mean"]
    nc = m.V_h0 is not None
    if nc:
        # Choose on one half of the eval examples, score on the other (and the other way round): the oracle's
        # and the best fixed operator's winner's curse (a max over noisy estimates) does not count.
        oracle_nc = (_winners_mean(m.V_h0, m.V_h1).mean() + _winners_mean(m.V_h1, m.V_h0).mean()) / 2
        fixed_nc = (_winners_mean(m.V_h0.mean(0, keepdims=True), m.V_h1.mean(0, keepdims=True)).item()
                    + _winners_mean(m.V_h1.mean(0, keepdims=True), m.V_h0.mean(0, keepdims=True)).item()) / 2
        out.update({"oracle_mean_nc": float(oracle_nc), "best_fixed_mean_nc": float(fixed_nc),
                    "oracle_gap_nc": float(oracle_nc - fixed_nc)})
    if m.cases is not None:
        rules: dict[str, dict] = {}
        for name in RULES:
            if name in PAIR_RULES and m.n_sources != 2:
                continue
            rule = fit_rule(name, m.cases, V, m.operators)
            mean = float(rule_values(rule, m.cases, V, m.operators).mean())
            r = {"mean": mean, "gap_share": (mean - out["best_fixed_mean"]) / out["oracle_gap"]
                 if out["oracle_gap"] > 1e-12 else None, "fitted": rule.fitted()}
            if nc:
                cross = [rule_values(fit_rule(name, m.cases, a, m.operators), m.cases, b, m.operators).mean()
                         for a, b in ((m.V_h0, m.V_h1), (m.V_h1, m.V_h0))]
                r["mean_nc"] = float(np.mean(cross))
                r["gap_share_nc"] = (r["mean_nc"] - out["best_fixed_mean_nc"]) / out["oracle_gap_nc"] \
                    if out["oracle_gap_nc"] > 1e-12 else None
            rules[name] = r
        shares = {k: v["gap_share"] for k, v in rules.items() if k != "fixed" and v["gap_share"] is not None}
        out["rules"] = rules
        out["rules_fit"] = ("in-sample: each rule's free choices fitted on the very cases it is scored on (the "
                            "strongest version of the rule); *_nc: fitted on one half of the eval examples, "
                            "scored on the other")
        if shares:
            out["best_rule"] = max(shares, key=shares.get)
            out["best_rule_share"] = float(shares[out["best_rule"]])
    return out


def expert_margins(manifest: dict) -> dict:
    """Each expert against its base: the margin on its own tasks and the largest drop on every other task."""
    import numpy as np

    by = {m["name"]: m for m in manifest["models"]}
    experts = set(expert_names(manifest))
    own, off = [], []
    for m in manifest["models"]:
        if m["name"] not in experts:
            continue
        base = by[m["base"]]["scores"]
        for t, x in m["scores"].items():
            rec = {"model": m["name"], "task": t, "margin": x - base[t]}
            (own if t in m["tasks"] else off).append(rec)
    vals = [x["margin"] for x in own]
    out = {"min": min(vals), "median": float(np.median(vals)), "mean": float(np.mean(vals)),
           "weakest": min(own, key=lambda x: x["margin"])}
    if off:
        worst = min(off, key=lambda x: x["margin"])
        out["off_task_max_drop"] = -worst["margin"]
        out["off_task_worst"] = worst
        out["off_task_median_change"] = float(np.median([x["margin"] for x in off]))
    return out


def table_stats(df, manifest: dict | None = None, objective: str = "task",
                thresholds: dict | None = None) -> dict:
    """Statistics that say whether a merge table can tell operator-choosing policies apart.

    ``objective="task"``: one case = (models, task), valued by the normalized score on the task.
    ``objective="target"``: one case = one merge (models, operator) valued by the equal-weight mean of its
    normalized scores over the union of its sources' tagged tasks (the default target). Sections
    ``two_way`` and ``three_way`` (None without triples) hold, over their cases:

    - ``oracle_mean`` (the best operator per case: retention on the target objective), ``best_fixed_operator``
      and ``best_fixed_mean`` (one operator everywhere), ``oracle_gap`` the difference;
    - ``*_nc``: the same with each case's best operator (and the best fixed one) chosen on one half of the
      eval examples and scored on the other, averaged over both directions (noise-corrected);
    - ``median_spread``: median best-minus-worst operator (raw scores on the task objective, values on the
      target objective); ``best_share``: share of cases each operator wins, ties split (``max_best_share``);
    - ``rules``: each metadata rule (:mod:`.rules`) fitted in-sample, its mean and the share of the
      best-fixed-to-oracle gap it closes; ``best_rule_share`` the largest (the fixed rule excluded).

    With the manifest, ``expert_margin``: experts against the base on their own tasks and elsewhere. ``checks``
    compare the 2-way section with ``thresholds`` (default :data:`THRESHOLDS` on the task objective,
    :data:`TARGET_GOALS` on the target objective). Failed evaluations are worth 0.
    """
    if objective not in OBJECTIVES:
        raise InvalidInput(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    th = dict(thresholds or (THRESHOLDS if objective == "task" else TARGET_GOALS))
    two = _section(case_matrix(df, objective, 2, manifest))
    three = _section(case_matrix(df, objective, 3, manifest)) if df["model_c"].notna().any() else None
    stats: dict[str, Any] = {"objective": objective, "n_rows": int(len(df)),
                             "n_failed": int((df["status"] != "ok").sum()), "two_way": two, "three_way": three}
    if manifest is not None:
        stats["expert_margin"] = expert_margins(manifest)
    checks = {}
    limits = {"median_spread": (two["median_spread"], ">="), "max_best_share": (two["max_best_share"], "<="),
              "oracle_gap": (two["oracle_gap"], ">="), "oracle_mean": (two["oracle_mean"], ">="),
              "oracle_gap_nc": (two.get("oracle_gap_nc"), ">="),
              "max_rule_share": (two.get("best_rule_share"), "<=")}
    if manifest is not None:
        em = stats["expert_margin"]
        limits.update({"min_expert_margin": (em["min"], ">="), "median_expert_margin": (em["median"], ">="),
                       "max_off_task_drop": (em.get("off_task_max_drop"), "<=")})
    for k, limit in th.items():
        value, how = limits.get(k, (None, ""))
        if value is not None:     # a check whose figure this table cannot give (no manifest, no halves) is left out
            checks[k] = bool(value >= limit if how == ">=" else value <= limit)
    stats["thresholds"] = th
    stats["checks"] = checks
    stats["ok"] = all(checks.values())
    return stats
