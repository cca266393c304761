"""Policy speed: our policies against MABWiser's LinUCB and Vowpal Wabbit's cb_explore_adf, on one stream.

Every library sees the same synthetic stream: at each step ``pairs`` fresh candidate pairs (context ``d``
features each) times ``K`` operators; it ranks them (suggest), picks one, gets that candidate's reward from the
same reward function and learns from it (update). Measured per call: suggest and update latency (p50 / p99) and
throughput, and the full suggest + update loop, each with the wall clock and with the thread's CPU time (which
leaves out the time other processes take the core away: this machine is shared). The libraries advance through
the stream in interleaved rounds so that load changes hit them alike; figures are compared as ratios.

- ours: ``simmerge_bandit.policies`` (``linucb`` is the headline, the others are listed for reference). Suggest
  includes building the :class:`Candidates` object and taking the top 5 (``Ranking.top``), as the engine must.
- MABWiser ``LearningPolicy.LinUCB`` (same alpha and l2): suggest = ``predict_expectations`` on the ``pairs``
  contexts and an argmax over (pair, operator); update = ``partial_fit`` of the one chosen decision.
- VW ``--cb_explore_adf --squarecb -q xz -q xa`` (our ``vw`` policy's default), driven directly through pyvw:
  suggest = write the text lines, parse, predict the pmf, sample; update = ``learn`` on the chosen action only
  (the cheapest correct VW update; a full multi-line learn would only make VW slower).

Goals (issue 6): updates >= 50x MABWiser's; a full loop at least as fast as VW's; in-process rank p99 < 5 ms for
100 pairs x 12 operators. Single-threaded BLAS (set below) so that the numbers do not depend on what else runs.

Update speed is compared two ways: throughput (the mean, which on a shared machine carries the time slices lost to
other processes: a 4 ms slice lands in a 10 us update about once in 400) and the median (which does not). The rank
p99 goal gets its own run after the interleaved rounds: ``LATENCY_STEPS`` consecutive suggest + update steps per
policy at 100 pairs x 12 operators, back to back, and again with the process idle for ``PACE_MS`` before each
suggestion, as a server waiting for its next request is. Load averages are recorded before and after every
configuration.

    python benchmarks/bench_policies.py            # writes benchmarks/results/policies.json
    python benchmarks/bench_policies.py --quick    # fewer steps, for a smoke run
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from simmerge_bandit.policies import Candidates, make_policy  # noqa: E402

ALPHA, L2 = 1.0, 1.0
VW_ARGS = "--cb_explore_adf --squarecb -q xz -q xa --quiet --random_seed 0"
N_FAMILIES = 4
TOP = 5                 # suggestions shown per call, as `simmerge suggest --top 5`
LATENCY_STEPS = 3000    # rank samples per policy for the p99 goal (30 in the top percentile)
PACE_MS = 2.0           # idle time before each suggestion in the paced latency run


class Stream:
    """Seeded synthetic stream: operator descriptors, per-operator true weights, fresh pair contexts per step."""

    def __init__(self, d: int, K: int, pairs: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.d, self.K, self.pairs = d, K, pairs
        self.names = [f"op{i}" for i in range(K)]
        fam = np.eye(N_FAMILIES)[np.arange(K) % N_FAMILIES]
        self.Zarm = np.hstack([fam, rng.uniform(0, 1, size=(K, 2))])
        self.W = rng.normal(size=(K, d)) / np.sqrt(d)
        self.bias = rng.uniform(0.2, 0.8, size=K)
        self.seed = seed

    def contexts(self, steps: int) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).normal(size=(steps, self.pairs, self.d))

    def reward(self, x: np.ndarray, k: int, rng: np.random.Generator) -> float:
        return float(np.clip(self.bias[k] + 0.3 * np.tanh(x @ self.W[k]) + 0.05 * rng.normal(), 0.0, 1.2))

    def candidates(self, Xp: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """(X, arms, Z, operator index) for every (pair, operator), pair-major."""
        ks = np.tile(np.arange(self.K), Xp.shape[0])
        return np.repeat(Xp, self.K, axis=0), [self.names[k] for k in ks], self.Zarm[ks], ks

    def warmup(self, n: int = 200, offset: int = 2):
        """``n`` logged events (context, operator index, reward), operators in turn."""
        rng = np.random.default_rng(self.seed + offset)
        X = rng.normal(size=(n, self.d))
        ks = np.arange(n) % self.K
        return X, ks, np.array([self.reward(x, k, rng) for x, k in zip(X, ks)])


def _stats(sug: list[tuple[int, int]], upd: list[tuple[int, int]], rewards: list[float]) -> dict:
    """Latency and throughput from wall-clock and from this thread's CPU time (immune to other jobs' load)."""
    out = {"steps": len(sug), "mean_reward": float(np.mean(rewards))}
    for clock, col in (("", 0), ("cpu_", 1)):
        s = np.array([t[col] for t in sug]) / 1e6
        u = np.array([t[col] for t in upd]) / 1e6
        out.update({
            f"{clock}suggest_p50_ms": float(np.percentile(s, 50)),
            f"{clock}suggest_p99_ms": float(np.percentile(s, 99)),
            f"{clock}suggest_per_s": float(1e3 / s.mean()),
            f"{clock}update_p50_us": float(np.percentile(u, 50) * 1e3),
            f"{clock}update_p99_us": float(np.percentile(u, 99) * 1e3),
            f"{clock}update_per_s": float(1e3 / u.mean()),
            f"{clock}loop_per_s": float(1e3 / (s + u).mean()),
        })
    return out


class Clock:
    """Wall-clock and thread CPU time of one block: ``with Clock() as c: ...; c.ns == (wall, cpu)``."""

    # The CPU clock is the slower one to read (~1 us): read it outside the wall-clock interval.
    def __enter__(self):
        self._c = time.thread_time_ns()
        self._w = time.perf_counter_ns()
        return self

    def __exit__(self, *exc):
        w = time.perf_counter_ns()
        self.ns = (w - self._w, time.thread_time_ns() - self._c)


def clock_overhead(n: int = 2000) -> dict:
    """What an empty :class:`Clock` block measures (medians, us): the clocks' own cost inside every sample.

    Reading the thread's CPU clock is a system call, so every CPU-time sample carries one of its edges: about 1 us
    here with warm caches, about 2 us right after a ranking; nothing next to MABWiser's update, a tenth to a fifth
    of ours. Recorded, not subtracted.
    """
    samples = []
    for _ in range(n):
        with Clock() as c:
            pass
        samples.append(c.ns)
    wall, cpu = np.median(np.array(samples), axis=0) / 1e3
    return {"wall_us": float(wall), "cpu_us": float(cpu)}


class Runner:
    """One library on the stream: ``step(Xp)`` suggests over the pairs x operators, learns, records timings."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.rng = np.random.default_rng(stream.seed + 3)  # reward noise: the same sequence for everyone
        self.sug: list[tuple[int, int]] = []
        self.upd: list[tuple[int, int]] = []
        self.rew: list[float] = []
        self.stream_stats: dict = {}

    def stats(self) -> dict:
        out = _stats(self.sug, self.upd, self.rew)
        out.update(self.stream_stats)
        return out

    def update_stream(self, X: np.ndarray, ks: np.ndarray, r: np.ndarray) -> None:
        """Time a run of consecutive updates (a batch of feedback, a rebuild from the log), one call each."""
        with Clock() as c:
            self._learn_all(X, ks, r)
        self.stream_stats = {"stream_updates": len(r), "stream_update_per_s": len(r) / (c.ns[0] / 1e9),
                             "cpu_stream_update_per_s": len(r) / (c.ns[1] / 1e9)}


