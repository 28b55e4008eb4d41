"""The sweep-wide limits, held by one Ray actor that every trial's rank-0 worker tells its energy at each log step.

Trials stop themselves when the sweep's energy reaches `energy.sweep_budget_j` or its time limit passes, so a stopped
trial still evaluates, checkpoints and reports like any other (status `stopped: sweep energy budget`). The searcher
asks the same actor before it starts a trial: none starts that would, by the mean energy of the trials finished so
far, carry the sweep past its budget. Overshoot is therefore bounded by what the running trials draw between two
log steps.
"""

from __future__ import annotations

import time

ENERGY = "sweep energy budget"
TIME = "time limit"


class SweepLimits:
    """Run as a Ray actor (`ray.remote(num_cpus=0)(SweepLimits)`); plain methods, so tests can call it directly."""

    def __init__(self, budget_j: float | None, time_limit_s: float | None, earlier_j: list[float] = ()):
        self.budget_j = budget_j
        self.deadline = time.monotonic() + time_limit_s if time_limit_s else None
        # Trials of an earlier, interrupted invocation of this sweep count as finished ones.
        self.energy: dict[str, float] = {f"earlier-{i}": j for i, j in enumerate(earlier_j)}
        self.finished: set[str] = set(self.energy)
        self.stopped_by: str | None = None   # the first limit that stopped a trial or the start of one

    def total_j(self) -> float:
        return sum(self.energy.values())

    def update(self, trial: str, joules: float) -> tuple[str | None, float | None]:
        """A running trial's energy so far; returns why it must stop (or None) and the sweep's energy left."""
        self.energy[trial] = max(joules, self.energy.get(trial, 0.0))
        reason = None
        if self.budget_j is not None and self.total_j() >= self.budget_j:
            reason = ENERGY
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            reason = TIME
        self.stopped_by = self.stopped_by or reason
        return reason, (None if self.budget_j is None else max(self.budget_j - self.total_j(), 0.0))

    def finish(self, trial: str, joules: float | None) -> None:
        if joules is not None:
            self.energy[trial] = max(joules, self.energy.get(trial, 0.0))
        self.finished.add(trial)

    def start(self, trial: str) -> str | None:
        """Register a trial about to start, or return why the sweep must start no more. A new trial is expected to
        cost the mean energy of the finished ones, and each running trial the rest of that mean."""
        reason = self._why_not_start()
        if reason is None:
            self.energy.setdefault(trial, 0.0)
        self.stopped_by = self.stopped_by or reason
        return reason

    def _why_not_start(self) -> str | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return TIME
        if self.budget_j is None:
            return None
        done = [self.energy[t] for t in self.finished if t in self.energy]
        if not done:
            return ENERGY if self.total_j() >= self.budget_j else None
        expected = sum(done) / len(done)
        running = [j for t, j in self.energy.items() if t not in self.finished]
        committed = self.total_j() + sum(max(expected - j, 0.0) for j in running)
        return ENERGY if committed + expected > self.budget_j else None

    def why_stopped(self) -> str | None:
        return self.stopped_by
