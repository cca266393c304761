"""A small multilayer perceptron for the SimMerge predictor: trained with torch, evaluated with numpy.

Why a network: a linear model of (pair features x operator descriptor) is capped by its class. On the bench zoo
it closes 75% of the best-fixed -> oracle gap even fitted *in-sample* on every task, and its descriptor is linear
in each operator parameter, so e.g. ``slerp t=0.5`` always scores the mean of ``t=0.3`` and ``t=0.7`` and can
never be the strict best. Two ReLU layers on ``[x_std, z_std]`` learn those interactions from the fitted rows.

Training is mini-batch AdamW on one thread from fixed seeds (initialisation and batch order, one per ensemble
member), so a fit is a deterministic function of its data and settings (no dependence on the policy's exploration
seed). One thread: on a shared two-core machine, two torch threads contending with other work ran a fit ~5x
slower than one. Only training needs torch; prediction and the features the ridge head reads are plain numpy
matrix products, so ranking costs microseconds per candidate and a snapshot is a handful of arrays.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from ..threads import torch_threads

#: AdamW's learning rate and weight decay, and the mini-batch size.
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-3
BATCH = 512
#: Fewest optimizer steps of a fit: a small table (a short decision log) gets more epochs, not fewer updates.
MIN_STEPS = 400


#: Recent fits by a digest of their data and settings. A fit is deterministic, so fitting the same rows again
#: (a simulation fits one predictor per seed and per warm-started bandit on the same training tasks) reuses it.
_FITS: OrderedDict[str, list[dict]] = OrderedDict()
_MAX_FITS = 64  # a fit's weights are ~100 kB


def train(inputs: np.ndarray, y: np.ndarray, *, hidden: int, epochs: int, members: int,
          seed: int = 0) -> list[dict]:
    """Fit ``members`` networks ``inputs -> y`` (mean squared error) and return their weights as arrays.

    Each member is ``Linear(n, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(hidden, 1)``, member
    ``i`` seeded with ``seed * members + i`` (so seed 0 seeds them 0, 1, ...; other seeds never share one). The
    target is centred (the caller's head refits the output layer with an intercept), which speeds up convergence at
    this small number of epochs. Callers must not modify the returned arrays.
    """
    inputs = np.ascontiguousarray(inputs, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    h = hashlib.sha1(inputs.tobytes())
    h.update(y.tobytes())
    h.update(repr((inputs.shape, hidden, epochs, members, LEARNING_RATE, WEIGHT_DECAY, BATCH, MIN_STEPS,
                   seed)).encode())
    key = h.hexdigest()
    if key not in _FITS:
        _FITS[key] = _train(inputs, y, hidden, epochs, members, seed)
        if len(_FITS) > _MAX_FITS:
            _FITS.popitem(last=False)
    _FITS.move_to_end(key)
    return _FITS[key]


def _train(inputs: np.ndarray, y: np.ndarray, hidden: int, epochs: int, members: int, seed: int) -> list[dict]:
    import torch

    with torch_threads(1):
        return [_train_one(torch, inputs, y, hidden, epochs, seed * members + i) for i in range(members)]


def _train_one(torch, inputs: np.ndarray, y: np.ndarray, hidden: int, epochs: int, seed: int) -> dict:
    x = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    target = torch.as_tensor(np.asarray(y - y.mean(), dtype=np.float32))
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    batches = -(-x.shape[0] // BATCH)
    for _ in range(max(epochs, -(-MIN_STEPS // batches))):
        perm = torch.randperm(x.shape[0], generator=order)
        for start in range(0, x.shape[0], BATCH):
            rows = perm[start: start + BATCH]
            opt.zero_grad()
            loss = ((net(x[rows])[:, 0] - target[rows]) ** 2).mean()
            loss.backward()
            opt.step()
    # the output layer is left out: the predictor's ridge head replaces it (see :func:`features`)
    return {name.replace(".", "_"): p.detach().numpy().astype(np.float64)
            for name, p in net.named_parameters() if not name.startswith("4.")}


def features(nets: list[dict], inputs: np.ndarray) -> np.ndarray:
    """The last hidden layer of every member, side by side: ``(n, members * hidden)``.

    The predictor's ridge head is fitted on these (``[1, features]``), which is what gives it a posterior width
    and closed-form online updates (a "neural-linear" model: the network is the feature map, frozen after the
    fit, and the head is Bayesian linear regression on it).
    """
    return _second_layer(nets, [inputs @ w["0_weight"].T + w["0_bias"] for w in nets])


def grid_features(nets: list[dict], X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """:func:`features` of every row of ``X`` (P, d) with every row of ``Z`` (K, k), pair-major (P * K rows).

    The first layer is linear in ``[x, z]``, so it is ``W_x x + W_z z``: computed once per pair and once per
    operator and added, instead of once per candidate (the engine ranks every pair x every operator)."""
    d = X.shape[1]
    pre = []
    for w in nets:
        hx = X @ w["0_weight"][:, :d].T
        hz = Z @ w["0_weight"][:, d:].T + w["0_bias"]
        pre.append((hx[:, None, :] + hz[None, :, :]).reshape(-1, hx.shape[1]))
    return _second_layer(nets, pre)


def _second_layer(nets: list[dict], pre: list[np.ndarray]) -> np.ndarray:
    """ReLU of each member's first-layer pre-activations, then its second layer and ReLU, side by side."""
    return np.concatenate([np.maximum(np.maximum(a, 0.0) @ w["2_weight"].T + w["2_bias"], 0.0)
                           for w, a in zip(nets, pre)], axis=1)


def to_arrays(nets: list[dict]) -> dict[str, np.ndarray]:
    """The weights as flat snapshot arrays, ``mlp/<member>/<parameter>``."""
    return {f"mlp/{i}/{k}": v for i, w in enumerate(nets) for k, v in w.items()}


def from_arrays(arrays: dict[str, np.ndarray]) -> list[dict]:
    """Inverse of :func:`to_arrays` (empty when the snapshot holds no network)."""
    nets: dict[int, dict] = {}
    for key, v in arrays.items():
        if key.startswith("mlp/"):
            _, i, name = key.split("/", 2)
            nets.setdefault(int(i), {})[name] = np.array(v, dtype=np.float64)
    return [nets[i] for i in sorted(nets)]
