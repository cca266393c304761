"""Vowpal Wabbit contextual bandit with action-dependent features (``--cb_explore_adf``).

Every candidate is one VW action with three namespaces: ``x`` (its context), ``z`` (its operator's descriptor)
and ``a`` (the operator's name). The default arguments, ``--cb_explore_adf --squarecb -q xz -q xa``, use SquareCB
exploration over a regression with context x descriptor interactions (what transfers to a new operator) and
context x operator interactions (what each operator learns for itself). Any VW argument string is accepted as
long as it keeps ``--cb_explore_adf``; ``--quiet`` and ``--random_seed SEED`` are added unless given.

VW's probability mass function is the choice distribution (the exploration ``floor`` is mixed in on top). The
reward is learned as cost ``-reward`` on the chosen action alone, with the logged propensity, so ``predicted``
is minus VW's regression output for each action. State is VW's own model file, as bytes.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from typing import ClassVar

import numpy as np

from ..errors import InvalidInput
from .base import Candidates, Policy, require

DEFAULT_ARGS = "--cb_explore_adf --squarecb -q xz -q xa"
# Options that would make VW read or write files, or listen, behind the policy's back.
_FORBIDDEN = {"-i", "--initial_regressor", "-f", "--final_regressor", "-d", "--data", "--daemon", "--port",
              "-c", "--cache", "--cache_file", "--readable_model", "--invert_hash", "-p", "--predictions"}


def _token(arm: str) -> str:
    # VW's text format splits on whitespace, '|' and ':'; escape those so every operator name is one feature.
    return re.sub(r"[\s|:%]", lambda m: f"%{ord(m.group()):02x}", arm) or "%"


def _features(X: np.ndarray) -> list[str]:
    """``"0:v0 1:v1 ..."`` per row (one %-format per row: the fastest plain-Python way to write VW text)."""
    if X.shape[1] == 0:
        return [""] * X.shape[0]
    template = " ".join(f"{j}:%.9g" for j in range(X.shape[1]))
    return [template % tuple(row) for row in X.tolist()]


def action_lines(X: np.ndarray, Z: np.ndarray, arms) -> list[str]:
    """One VW text line per candidate (no label)."""
    xs, zs = _features(X), _features(Z)
    return [f"|x {x} |z {z} |a {_token(str(a))}" for x, z, a in zip(xs, zs, arms)]


class VWPolicy(Policy):
    """VW ``--cb_explore_adf`` over candidate actions; ``args`` is any VW argument string."""

    name: ClassVar[str] = "vw"
    _param_names = ("args", "floor", "seed")

    def __init__(self, args: str = DEFAULT_ARGS, floor: float = 0.01, seed: int = 0):
        super().__init__(floor=floor, seed=seed)
        require(isinstance(args, str), f"vw args must be a string, got {args!r}")
        try:
            tokens = shlex.split(args)
        except ValueError as e:
            raise InvalidInput(f"vw args {args!r} do not parse: {e}") from None
        require("--cb_explore_adf" in tokens, f"vw args must include --cb_explore_adf, got {args!r}")
        bad = sorted(_FORBIDDEN.intersection(t.split("=")[0] for t in tokens))
        require(not bad, f"vw args may not include {', '.join(bad)} (the policy manages VW's files itself)")
        self.args = args
        if "--quiet" not in tokens:
            tokens.append("--quiet")
        if "--random_seed" not in tokens:
            tokens += ["--random_seed", str(self.seed)]
        self._tokens = tokens
        self._vw = self._open(tokens)

    @staticmethod
    def _open(tokens: list[str]):
        from vowpalwabbit import pyvw

        try:
            return pyvw.Workspace(arg_list=tokens)
        except Exception as e:  # VW reports bad options as RuntimeError with its own message
            raise InvalidInput(f"vw rejected the arguments {' '.join(tokens)!r}: {e}") from None

    def _predict(self, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """VW's pmf and its per-action regression output (predicted cost) for one multi-line example."""
        exs = self._vw.parse(lines)
        try:
            pmf = np.asarray(self._vw.predict(exs), dtype=np.float64)
            cost = np.fromiter((e.get_partial_prediction() for e in exs), dtype=np.float64, count=len(exs))
        finally:
            self._vw.finish_example(exs)
        return pmf, cost

    def _score(self, cands: Candidates):
        pmf, cost = self._predict(action_lines(cands.X, cands.Z, cands.arms))
        pmf = np.clip(pmf, 0.0, None)
        dist = pmf / pmf.sum() if pmf.sum() > 0 else np.full(len(cands), 1.0 / len(cands))
        predicted = -cost
        return predicted, predicted, np.zeros(len(cands)), dist

    def _learn(self, x, arm, z, reward, propensity) -> None:
        line = action_lines(x[None, :], z[None, :], [arm])[0]
        self._vw.learn([f"0:{-reward!r}:{propensity!r} {line}"])

    def explain(self, x, arm, z) -> dict:
        """Occlusion: each feature's contribution is the prediction minus the prediction without it."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        z = np.asarray(z, dtype=np.float64).reshape(1, -1)
        d = x.shape[0]
        xs = [f"{j}:{v:.9g}" for j, v in enumerate(x.tolist())]
        rest = f" |z {_features(z)[0]} |a {_token(str(arm))}"
        # Action 0: everything; action j + 1: feature j left out; last action: no context at all.
        lines = ["|x " + " ".join(xs) + rest]
        lines += ["|x " + " ".join(xs[:j] + xs[j + 1:]) + rest for j in range(d)]
        lines.append("|x" + rest)
        _, cost = self._predict(lines)
        pred = -cost
        return {"predicted": float(pred[0]), "baseline": float(pred[d + 1]),
                "contributions": pred[0] - pred[1:d + 1], "method": "occlusion"}

    def _state(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.vw")
            self._vw.save(path)
            with open(path, "rb") as f:
                model = np.frombuffer(f.read(), dtype=np.uint8).copy()
        return {"model": model}, {}

    def _load_state(self, arrays, meta) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.vw")
            with open(path, "wb") as f:
                f.write(np.asarray(arrays["model"], dtype=np.uint8).tobytes())
            # The model file carries VW's own options; only quietness is repeated.
            self._vw = self._open(["--quiet", "-i", path])


POLICY = VWPolicy