class Ours(Runner):
    def __init__(self, stream: Stream, name: str):
        super().__init__(stream)
        self.policy = make_policy(name, alpha=ALPHA, l2=L2) if name.startswith("linucb") else make_policy(name)
        X0, k0, r0 = stream.warmup()
        for x, k, r in zip(X0, k0, r0):
            self.policy.update(x, stream.names[k], stream.Zarm[k], r)

    def _learn_all(self, X, ks, r) -> None:
        names, Zarm, policy = self.stream.names, self.stream.Zarm, self.policy
        for x, k, y in zip(X, ks, r):
            policy.update(x, names[k], Zarm[k], y, 0.5)

    def step(self, Xp: np.ndarray) -> None:
        X, arms, Z, ks = self.stream.candidates(Xp)
        with Clock() as c1:
            ranking = self.policy.rank(Candidates(X, arms, Z))
            ranking.top(TOP)
        i = ranking.choice
        r = self.stream.reward(X[i], ks[i], self.rng)
        with Clock() as c2:
            self.policy.update(X[i], arms[i], Z[i], r, ranking.propensity[i])
        self.sug.append(c1.ns)
        self.upd.append(c2.ns)
        self.rew.append(r)


class MABWiser(Runner):
    def __init__(self, stream: Stream):
        super().__init__(stream)
        from mabwiser.mab import MAB, LearningPolicy

        self.mab = MAB(stream.names, LearningPolicy.LinUCB(alpha=ALPHA, l2_lambda=L2), seed=0)
        X0, k0, r0 = stream.warmup()
        self.mab.fit([stream.names[k] for k in k0], r0, X0)

    def _learn_all(self, X, ks, r) -> None:
        names, mab = self.stream.names, self.mab
        for i in range(len(r)):
            mab.partial_fit([names[ks[i]]], [r[i]], X[i:i + 1])

    def step(self, Xp: np.ndarray) -> None:
        names = self.stream.names
        with Clock() as c1:
            exp = self.mab.predict_expectations(Xp)
            exp = exp if isinstance(exp, list) else [exp]
            table = np.array([[e[a] for a in names] for e in exp])  # (pairs, K) UCB scores
            j, k = np.unravel_index(int(np.argmax(table)), table.shape)
        r = self.stream.reward(Xp[j], k, self.rng)
        with Clock() as c2:
            self.mab.partial_fit([names[k]], [r], Xp[j:j + 1])
        self.sug.append(c1.ns)
        self.upd.append(c2.ns)
        self.rew.append(r)


