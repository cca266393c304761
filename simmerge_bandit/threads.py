"""Torch's CPU thread count for a block of work, restored afterwards (one helper for the executor, the signals
and the zoo)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: leave the setting alone), restoring it after.

    On a shared machine one thread is often several times faster than two: OpenMP threads that wait for a
    descheduled sibling spin instead of working.
    """
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
