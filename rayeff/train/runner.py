"""The driver side of `rayeff run`: checks the job, starts or joins Ray, runs the workers in a Ray Train
`TorchTrainer`, shows progress, and writes OUTPUT/result.json (and the trained weights) when it is done.

    rayeff run jobs/sst2-read.yaml --data-dir ../shared/data/glue

Output folder (a local or shared path, or an s3:// / gs:// URI: rayeff/cluster/storage.py): `job.yaml` (the job as
run), `train/` (Ray Train's storage: checkpoints), `result.json`, `final/trainable.safetensors` (the trained
parameters). Everything the user can get wrong is checked before the folder is created, so bad input leaves nothing
behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import yaml

from rayeff.cluster.connect import init_ray
from rayeff.cluster.storage import Storage, check_shared, location_name, output_lock
from rayeff.config import JobSpec
from rayeff.data.task import check_data, task_of
from rayeff.errors import UserError
from rayeff.methods import get_method
from rayeff.methods.zeroth_order_config import query_schedule
from rayeff.models import ModelSource, backbone_skeleton, load_tokenizer, resolve_model
from rayeff.results import RunResult
from rayeff.train.checkpointer import TRAINABLE_FILE
from rayeff.train.preflight import TRAIN_DIR, check_job_inputs, check_local_gpus
from rayeff.train.state import total_steps

RESULT_FILE = "result.json"


def has_checkpoint(output: Storage) -> bool:
    return any(name.startswith("step_") for name in output.names(TRAIN_DIR))


def check_output_dir(output: Storage, resume: bool) -> None:
    if resume:
        return
    if has_checkpoint(output) or output.exists(RESULT_FILE):
        raise UserError(f"output_dir: {output.location} already holds a run; pass --resume to continue it, or "
                        "choose another --output")


def prepare(job: JobSpec) -> ModelSource:
    """Every check that needs no Ray: data present, model known, method buildable, output folder free. Also
    tokenises the data once into the on-disk cache that the workers then read."""
    from rayeff.data.tokenized import load_train_and_dev, scoring_of

    check_data(job.data)
    source = resolve_model(job.model.name)
    method = get_method(job.method.name)
    if method.check_model is not None:
        method.check_model(job.method, backbone_skeleton(source))
    check_job_inputs(job, source)   # output and cache folders writable, model files, sizes, checkpoints safe
    check_output_dir(Storage(job.output_dir), job.resume)
    try:
        train, _ = load_train_and_dev(job.data, load_tokenizer(source), job.training.max_seq_length,
                                      scoring_of(job.data, source))
    except ValueError as err:
        raise UserError(f"data: {err}") from None
    if method.loop == "zeroth_order":   # every worker reads the whole global batch
        steps_per_epoch = math.ceil(len(train) / job.training.batch_size)
        try:
            query_schedule(job.method, total_steps(job.training, steps_per_epoch), steps_per_epoch)
        except ValueError as err:
            raise UserError(str(err)) from None
    return source


def check_resources(job: JobSpec) -> None:
    import ray

    total = ray.cluster_resources()
    s = job.scaling
    for name, per_worker in (("CPU", s.cpus_per_worker), ("GPU", s.gpus_per_worker)):
        need = per_worker * s.num_workers
        if need > total.get(name, 0):
            raise UserError(f"scaling: {s.num_workers} workers need {need:g} {name}s but the Ray cluster has "
                            f"{total.get(name, 0):g}; lower scaling.num_workers or {name.lower()}s_per_worker")


def worker_config(job: JobSpec, source: ModelSource, **links) -> dict:
    """What every worker is handed: the job, the model's files, and the reporter's links (rayeff/train/worker.py)."""
    return {"job": job.model_dump(), "model_source": asdict(source), **links}


HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_health_check_set: list[str] = []   # the value this process set last


def set_health_check_interval(num_workers: int) -> None:
    """How often Ray Train's controller polls its workers. A run's end passes through several polls, so at Ray 2.60's
    default of 2 s every run (and every trial of a sweep) waited about 4 s after its last step for its result;
    polling every 0.25 s, about 1 s. A poll is one small call per worker: large groups keep Ray's default. Ray Train
    hands the setting from the driver (or a sweep's trial actor) to the controller; a user who sets it keeps theirs."""
    if os.environ.get(HEALTH_CHECK_INTERVAL) in (None, *_health_check_set[-1:]):
        value = "0.25" if num_workers <= 16 else "2.0"
        os.environ[HEALTH_CHECK_INTERVAL] = value
        _health_check_set[:] = [value]


def make_trainer(job: JobSpec, source: ModelSource, progress_queue=None, callbacks: list | None = None,
                 sweep_limits=None, trial_key: str | None = None, run_name: str | None = None, stop_request=None):
    """The run's `TorchTrainer`. A sweep's trial adds Tune's report callback, the sweep's limits actor, its trial
    key and the sweep's name (the `run` label of its metrics; a plain run's is its output folder's name); a plain
    run, the driver's stop request (rayeff/train/interrupts.py)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayeff.train.worker import train_loop_per_worker

    # Ray Train's preemption watcher only logs node drains for ray.train.get_preemption_info, which rayeff does not
    # read (a preempted worker fails and the run restarts from its checkpoint, failure.max_failures); made as Ray
    # 2.60 makes it, it prints an error-level core_worker line at every start. Ray Train hands this switch from the
    # driver to its controller, on a cluster too; a user who sets it keeps theirs.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    set_health_check_interval(job.scaling.num_workers)
    use_gpu = job.scaling.gpus_per_worker > 0
    resources = {"CPU": job.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = job.scaling.gpus_per_worker
    labels = {"run": run_name or location_name(job.output_dir), "trial": trial_key or "", "method": job.method.name}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(job, source, progress_queue=progress_queue, sweep_limits=sweep_limits,
                                        trial_key=trial_key, labels=labels, stop_request=stop_request),
        scaling_config=ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=TRAIN_DIR, storage_path=Storage(job.output_dir).location,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=job.failure.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks),
    )


def open_output(job: JobSpec) -> Storage:
    """The output folder, made, with the job as run in `job.yaml`."""
    output = Storage(job.output_dir)
    if job.resume and not has_checkpoint(output):
        print(f"rayeff: no checkpoint in {output.location}; starting from the beginning")
    output.make()
    output.write_text("job.yaml", yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    return output


def start(job: JobSpec, source: ModelSource, **trainer_options):
    """The one launch path of a run and of a sweep's trial, once the job is prepared and Ray is up: the cluster's
    resources checked, the output folder opened, and the run's `TorchTrainer` (make_trainer's options)."""
    check_resources(job)
    check_shared(job.output_dir)
    open_output(job)
    return make_trainer(job, source, **trainer_options)


@contextlib.contextmanager
def final_report(result) -> Iterator[tuple[dict, Path | None]]:
    """The summary and final checkpoint folder (readable inside the `with`) of a finished `TorchTrainer.fit()`;
    its error, raised."""
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        yield dict(result.metrics or {}), None
        return
    with result.checkpoint.as_directory() as folder:
        yield dict(result.metrics or {}), Path(folder)


def finish(job: JobSpec, summary: dict, checkpoint: Path | None) -> dict:
    """result.json (a `RunResult`, rayeff/results.py) and the final weights, from the last report (which carries
    the final checkpoint); returns what result.json holds."""
    from pydantic import ValidationError

    output = Storage(job.output_dir)
    try:
        result = RunResult.model_validate(summary)
    except ValidationError as err:   # the last report was a checkpoint's progress, or nothing
        raise RuntimeError(f"training ended without a final report ({err.error_count()} summary fields wrong or "
                           f"missing; the last report held {sorted(summary)})") from err
    result.output_dir = output.location
    result.job = job.model_dump(mode="json")
    if checkpoint is not None:
        output.upload(checkpoint / TRAINABLE_FILE, f"final/{TRAINABLE_FILE}")
        result.weights = output.child("final", TRAINABLE_FILE)
    summary = result.dump()
    output.write_json(RESULT_FILE, summary)
    return summary


def normalise_paths(job: JobSpec) -> None:
    job.output_dir = Storage(job.output_dir).location
    job.data.resolve_paths()


def run_job(job: JobSpec, address: str | None = None, show_progress: bool = True) -> dict:
    """Run one job to its end on Ray (a local one, or the cluster at `address`) and return what result.json
    holds."""
    normalise_paths(job)
    source = prepare(job)
    check_local_gpus(job, address)
    with output_lock(job.output_dir):
        check_output_dir(Storage(job.output_dir), job.resume)   # again: a run that held the folder may have ended
        return _run_on_ray(job, source, address, show_progress)


def _run_on_ray(job: JobSpec, source: ModelSource, address: str | None, show_progress: bool) -> dict:
    from ray.util.queue import Queue

    from rayeff.train.interrupts import StopRequest, stop_on_signal
    from rayeff.train.progress import ProgressDisplay

    init_ray(address, job.scaling.num_workers * job.scaling.cpus_per_worker)
    queue = Queue(maxsize=1000, actor_options={"num_cpus": 0}) if show_progress else None
    stop_request = StopRequest.remote()
    trainer = start(job, source, progress_queue=queue, stop_request=stop_request)
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    fit.start()
    display = ProgressDisplay(f"{job.method.name} · {job.model.name} · {task_of(job.data).name}")
    with display, stop_on_signal(stop_request):
        while fit.is_alive():
            fit.join(timeout=0.5)
            while queue is not None and not queue.empty():
                display.update(queue.get_nowait())
    result = outcome["result"]
    if isinstance(result, BaseException):
        raise result
    with final_report(result) as (summary, checkpoint):
        summary = finish(job, summary, checkpoint)
    if show_progress:
        display.print_summary(summary)
    return summary


def run_in_process(job: JobSpec) -> dict:
    """Run one job with one worker in this process, without Ray: the same loop, checkpoints, resume and
    result.json as `run_job` (for tests, and for debugging a method where a debugger can reach it). The output
    folder must be local."""
    if job.scaling.num_workers != 1:
        raise UserError("scaling.num_workers: a run in process has one worker; set 1, or run it on Ray")
    normalise_paths(job)
    if not Storage(job.output_dir).local:
        raise UserError(f"output_dir: {job.output_dir} is not a local folder; a run in process writes locally")
    source = prepare(job)
    with output_lock(job.output_dir):
        check_output_dir(Storage(job.output_dir), job.resume)
        output = open_output(job)
        return _run_here(job, source, output)


def _run_here(job: JobSpec, source: ModelSource, output: Storage) -> dict:
    import torch

    from rayeff.train.context import InProcessContext
    from rayeff.train.worker import prepare_process, run_worker

    device = torch.device("cuda", 0) if job.scaling.gpus_per_worker > 0 else torch.device("cpu")
    ctx = InProcessContext(Path(output.location) / TRAIN_DIR, device, resume=job.resume)
    threads = torch.get_num_threads()
    try:
        prepare_process(job.model_dump())   # the job's threads_per_worker, for this run only
        run_worker(ctx, worker_config(job, source))
    finally:
        torch.set_num_threads(threads)
    return finish(job, ctx.reports[-1], ctx.latest)


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as err:  # handed to the main thread, which re-raises it
        return err