def _vw_lines(X: np.ndarray, Z: np.ndarray, arms: list[str]) -> list[str]:
    tx = " ".join(f"{j}:%.9g" for j in range(X.shape[1]))
    tz = " ".join(f"{j}:%.9g" for j in range(Z.shape[1]))
    return [f"|x {tx % tuple(x)} |z {tz % tuple(z)} |a {a}" for x, z, a in zip(X.tolist(), Z.tolist(), arms)]


class VW(Runner):
    def __init__(self, stream: Stream):
        super().__init__(stream)
        from vowpalwabbit import pyvw

        self.vw = pyvw.Workspace(VW_ARGS)
        X0, k0, r0 = stream.warmup()
        for line, r in zip(_vw_lines(X0, stream.Zarm[k0], [stream.names[k] for k in k0]), r0):
            self.vw.learn([f"0:{-r}:1.0 {line}"])
        self.pick = np.random.default_rng(0)

    def _learn_all(self, X, ks, r) -> None:
        lines = _vw_lines(X, self.stream.Zarm[ks], [self.stream.names[k] for k in ks])  # text written beforehand
        for line, y in zip(lines, r):
            self.vw.learn([f"0:{-y}:0.5 {line}"])

    def step(self, Xp: np.ndarray) -> None:
        X, arms, Z, ks = self.stream.candidates(Xp)
        with Clock() as c1:
            lines = _vw_lines(X, Z, arms)
            pmf = np.asarray(self.vw.predict(lines))
            pmf = pmf / pmf.sum()
            i = int(min(np.searchsorted(np.cumsum(pmf), self.pick.random(), side="right"), len(pmf) - 1))
        r = self.stream.reward(X[i], ks[i], self.rng)
        with Clock() as c2:
            self.vw.learn([f"0:{-r}:{pmf[i]} {lines[i]}"])
        self.sug.append(c1.ns)
        self.upd.append(c2.ns)
        self.rew.append(r)


