"""Graceful interrupts: Ctrl-C or SIGTERM to `rayeff run` makes every worker finish its current step, write a
checkpoint and end the run with status `stopped: interrupted` (exit 130; `--resume` continues it to the weights an
uninterrupted run reaches). A second signal stops at once.

    driver:   with stop_on_signal(request): trainer.fit()     # the signal sets `request`, a tiny Ray actor
    workers:  watch = InterruptWatch(request, rank)           # rank 0 polls it without blocking its step;
              flag = watch.flag()                             # the loops agree on it in a per-step all-reduce
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import ray


@ray.remote(num_cpus=0)
class StopRequest:
    """Set once by the driver; read by rank 0."""

    def __init__(self):
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def is_requested(self) -> bool:
        return self.requested


class InterruptWatch:
    """Rank 0's view of the driver's stop request, polled without blocking: an answer is asked for, and read at a
    later step once it has come. Other ranks (and runs without a driver, in process) always say 0."""

    def __init__(self, request, rank: int):
        self.request = request if rank == 0 else None
        self.pending = None
        self.requested = False

    def flag(self) -> float:
        if self.request is None or self.requested:
            return float(self.requested)
        if self.pending is None:
            self.pending = self.request.is_requested.remote()
        ready, _ = ray.wait([self.pending], timeout=0)
        if ready:
            self.requested, self.pending = ray.get(self.pending), None
        return float(self.requested)


@contextlib.contextmanager
def stop_on_signal(request) -> Iterator[None]:
    """While the body runs: the first SIGINT or SIGTERM asks the workers to stop after their current step; a second
    raises KeyboardInterrupt, which stops at once. Python delivers signals to the main thread only, so a run started
    from another thread (a library caller's) keeps the signal handling it had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    asked = []

    def handle(signum, _frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        request.request.remote()
        print("\nrayeff: stopping after the current step and writing a checkpoint (again to stop at once)",
              file=sys.stderr, flush=True)

    for s in signals:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
