"""Where energy and time are measured: `with meter.step(state):` around each training step adds its seconds and
joules; `meter.energy(state)` is the run's energy so far over all workers (rayeff/measure/energy.py says how each
counter is read, and what an estimate assumes)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

from rayeff.measure.energy import MeterChain, combine, make_meter
from rayeff.train.collectives import all_gather
from rayeff.train.state import TrainState


class StepMeter:
    def __init__(self, meter: MeterChain, device: torch.device):
        self.meter, self.device = meter, device
        self.train_joules_by_key: dict[str, float] = {}   # this segment's joules inside training steps, per counter
        self.last_seconds = 0.0

    @classmethod
    def for_job(cls, energy, device: torch.device, rank: int, world: int, state: TrainState) -> StepMeter:
        where = (lambda: f"step {state.step}" + (f" on worker {rank}" if world > 1 else ""))
        return cls(make_meter(energy.meter, device, energy.watts_per_cpu, where=where), device)

    def start(self) -> None:
        self.meter.start()

    @contextlib.contextmanager
    def step(self, state: TrainState) -> Iterator[None]:
        """Time and joules of one training step (on a GPU, up to the end of its kernels)."""
        start, joules = time.perf_counter(), self.meter.read_joules()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.add_train_joules(self.meter.read_joules() - joules)
        self.last_seconds = time.perf_counter() - start
        state.train_seconds += self.last_seconds

    def add_train_joules(self, joules: float) -> None:
        """Kept under the counter read at the time, so that a counter shared by workers is counted once even after
        a meter has fallen back to the next one."""
        key = self.meter.key
        self.train_joules_by_key[key] = self.train_joules_by_key.get(key, 0.0) + joules

    def energy(self, state: TrainState) -> dict:
        """Energy of the whole run (`joules`) and of its training steps alone (`train_joules`: no start-up,
        evaluation or checkpointing), over all workers, with its source, scope, formula and any meter fallback.
        Earlier segments of a resumed run count as one more reading. A collective: every worker calls it."""
        gathered = all_gather({"readings": self.meter.readings(), "train": self.train_joules_by_key})
        earlier = {"key": "earlier segments", "joules": state.energy_joules, **state.energy_labels}
        total = combine([r for g in gathered for r in g["readings"]] + [earlier])
        state.energy_labels = {k: total[k] for k in ("source", "formula", "fallback") if k in total}
        train = [{"key": k, "joules": j} for g in gathered for k, j in g["train"].items()]
        total["train_joules"] = combine(train + [{"key": "earlier segments",
                                                  "joules": state.train_energy_joules}])["joules"]
        return total