def bench_config(d: int, K: int, pairs: int, quick: bool, extra: bool, rounds: int = 20) -> dict:
    """All libraries advance through the same stream in interleaved rounds, so load changes hit them alike."""
    load_before = os.getloadavg()
    stream = Stream(d, K, pairs)
    big = pairs * K >= 400
    # Steps per round: the fast ones take more so that each library's share of a round is comparable, and ours
    # more again because its ~10 us updates meet a preempting time slice rarely: a few hundred samples would leave
    # their wall-clock mean to chance.
    quota = {"ours:linucb": 50 if big else 200, "mabwiser:LinUCB": 8 if big else 40, "vw:cb_explore_adf": 3 if big
             else 60}
    runners = {"ours:linucb": Ours(stream, "linucb"), "mabwiser:LinUCB": MABWiser(stream),
               "vw:cb_explore_adf": VW(stream)}
    if extra:
        for name in ("linucb-hybrid", "lints", "egreedy", "predictor"):
            runners[f"ours:{name}"] = Ours(stream, name)
            quota[f"ours:{name}"] = 10 if big else 100
        runners["ours:vw"] = Ours(stream, "vw")
        quota["ours:vw"] = quota["vw:cb_explore_adf"]
    if quick:
        rounds = 3
    contexts = stream.contexts(max(quota.values()) * rounds)
    pos = dict.fromkeys(runners, 0)
    for _ in range(rounds):
        for key, runner in runners.items():
            for _ in range(quota[key]):
                runner.step(contexts[pos[key]])
                pos[key] += 1
    # Then a run of consecutive updates per library (fewer for the slow ones; throughput is per update).
    logged = stream.warmup(2000, offset=4)
    for key, runner in runners.items():
        m = 200 if key.startswith("mabwiser") or key in ("ours:linucb-hybrid", "ours:predictor") else 2000
        if quick:
            m //= 10
        runner.update_stream(logged[0][:m], logged[1][:m], logged[2][:m])
    res = {k: r.stats() for k, r in runners.items()}
    ours, mab, vw = res["ours:linucb"], res["mabwiser:LinUCB"], res["vw:cb_explore_adf"]
    ratios = {
        "update_per_s_vs_mabwiser": ours["update_per_s"] / mab["update_per_s"],
        "suggest_per_s_vs_mabwiser": ours["suggest_per_s"] / mab["suggest_per_s"],
        "loop_per_s_vs_mabwiser": ours["loop_per_s"] / mab["loop_per_s"],
        "update_per_s_vs_vw": ours["update_per_s"] / vw["update_per_s"],
        "suggest_per_s_vs_vw": ours["suggest_per_s"] / vw["suggest_per_s"],
        "loop_per_s_vs_vw": ours["loop_per_s"] / vw["loop_per_s"],
        "cpu_update_per_s_vs_mabwiser": ours["cpu_update_per_s"] / mab["cpu_update_per_s"],
        "stream_update_per_s_vs_mabwiser": ours["stream_update_per_s"] / mab["stream_update_per_s"],
        "stream_update_per_s_vs_vw": ours["stream_update_per_s"] / vw["stream_update_per_s"],
        "cpu_loop_per_s_vs_vw": ours["cpu_loop_per_s"] / vw["cpu_loop_per_s"],
        "update_p50_vs_mabwiser": mab["update_p50_us"] / ours["update_p50_us"],
        "cpu_update_p50_vs_mabwiser": mab["cpu_update_p50_us"] / ours["cpu_update_p50_us"],
    }
    return {"d": d, "operators": K, "pairs": pairs, "candidates": pairs * K, "results": res, "ratios": ratios,
            "loadavg": {"before": load_before, "after": os.getloadavg()}}


