"""Experiment tracking (rayeff/tracking.py): a run logged to a real MLflow server on loopback and to TensorBoard
event files, both read back with those projects' own readers; a tracker that cannot be reached costs one warning
line and nothing else; bad tracking settings are one-line errors before anything starts. (A sweep's parent and
nested trial runs: tests/test_sweep.py.)"""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rayeff.cli import main
from rayeff.config import validate_job
from rayeff.train.runner import run_in_process


def tiny_job(tmp_path, glue_dir, name, tracking, **sections):
    return validate_job({
        **sections,
        "model": {"name": "tiny-bert"},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 48, "eval_subset": 16},
        "method": {"name": "lora", "rank": 4},
        "training": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2, "eval_every": 4},
        "tracking": tracking, "output_dir": str(tmp_path / name)})


def test_a_run_logs_its_curves_and_results_to_mlflow_and_tensorboard(tmp_path, glue_dir, mlflow_server):
    result = run_in_process(tiny_job(tmp_path, glue_dir, "run", {"mlflow": mlflow_server, "tensorboard": True,
                                                                 "experiment": "tiny"}))
    client = MlflowClient(tracking_uri=mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    # step-indexed loss: each logged step's mean, as result.json's loss_history holds it
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == result["loss_history_steps"] == [2, 4, 6]
    assert [m.value for m in history] == pytest.approx(result["loss_history"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [4, 6]
    final = run.data.metrics
    assert final["dev_accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert final["energy_joules"] == pytest.approx(result["energy"]["joules"])
    assert final["tensor_account_bytes"] == result["memory"]["tensor_account_bytes"]
    assert run.data.tags["energy_source"] == result["energy"]["source"] == "estimate"
    assert run.data.tags["energy_formula"] == result["energy"]["formula"]
    assert run.data.params["training.lr"] == "0.001" and run.data.params["method.name"] == "lora"

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx(result["loss_history"], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/accuracy")] == [4, 6]
    assert events.Scalars("result/dev_accuracy")[0].value == pytest.approx(result["metrics"]["accuracy"])


def test_a_resumed_run_goes_on_in_its_mlflow_run(tmp_path, glue_dir):
    """Stopped at step 2 (an energy budget), then resumed: one MLflow run (in the output folder's own store),
    finished, its curve from both parts."""
    tracking = {"mlflow": True, "experiment": "resumed"}
    stopped = run_in_process(tiny_job(tmp_path, glue_dir, "run", tracking, energy={"budget_j": 1e-9}))
    assert stopped["status"] == "stopped: energy budget" and stopped["time"]["steps"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resumed").experiment_id
    [first] = client.search_runs([experiment])
    assert first.info.status == "KILLED"
    resumed = run_in_process(tiny_job(tmp_path, glue_dir, "run", tracking, resume=True))
    assert resumed["status"] == "finished" and resumed["time"]["steps"] == 6
    [run] = client.search_runs([experiment])
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert [m.value for m in history][1:] == pytest.approx(resumed["loss_history"][1:])
    assert run.data.tags["rayeff.status"] == "finished" and run.data.metrics["dev_accuracy"] == \
        pytest.approx(resumed["metrics"]["accuracy"])


def test_an_unreachable_tracker_costs_one_warning_line_and_nothing_else(tmp_path, glue_dir, capfd):
    result = run_in_process(tiny_job(tmp_path, glue_dir, "run", {"mlflow": "http://127.0.0.1:9"}))
    assert result["status"] == "finished" and result["metrics"]["accuracy"] >= 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "tracking:" in line]
    assert len(warnings) == 1 and "MLflow failed" in warnings[0] and "127.0.0.1:9" in warnings[0], warnings
    assert json.loads((tmp_path / "run" / "result.json").read_text())["loss_history"] == result["loss_history"]


@pytest.mark.parametrize("tracking, output, message", [
    ({"mlflow": "file:/tmp/mlruns"}, "run", "MLflow 3 refuses file stores"),
    ({"mlflow": "mlruns"}, "run", "is not an MLflow tracking URI"),
    ({"mlflow": True}, "S3", "tracking.mlflow: it would be kept in the output folder"),
    ({"tensorboard": "tb"}, "S3", "tracking.tensorboard: it would be kept in the output folder"),
    ({"mlfow": True}, "run", "tracking.mlfow"),
])
def test_bad_tracking_settings_are_one_line_errors_before_ray(tmp_path, glue_dir, capsys, ray_calls, s3_server,
                                                              tracking, output, message):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"name": "tiny-bert"}, "data": {"task": "sst2", "train_subset": 8},
                                   "method": {"name": "full"}, "tracking": tracking}))
    out = f"{s3_server}/run" if output == "S3" else str(tmp_path / output)
    code = main(["run", str(job), "--data-dir", str(glue_dir), "--output", out, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and not ray_calls, err
    assert not (tmp_path / "run").exists()
