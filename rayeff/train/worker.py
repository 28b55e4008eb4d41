"""What every worker runs, whatever the method: build the run (data, model), then hand it to the method's loop.

    train_loop_per_worker(config)     Ray Train's entry point on each worker of a run (rayeff/train/runner.py)
    run_worker(ctx, config)           the same on any TrainContext (rayeff/train/context.py), e.g. in process

config = {"job": JobSpec dump, "model_source": ModelSource fields, and the reporter's links: "progress_queue",
"sweep_limits", "trial_key", "labels"}.
"""

from __future__ import annotations

import os

import torch

from rayeff.config import JobSpec
from rayeff.methods import get_method
from rayeff.models import ModelSource
from rayeff.quiet import quiet_libraries
from rayeff.train import first_order, zeroth_order
from rayeff.train.context import RayTrainContext, TrainContext
from rayeff.train.reporter import Reporter
from rayeff.train.run_setup import RunSetup

LOOPS = {"first_order": first_order.train_loop, "zeroth_order": zeroth_order.train_loop}


def run_worker(ctx: TrainContext, config: dict) -> None:
    job = JobSpec.model_validate(config["job"])
    run = RunSetup.build(job, ModelSource(**config["model_source"]), ctx.device)
    reporter = Reporter(ctx.rank, job, run.task.name, run.task.metrics[0], config)
    LOOPS[run.method.loop](ctx, run, reporter)


def prepare_process(job: dict) -> None:
    """Process-wide settings, before anything is measured: DeepSpeed's accelerator, torch's threads, quiet logs."""
    if job["scaling"]["gpus_per_worker"] == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say so, rather than let DeepSpeed probe and warn
    if job["scaling"].get("threads_per_worker"):
        torch.set_num_threads(job["scaling"]["threads_per_worker"])
    if get_method(job["method"]["name"]).loop == "first_order":   # the zeroth-order loop never uses DeepSpeed
        import_deepspeed()   # (before the memory baseline is taken)

    quiet_libraries()


def import_deepspeed() -> None:
    """Import DeepSpeed without the MLflow import its autotuner makes wherever MLflow is installed (DeepSpeed 0.19.8's
    deepspeed/autotuning/autotuner.py tries `import mlflow` at import time: 1.3-2.3 s of each worker's start on this
    project's 2-core machines). rayeff never runs that autotuner, and imports MLflow itself where a run tracks."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None   # while this stands, `import mlflow` raises ImportError
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker."""
    prepare_process(config["job"])
    run_worker(RayTrainContext(), config)
