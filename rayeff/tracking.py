"""Experiment tracking: a run's settings, its progress at every logged step and its final figures, sent from rank 0
to MLflow (through MLflow's own client) and to TensorBoard event files (tensorboardX's writer, which Ray Tune
already installs). A job's `tracking:` section says where; a sweep's logs one parent MLflow run and, nested under
it, one run per trial.

A tracker is never a reason for a run to fail: one that cannot be reached, or fails mid-run, costs one warning line
on the worker's log and is dropped; every figure stays in result.json.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

MLFLOW_STORE = "mlflow.db"          # `tracking.mlflow: true`: a SQLite store in the output folder
TENSORBOARD_DIR = "tensorboard"     # `tracking.tensorboard: true`: event files in the output folder


def mlflow_uri(tracking, output_dir: str) -> str | None:
    """The MLflow tracking URI a job's `tracking` names (true: OUTPUT/mlflow.db), or None."""
    if tracking.mlflow is True:
        return f"sqlite:///{Path(output_dir).expanduser().resolve() / MLFLOW_STORE}"
    return tracking.mlflow or None


def tensorboard_dir(tracking, output_dir: str) -> str | None:
    """The folder for TensorBoard event files (true, or a relative path: under the output folder), or None."""
    if tracking.tensorboard in (None, False):
        return None
    folder = Path(TENSORBOARD_DIR if tracking.tensorboard is True else tracking.tensorboard).expanduser()
    return str(folder if folder.is_absolute() else Path(output_dir).expanduser() / folder)


def flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested job as dotted keys and string values: MLflow's parameters."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def progress_metrics(progress: dict) -> dict[str, float]:
    """What a logged step's `Progress` (rayeff/results.py) adds to a run's curves. (Not its `eval`: that is the last
    evaluation, made at an earlier step; evaluations are logged at their own steps from the result's eval_history.)"""
    return {name: float(progress[name]) for name in ("loss", "samples_per_second", "energy_joules", "queries",
                                                    "queries_per_second") if progress.get(name) is not None}


def result_metrics(summary: dict) -> dict[str, float]:
    """A finished run's figures (a `RunResult` dict): its dev metrics, loss, energy, time and memory account."""
    metrics = {f"dev_{name}": float(value) for name, value in summary["metrics"].items()}
    metrics.update(train_loss=summary["train_loss"], energy_joules=summary["energy"]["joules"],
                   train_energy_joules=summary["energy"]["train_joules"],
                   train_seconds=summary["time"]["train_seconds"],
                   samples_per_second=summary["time"]["samples_per_second"])
    memory = summary["memory"]
    metrics.update({name: float(value) for name, value in memory.items()
                    if name.endswith(("_bytes", "_params")) and value is not None})
    return metrics


class Tracker:
    """Rank 0's trackers for one run. Each call reaches every tracker still alive; a tracker that raises is dropped
    after one warning line."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, job, run_name: str) -> Tracker | None:
        sinks = []
        for name, make in (("MLflow", MLflowSink.open), ("TensorBoard", TensorBoardSink.open)):
            sink = guarded(make, job, run_name, name=name)
            if sink is not None and sink is not FAILED:
                sinks.append(sink)
        return cls(sinks) if sinks else None

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            if guarded(getattr(sink, method), *args, name=sink.name) is FAILED:
                self.sinks.remove(sink)

    def log_progress(self, progress: dict) -> None:
        self._each("log_progress", progress)

    def finish(self, status: str, summary: dict | None) -> None:
        self._each("finish", status, summary)


FAILED = object()


def guarded(call, *args, name: str | None = None):
    """`call(*args)`, or FAILED after one warning line if it raised: a tracker never stops a run."""
    try:
        return call(*args)
    except Exception as err:  # noqa: BLE001 (any tracker failure: network, server, disk)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"rayeff: warning: tracking: {name or 'a tracker'} failed ({type(err).__name__}: {first}); the run "
              "goes on without it, its figures are in result.json", file=sys.stderr, flush=True)
        return FAILED


class MLflowSink:
    """One run in MLflow: the job as parameters, each logged step's progress and the final figures as metrics
    (step-indexed), the energy's source as tags. A resumed job continues the MLflow run its output folder had."""

    def __init__(self, client, run_id: str, uri: str):
        self.client, self.run_id, self.name = client, run_id, f"MLflow at {uri}"
        self.source_tagged = False

    @classmethod
    def open(cls, job, run_name: str) -> MLflowSink | None:
        uri = mlflow_uri(job.tracking, job.output_dir)
        if uri is None:
            return None
        client = mlflow_client(uri)
        experiment = experiment_id(client, job.tracking.experiment)
        tags = {"rayeff.method": job.method.name, "rayeff.model": job.model.name,
                "rayeff.output_dir": str(job.output_dir)}
        if job.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = job.tracking.parent_run_id
        if job.resume:
            earlier = earlier_run(client, experiment, tags)
            if earlier is not None:   # its parameters are logged (MLflow refuses to change one): go on with it
                client.update_run(earlier, status="RUNNING")
                return cls(client, earlier, uri)
        run = client.create_run(experiment, run_name=run_name, tags=tags)
        log_params(client, run.info.run_id, flat(job.model_dump(mode="json", exclude={"tracking"})))
        return cls(client, run.info.run_id, uri)

    def log_progress(self, progress: dict) -> None:
        log_metrics(self.client, self.run_id, progress_metrics(progress), progress["step"])
        if not self.source_tagged:   # one source for the whole run
            self.client.set_tag(self.run_id, "energy_source", progress["energy_source"])
            self.source_tagged = True

    def finish(self, status: str, summary: dict | None) -> None:
        if summary is not None:
            for evaluation in summary.get("eval_history", []):
                log_metrics(self.client, self.run_id, {f"eval_{k}": v for k, v in evaluation["metrics"].items()},
                            evaluation["step"])
            log_metrics(self.client, self.run_id, result_metrics(summary), summary["time"]["steps"])
            for key in ("source", "formula"):
                if summary["energy"].get(key):
                    self.client.set_tag(self.run_id, f"energy_{key}", summary["energy"][key])
        self.client.set_tag(self.run_id, "rayeff.status", status)
        self.client.set_terminated(self.run_id, run_status(status))


