"""Where a run's progress goes while it trains: the driver's display (a Ray queue), the cluster's live metrics and
status board (rayeff/cluster/live.py), the job's experiment trackers (rayeff/tracking.py), and, in a sweep, the
sweep's limits actor, which may tell the run to stop. Rank 0 speaks for the run; every rank hears the sweep's answer,
so all stop together."""

from __future__ import annotations

import numpy as np

from rayeff.results import Progress
from rayeff.train.collectives import all_gather
from rayeff.train.state import TrainState


class Reporter:
    def __init__(self, rank: int, job, task_name: str, dev_metric: str, links: dict):
        """`links` (from the driver, all optional): progress_queue, sweep_limits and trial_key (a sweep's trial),
        labels (the run's metric labels; without them no live metrics are kept, e.g. in process), stop_request
        (the driver's, rayeff/train/interrupts.py)."""
        self.rank, self.job = rank, job
        self.interrupts = None
        if links.get("stop_request") is not None:
            from rayeff.train.interrupts import InterruptWatch

            self.interrupts = InterruptWatch(links["stop_request"], rank)
        self.progress_queue = links.get("progress_queue")
        self.sweep_limits, self.trial_key = links.get("sweep_limits"), links.get("trial_key")
        self.sweep_remaining_j = None   # rank 0: the sweep's energy left, as its limits actor last said
        self.live = None
        if rank == 0 and links.get("labels"):
            from rayeff.cluster.live import LiveRun

            self.live = LiveRun(links["labels"], dev_metric, job.energy.budget_j,
                                {"task": task_name, "model": job.model.name, "output_dir": job.output_dir})
        self.tracker = None
        if rank == 0 and job.tracking.enabled:
            from pathlib import Path

            from rayeff.tracking import Tracker

            self.tracker = Tracker.open(job, self.trial_key or Path(job.output_dir).name)

    def progress(self, state: TrainState, total_steps: int, energy: dict, extra: dict | None = None) -> dict:
        """This step's `Progress` (rayeff/results.py), as the dict that travels; `extra` adds a loop's own fields
        (the zeroth-order `queries`, `queries_per_second`)."""
        window = state.losses[-self.job.training.log_every:]
        return Progress(step=state.step, total_steps=total_steps, epoch=state.epoch,
                        loss=float(np.mean(window)) if window else None,
                        samples_per_second=state.samples / max(state.train_seconds, 1e-9),
                        energy_joules=energy["joules"], energy_source=energy["source"], eval=state.last_eval,
                        **(extra or {})).dump()

    def log(self, progress: dict, energy: dict) -> str | None:
        """Publish a log step's progress; return why the run must stop (its own or the sweep's energy budget, the
        sweep's time limit), or None."""
        sweep_stop = self.sweep_stop_reason(energy)
        self.publish(progress)
        if self.job.energy.budget_j is not None and energy["joules"] >= self.job.energy.budget_j:
            return "stopped: energy budget"
        return f"stopped: {sweep_stop}" if sweep_stop is not None else None

    def stop_flag(self) -> float:
        """1.0 once rank 0 has heard the driver's stop request, else 0.0 (the loops take the largest over workers,
        so all stop after the same step)."""
        return self.interrupts.flag() if self.interrupts is not None else 0.0

    @property
    def interruptible(self) -> bool:
        """Whether the driver can ask this run to stop (the same on every rank)."""
        return self.interrupts is not None

    def publish(self, progress: dict) -> None:
        """Rank 0 hands progress to the driver's display and to the cluster (metrics, status board)."""
        if self.rank != 0:
            return
        if self.live is not None:
            self.live.update(progress, self.sweep_remaining_j)
        if self.tracker is not None:
            self.tracker.log_progress(progress)
        if self.progress_queue is not None:
            try:
                self.progress_queue.put_nowait({**progress, "trial": self.trial_key} if self.trial_key else progress)
            except Exception:  # a full or gone display queue must never stop training
                pass

    def sweep_stop_reason(self, energy: dict) -> str | None:
        """Rank 0 tells the sweep's limits actor this trial's energy so far and hears back whether the sweep must
        stop (`sweep energy budget`, `time limit`) and the sweep's energy left."""
        if self.sweep_limits is None:
            return None
        import ray

        answer = None
        if self.rank == 0:
            answer, self.sweep_remaining_j = ray.get(self.sweep_limits.update.remote(self.trial_key, energy["joules"]))
        return all_gather(answer)[0]

    def end(self, status: str, energy: dict, summary: dict) -> None:
        """The run has ended with `status`; `summary` is what result.json will hold."""
        if self.live is not None:
            self.live.end(status, energy["joules"])
        if self.tracker is not None:
            self.tracker.finish(status, summary)
