"""Where a checkpoint is written and read back: the loop's weights (and optimizer), the position in the data and the
energy so far (TrainState), and every worker's RNG state, so that a resumed run continues bit for bit.

A checkpoint folder holds what the loop writes (`write(folder, saved_state)`: DeepSpeed's checkpoint, or the trained
weights alone), `train_state.json` and `rng_rank<r>.pt` per worker. It is handed to the context's `report` under
`step_<n>` (`step_<n>-diverged` for the final checkpoint of a run that diverged).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from rayeff.train.checkpoint_safety import (
    check_checkpoint_files,
    rng_state,
    safe_load,
    set_rng_state,
    weights_only_loads,
)
from rayeff.train.context import TrainContext
from rayeff.train.state import TrainState

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "train_state.json"


class Checkpointer:
    def __init__(self, ctx: TrainContext):
        self.ctx = ctx

    def restore(self, read: Callable[[Path], dict]) -> TrainState:
        """The state to start from: a fresh one, or the restored checkpoint's, after `read(folder)` has put the
        weights back (and returned the saved TrainState fields) and every worker has its RNG back."""
        with self.ctx.restored_checkpoint() as folder:
            if folder is None:
                return TrainState()
            # A checkpoint may sit in a shared bucket: every .pt file in it (ours and DeepSpeed's) must load as
            # tensors and plain data, and the loads themselves are held to weights-only (checkpoint_safety.py), so
            # that a tampered checkpoint is refused instead of run.
            check_checkpoint_files(folder)
            with weights_only_loads():
                state = TrainState(**read(folder))
            rng_file = folder / f"rng_rank{self.ctx.rank}.pt"
            if rng_file.is_file():
                set_rng_state(safe_load(rng_file), self.ctx.device)
            state.resumed_at_steps = [*state.resumed_at_steps, state.step]
            return state

    def save(self, state: TrainState, energy: dict, metrics: dict, write: Callable[[Path, dict], None],
             diverged: bool = False) -> None:
        """Write a checkpoint on every worker and report it. The saved state carries the energy used so far, so a
        resumed run adds to it (energy drawn after the last checkpoint of a killed run is not counted)."""
        folder = Path(tempfile.mkdtemp(prefix="rayeff-ckpt-"))
        try:
            saved_state = {**asdict(state), "energy_joules": energy["joules"],
                           "train_energy_joules": energy["train_joules"]}
            write(folder, saved_state)
            save_rng(folder, self.ctx)
            if self.ctx.rank == 0:
                (folder / STATE_FILE).write_text(json.dumps(saved_state))
            self.ctx.report(metrics, folder, f"step_{state.step:08d}" + ("-diverged" if diverged else ""))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def save_rng(folder: Path, ctx: TrainContext) -> None:
    import torch

    torch.save(rng_state(ctx.device), folder / f"rng_rank{ctx.rank}.pt")   # tensors and ints: weights-only loads


def read_state_file(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())