def bench_latency(d: int, K: int, pairs: int, quick: bool) -> dict:
    """Rank latency of our policies with enough samples for a p99: back to back, then paced like a server.

    Each step is the loop of the interleaved rounds (rank + top 5, reward, update); only the rank is reported.
    Back to back, a step that the scheduler interrupts to run another process waits a whole time slice (4 ms
    here); paced, the process sleeps ``PACE_MS`` before each suggestion, and a task that wakes from a sleep is
    usually run at once, ahead of ones that have been computing.
    """
    load_before = os.getloadavg()
    stream = Stream(d, K, pairs)
    steps = LATENCY_STEPS // 10 if quick else LATENCY_STEPS
    contexts = stream.contexts(steps)
    out: dict = {}
    for name in ("linucb", "linucb-hybrid", "egreedy", "predictor", "lints"):
        for mode in ("back_to_back", "paced"):
            if mode == "paced" and name not in ("linucb", "linucb-hybrid"):
                continue
            runner = Ours(stream, name)
            for Xp in contexts:
                if mode == "paced":
                    time.sleep(PACE_MS / 1e3)
                runner.step(Xp)
            wall, cpu = (np.array([t[col] for t in runner.sug]) / 1e6 for col in (0, 1))
            out.setdefault(f"ours:{name}", {})[mode] = {
                "n": int(wall.size), "p50_ms": float(np.percentile(wall, 50)),
                "p99_ms": float(np.percentile(wall, 99)), "max_ms": float(wall.max()),
                "cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p99_ms": float(np.percentile(cpu, 99)),
                # Steps whose wall time exceeds their CPU time by over 1 ms waited for the CPU.
                "waited_share": float(np.mean(wall - cpu > 1.0)),
            }
    return {"d": d, "operators": K, "pairs": pairs, "candidates": pairs * K, "pace_ms": PACE_MS,
            "results": out, "loadavg": {"before": load_before, "after": os.getloadavg()}}


