"""The daemon's evaluation worker: takes queued jobs one at a time (merge, evaluate, feedback), here or on Ray.

The queue's life cycle (claim, done, fail with back-off) is :mod:`.evalqueue`'s; what one job does is
:mod:`.pipeline`'s. A failing job is recorded with its reason, never fatal to the daemon.
"""

from __future__ import annotations

import threading

from . import evalqueue, pipeline
from .errors import SimmergeError
from .eventlog import event


class EvalWorker:
    """Run the evaluation queue of ``engine``'s store until ``stop`` is set (``run`` is the thread's target).

    ``ray``: the imported ray module when jobs run on Ray (the state keeps one writer: a Ray task gets the job's
    spec, plain data, and returns its scores; only this thread writes them). A Ray worker that dies in the middle
    of a job (killed, out of memory, its node lost) has the job run again by Ray, up to ``ray_retries`` times,
    before it counts as one failed attempt of the queue's."""

    def __init__(self, engine, stop: threading.Event, *, poll_s: float = 1.0, device: str = "auto",
                 eval_limit: int | None = None, max_attempts: int = 3, backoff_s: float = 2.0, ray=None,
                 executor: str = "local", ray_retries: int = 3):
        self.engine, self.store, self.stop = engine, engine.store, stop
        self.poll_s, self.device, self.eval_limit = poll_s, device, eval_limit
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.ray, self.executor = ray, executor
        # registered once: ray.remote on every job would pickle and export the function again each time
        self._remote = ray.remote(max_retries=ray_retries)(pipeline.run_spec) if ray is not None else None

    def run(self) -> None:
        while not self.stop.is_set():
            did = evalqueue.claim(self.store)
            if did is None:
                self.stop.wait(self.poll_s)
                continue
            self.run_job(did)

    def run_job(self, did: str) -> None:
        event("job started", id=did)
        try:
            spec = pipeline.job_spec(self.engine, did)
            if self._remote is not None:
                result = self.ray.get(self._remote.remote(spec, device=self.device, limit=self.eval_limit))
            else:
                result = pipeline.run_spec(spec, device=self.device, limit=self.eval_limit)
            pipeline.record(self.engine, spec, result)
            evalqueue.done(self.store, did, result)
            event("job done", id=did, reward=round(result["reward"], 4), seconds=round(result["seconds"], 2),
                  executor=self.executor, worker_pid=result.get("pid"))
        except Exception as e:  # a failing job is recorded, never fatal to the daemon
            reason = str(e) if isinstance(e, SimmergeError) else f"{type(e).__name__}: {e}"
            final, attempts = evalqueue.fail(self.store, did, reason, max_attempts=self.max_attempts,
                                             backoff_s=self.backoff_s)
            event("job failed" if final else "job will retry", id=did, attempts=attempts, reason=reason[:300])
