"""What a training loop knows of the machinery around it: its rank, the number of workers, its device, the
checkpoint it resumes from, and where it reports. Two implementations: Ray Train's (every worker of a run on a Ray
cluster) and an in-process one (one worker in the calling process, no Ray: tests and `run_in_process`).

The loops (rayeff/train/first_order.py, zeroth_order.py) see Ray through this interface only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator, Protocol

import torch
import torch.distributed as dist


class TrainContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the checkpoint to resume from (None: a fresh start), readable inside the `with`."""

    def report(self, metrics: dict, checkpoint: Path, name: str) -> None:
        """Hand over a checkpoint folder under `name` with its metrics (a collective: every worker calls it; the
        folder may be deleted once this returns)."""


class RayTrainContext:
    """A Ray Train worker's context (Ray 2.60, Train v2)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        quiet_ray_train_reports()

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict, checkpoint: Path, name: str) -> None:
        import ray.train

        # A barrier: it waits for every worker and for Ray Train's controller, so the loops call it only with a
        # checkpoint (progress travels through the reporter's queue instead).
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                         checkpoint_dir_name=name)


def quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every report at INFO under a logger named by the file path of its private module
    `ray.train.v2._internal.execution.context`, which its LoggingConfig does not reach; our own progress line says
    the same. The one place rayeff touches Ray Train's internals: if the module moves, reports are merely louder."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class InProcessContext:
    """One worker in this process, without Ray. Checkpoints go to `storage` (Ray Train's layout: one folder per
    checkpoint, the two latest kept); a resumed run starts from the latest there. The metrics of every report are
    kept in `reports`."""

    KEEP = 2

    def __init__(self, storage: Path, device: torch.device | None = None, resume: bool = False):
        self.rank, self.world_size = 0, 1
        self.device = device or torch.device("cpu")
        self.storage, self.resume = Path(storage), resume
        self.reports: list[dict] = []
        self.latest: Path | None = None
        join_single_process_group()

    def checkpoints(self) -> list[Path]:
        if not self.storage.is_dir():
            return []
        return sorted(p for p in self.storage.iterdir() if p.is_dir() and p.name.startswith("step_"))

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints() if self.resume else []
        yield found[-1] if found else None

    def report(self, metrics: dict, checkpoint: Path, name: str) -> None:
        target = self.storage / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint, target)
        self.reports.append(metrics)
        self.latest = target
        for old in [p for p in self.checkpoints() if p != target][:-(self.KEEP - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)


def join_single_process_group() -> None:
    """A one-worker gloo group for this process, as DeepSpeed needs one (kept for the process's life: DeepSpeed
    holds on to it), and the variables a launcher would set, which DeepSpeed reads."""
    for name in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