class SweepRun:
    """A sweep's parent run in MLflow (its trials' runs nest under it): the sweep's settings, and at its end the
    best trial's objectives and the sweep's energy."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, uri: str, experiment: str, sweep_location: str) -> SweepRun:
        """The sweep's run: the one an earlier invocation of this sweep (same folder) made, or a new one."""
        client = mlflow_client(uri)
        experiment = experiment_id(client, experiment)
        earlier = client.search_runs([experiment], filter_string=f"tags.`rayeff.sweep` = '{sweep_location}'",
                                     max_results=1)
        if earlier:
            return cls(client, earlier[0].info.run_id)
        run = client.create_run(experiment, run_name=Path(sweep_location).name,
                                tags={"rayeff.sweep": sweep_location})
        return cls(client, run.info.run_id)

    def log_settings(self, sweep: dict) -> None:
        guarded(log_params, self.client, self.run_id, flat(sweep, "sweep."), name="MLflow")

    def finish_sweep(self, report: dict) -> None:
        def finish():
            metrics = {"trials": float(len(report["trials"])), "energy_joules": float(report["energy"]["total_j"])}
            if report.get("best"):
                metrics.update({f"best_objective_{i}": float(v) for i, v in enumerate(report["best"]["objectives"])})
            log_metrics(self.client, self.run_id, metrics, len(report["trials"]))
            self.client.set_terminated(self.run_id, "KILLED" if report.get("interrupted") else "FINISHED")

        guarded(finish, name="MLflow")


def earlier_run(client, experiment: str, tags: dict[str, str]) -> str | None:
    """The latest run in `experiment` with these tags (the output folder's, under the same parent), or None."""
    keys = [k for k in ("rayeff.output_dir", "mlflow.parentRunId") if k in tags]
    if any("'" in tags[k] for k in keys):   # not expressible in MLflow's filter: a new run
        return None
    query = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in keys)
    runs = client.search_runs([experiment], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def run_status(status: str) -> str:
    """MLflow's status for a run's rayeff status."""
    return "FINISHED" if status == "finished" else "FAILED" if status == "diverged" else "KILLED"


def mlflow_client(uri: str):
    """MLflow's client for `uri`, once its server (if it has one) answers."""
    check_reachable(uri)
    # A server that stops answering mid-run must cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):   # MLflow takes at most 100 parameters per call
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def check_reachable(uri: str) -> None:
    """An MLflow server answers its health check within a few seconds, or the tracker is not used."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(f"no answer from {uri}/health: {getattr(err, 'reason', err)}") from None


def experiment_id(client, name: str) -> str:
    """The experiment's id, created if new (trials of a sweep may race to create it: the loser reads it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:   # created meanwhile by another run
        return client.get_experiment_by_name(name).experiment_id


class TensorBoardSink:
    name = "TensorBoard"

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, job, run_name: str) -> TensorBoardSink | None:
        folder = tensorboard_dir(job.tracking, job.output_dir)
        if folder is None:
            return None
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(logdir=folder, comment=run_name)
        writer.add_text("job", "\n".join(f"    {k}: {v}" for k, v in flat(job.model_dump(mode="json")).items()))
        return cls(writer)

    def log_progress(self, progress: dict) -> None:
        for name, value in progress_metrics(progress).items():
            self.writer.add_scalar(f"train/{name}", value, progress["step"])
        self.writer.flush()

    def finish(self, status: str, summary: dict | None) -> None:
        if summary is not None:
            for evaluation in summary.get("eval_history", []):
                for name, value in evaluation["metrics"].items():
                    self.writer.add_scalar(f"eval/{name}", value, evaluation["step"])
            for name, value in result_metrics(summary).items():
                self.writer.add_scalar(f"result/{name}", value, summary["time"]["steps"])
        self.writer.add_text("status", status)
        self.writer.close()