def markdown_table(res: dict) -> str:
    """The README's summary of a results file: headline ratios per configuration, then the rank latencies."""
    rows = ["| d | ops | pairs | loop/s ours (linucb) | MABWiser | VW | loop vs VW | updates/s ours | vs MABWiser "
            "(in loop: mean / median; run of updates) | rank p50 / p99 ms (CPU p99) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["configs"] + res["goal_configs"]:
        o, m, v = (c["results"][k] for k in ("ours:linucb", "mabwiser:LinUCB", "vw:cb_explore_adf"))
        q = c["ratios"]
        rows.append(f"| {c['d']} | {c['operators']} | {c['pairs']} | {o['loop_per_s']:,.0f} | {m['loop_per_s']:,.0f} "
                    f"| {v['loop_per_s']:,.0f} | {q['loop_per_s_vs_vw']:.1f}x | {o['update_per_s']:,.0f} "
                    f"| {q['update_per_s_vs_mabwiser']:.0f}x / {q['update_p50_vs_mabwiser']:.0f}x; "
                    f"{q['stream_update_per_s_vs_mabwiser']:.0f}x "
                    f"| {o['suggest_p50_ms']:.2f} / {o['suggest_p99_ms']:.2f} ({o['cpu_suggest_p99_ms']:.2f}) |")
    rows += ["", "| d | policy (100 pairs x 12 ops) | ranks | p50 ms | p99 ms back to back (CPU p99) | waited "
             "| p99 ms paced |", "|---|---|---|---|---|---|---|"]
    for lat in res["latency"]:
        for name, modes in lat["results"].items():
            b = modes["back_to_back"]
            paced = f"{modes['paced']['p99_ms']:.2f}" if "paced" in modes else ""
            rows.append(f"| {lat['d']} | {name.split(':', 1)[1]} | {b['n']:,} | {b['p50_ms']:.2f} "
                        f"| {b['p99_ms']:.2f} ({b['cpu_p99_ms']:.2f}) | {b['waited_share']:.1%} | {paced} |")
    g = res["goals"]
    met = g["met"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    slowest = max(((v, d, k.split(":", 1)[1]) for d, by in g["rank_p99_ms_100x12"].items() for k, v in by.items()))
    linucb_p99 = " / ".join(f"{by['ours:linucb']:.2f}" for by in g["rank_p99_ms_100x12"].values())
    rows += ["", f"Goals, worst configuration: updates >= {g['updates_vs_mabwiser_goal']:.0f}x MABWiser's "
             f"{verdict(met['updates_50x_mabwiser'])}: {g['updates_vs_mabwiser_min_ratio']:.0f}x (means, wall clock), "
             f"{g['updates_vs_mabwiser_min_ratio_cpu']:.0f}x (means, CPU time), "
             f"{g['updates_p50_vs_mabwiser_min_ratio']:.0f}x (medians), "
             f"{g['stream_updates_vs_mabwiser_min_ratio']:.0f}x for a run of updates; a full suggest + update loop at "
             f"least as fast as VW's {verdict(met['loop_at_least_vw'])}: {g['loop_vs_vw_min_ratio']:.2f}x "
             f"(CPU time {g['loop_vs_vw_min_ratio_cpu']:.2f}x); rank p99 < {g['rank_p99_ms_goal']:.0f} ms at 100 pairs "
             f"x 12 operators {verdict(met['linucb_rank_p99_under_5ms'])} for `linucb` "
             f"({linucb_p99} ms at "
             f"{' / '.join(g['rank_p99_ms_100x12'])}); the slowest policy, `{slowest[2]}`, {slowest[0]:.2f} ms "
             f"({slowest[1]})."]
    for c in res["goal_configs"]:
        others = [(k.split(":", 1)[1], v) for k, v in c["results"].items()
                  if k.startswith("ours:") and k != "ours:linucb"]
        if others:
            rows += ["", f"The other policies in the interleaved run at d = {c['d']}, {c['pairs']} pairs x "
                     f"{c['operators']} operators (rank p50 / CPU p99, update p50): " + "; ".join(
                         f"`{n}` {v['suggest_p50_ms']:.2f} / {v['cpu_suggest_p99_ms']:.2f} ms, "
                         f"{v['update_p50_us']:.0f} us" for n, v in others) + "."]
    m = res["machine"]
    rows += ["", f"Machine: {m['cpus']} CPU cores, BLAS threads {m['blas_threads']}, load average "
             f"{m['loadavg_before'][0]:.1f} before and {m['loadavg_after'][0]:.1f} after; {res['seconds']:.0f} s in all"
             + (" (a --quick run)." if res.get("quick") else ".")]
    return "\n".join(rows)


def goals_of(all_cfgs: list[dict], latency: list[dict]) -> dict:
    """The issue's goals, each with the worst configuration's figure (ratios: min over configurations)."""
    def worst(key: str) -> float:
        return min(c["ratios"][key] for c in all_cfgs)

    def p99(mode: str, key: str) -> dict:
        return {f"d={lat['d']}": {k: v[mode][key] for k, v in lat["results"].items() if mode in v}
                for lat in latency}

    goals = {
        "updates_vs_mabwiser_goal": 50.0,
        "updates_vs_mabwiser_min_ratio": worst("update_per_s_vs_mabwiser"),
        "updates_vs_mabwiser_min_ratio_cpu": worst("cpu_update_per_s_vs_mabwiser"),
        "updates_p50_vs_mabwiser_min_ratio": worst("update_p50_vs_mabwiser"),
        "stream_updates_vs_mabwiser_min_ratio": worst("stream_update_per_s_vs_mabwiser"),
        "loop_vs_vw_goal": 1.0,
        "loop_vs_vw_min_ratio": worst("loop_per_s_vs_vw"),
        "loop_vs_vw_min_ratio_cpu": worst("cpu_loop_per_s_vs_vw"),
        "rank_p99_ms_goal": 5.0,
        "rank_p99_ms_100x12": p99("back_to_back", "p99_ms"),
        "rank_p99_ms_100x12_cpu": p99("back_to_back", "cpu_p99_ms"),
        "rank_p99_ms_100x12_paced": p99("paced", "p99_ms"),
    }
    linucb_under = {k: all(v["ours:linucb"] < 5 for v in goals[k].values())
                    for k in ("rank_p99_ms_100x12", "rank_p99_ms_100x12_cpu", "rank_p99_ms_100x12_paced")}
    goals["met"] = {
        "updates_50x_mabwiser": goals["updates_vs_mabwiser_min_ratio"] >= 50,
        "updates_50x_mabwiser_cpu": goals["updates_vs_mabwiser_min_ratio_cpu"] >= 50,
        "updates_p50_50x_mabwiser": goals["updates_p50_vs_mabwiser_min_ratio"] >= 50,
        "stream_updates_50x_mabwiser": goals["stream_updates_vs_mabwiser_min_ratio"] >= 50,
        "loop_at_least_vw": goals["loop_vs_vw_min_ratio"] >= 1,
        "loop_at_least_vw_cpu": goals["loop_vs_vw_min_ratio_cpu"] >= 1,
        "linucb_rank_p99_under_5ms": linucb_under["rank_p99_ms_100x12"],
        "linucb_rank_p99_under_5ms_cpu": linucb_under["rank_p99_ms_100x12_cpu"],
        "linucb_rank_p99_under_5ms_paced": linucb_under["rank_p99_ms_100x12_paced"],
    }
    return goals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "policies.json"))
    ap.add_argument("--table", action="store_true",
                    help="print the benchmark page's tables from the results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()
    t_start = time.time()
    configs = []
    for d in (16, 32):
        for K in (8, 16):
            for pairs in (1, 100):
                cfg = bench_config(d, K, pairs, args.quick, extra=(pairs == 100))
                configs.append(cfg)
                o, m, v = (cfg["results"][k] for k in ("ours:linucb", "mabwiser:LinUCB", "vw:cb_explore_adf"))
                print(f"d={d:2d} K={K:2d} pairs={pairs:3d}: ours update {o['update_per_s']:8.0f}/s "
                      f"(x{cfg['ratios']['update_per_s_vs_mabwiser']:.0f} MABWiser, median "
                      f"x{cfg['ratios']['update_p50_vs_mabwiser']:.0f}; in a run of updates "
                      f"x{cfg['ratios']['stream_update_per_s_vs_mabwiser']:.0f}), loop {o['loop_per_s']:7.0f}/s "
                      f"(x{cfg['ratios']['loop_per_s_vs_vw']:.1f} VW, MABWiser {m['loop_per_s']:.0f}/s, "
                      f"VW {v['loop_per_s']:.0f}/s), rank p99 {o['suggest_p99_ms']:.2f} ms", flush=True)
    goal_cfgs = [bench_config(d, 12, 100, args.quick, extra=True) for d in (16, 32)]
    latency = []
    for d in (16, 32):
        lat = bench_latency(d, 12, 100, args.quick)
        latency.append(lat)
        r = lat["results"]
        print(f"goal d={d} 100 pairs x 12 operators, {r['ours:linucb']['back_to_back']['n']} ranks: linucb p99 "
              f"{r['ours:linucb']['back_to_back']['p99_ms']:.2f} ms back to back "
              f"(CPU {r['ours:linucb']['back_to_back']['cpu_p99_ms']:.2f}), "
              f"{r['ours:linucb']['paced']['p99_ms']:.2f} ms paced; hybrid "
              f"{r['ours:linucb-hybrid']['back_to_back']['p99_ms']:.2f} / "
              f"{r['ours:linucb-hybrid']['paced']['p99_ms']:.2f} ms", flush=True)
    goals = goals_of(configs + goal_cfgs, latency)
    out = {
        "benchmark": "policies", "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "clock_overhead": clock_overhead(),
                    "note": "shared 2-core machine; other engineers' jobs may run at the same time"},
        "seconds": round(time.time() - t_start, 1),
        "configs": configs, "goal_configs": goal_cfgs, "latency": latency, "goals": goals,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(goals, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
