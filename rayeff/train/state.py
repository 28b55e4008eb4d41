"""Where a run is (saved in every checkpoint), how long it runs, and the order it reads the training set in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    energy_joules: float = 0.0        # energy of earlier segments of this run (before a resume)
    train_energy_joules: float = 0.0  # ... of which drawn inside training steps
    energy_labels: dict = field(default_factory=dict)  # source, formula, fallback of the run so far (any segment)
    loss_sum: float = 0.0
    losses: list = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    energy_history: list = field(default_factory=list)   # {"step", "joules"} at each logged step
    eval_history: list = field(default_factory=list)     # results.Evaluation's fields, at each evaluation
    extra: dict = field(default_factory=dict)  # the loop's own counters (e.g. ZO queries so far)
    resumed_at_steps: list = field(default_factory=list)   # the step of each checkpoint this run was resumed from

    def advance(self, loss: float, samples: int) -> None:
        """Count a finished step."""
        self.step, self.batch_in_epoch, self.samples = self.step + 1, self.batch_in_epoch + 1, self.samples + samples
        self.losses.append(loss)
        self.loss_sum += loss

    def logged(self, energy: dict) -> None:
        """Note the run's energy at a logged step."""
        self.energy_history.append({"step": self.step, "joules": energy["joules"]})

    def evaluated(self, metrics: dict, energy: dict) -> None:
        """Note an evaluation's metrics, and the run's energy once it ended."""
        self.last_eval = metrics
        self.eval_history.append(self.evaluation(metrics, energy))

    def evaluation(self, metrics: dict, energy: dict) -> dict:
        """An entry of `eval_history` (results.Evaluation) for metrics just measured at this step."""
        return {"step": self.step, "joules": energy["joules"], "metrics": metrics,
                "train_joules": energy["train_joules"], "train_seconds": self.train_seconds}


INTERRUPTED = "stopped: interrupted"   # a run's status when the driver asked it to stop (rayeff/train/interrupts.py)


def total_steps(training, steps_per_epoch: int) -> int:
    """The run's length: training.max_steps, else its epochs (1 by default) of `steps_per_epoch`."""
    if training.max_steps is not None:
        return training.max_steps
    return max(1, math.ceil((training.epochs or 1.0) * steps_per_epoch))


def due(step: int, every: int | None) -> bool:
    """Whether an every-N-steps event (log, eval, checkpoint) falls on `step`."""
    return bool(every) and step % every == 0


def epoch_order(n: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """This worker's indices for one epoch: a seeded permutation, padded to a multiple of `world` by wrapping
    around, then interleaved (rank r takes positions r, r+world, ...), as DistributedSampler does."""
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    # wrapping around as often as needed: a dev set smaller than half the workers still gives every worker a batch
    # (with ZeRO-3 every worker must run the same forwards); for n >= world this is order + order[:extra]
    padded = order + [order[i % n] for i in range((-n) % world)] if n else []
    return padded[rank::world]


def batches_of(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i: i + size] for i in range(0, len(indices), size)]


def batches_from(state: TrainState, epoch_batches: Callable[[int], list[list[int]]], total: int
                 ) -> Iterator[list[int]]:
    """The batches still to train on, from where `state` is (a resumed run continues mid-epoch), epoch after epoch,
    until step `total`; the loop advances `state` after each step."""
    while state.step < total:
        for idx in epoch_batches(state.epoch)[state.batch_in_epoch:]:
            if state.step >= total:
                return
            yield idx
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
