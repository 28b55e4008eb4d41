"""`rayeff tune`: a small READ sweep on tiny-bert through Ray Tune + Optuna, and bad sweep files."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from rayeff.config import load_job
from rayeff.errors import UserError
from rayeff.tune.sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path, glue_dir, **changes) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": {"name": "tiny-bert"},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 32, "eval_subset": 32},
        "method": {"name": "read", "hidden_size": 8},
        "training": {"max_steps": 2, "batch_size": 8, "log_every": 1},
        "scaling": {"num_workers": 1},
    }))
    space = tmp_path / "space.yaml"
    space.write_text("method: read\nparams:\n"
                     "  training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                     "  method.hidden_size: {type: int, low: 4, high: 16}\n")
    sweep = {"base_job": str(job), "search_space": str(space), "num_trials": 3, "max_concurrent": 1,
             "searcher": {"kind": "tpe", "seed": 3}, "output_dir": str(tmp_path / "sweep"), **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
def test_a_small_sweep_writes_every_trial_the_study_and_the_best_job(tmp_path, glue_dir, local_ray):
    report = run_sweep(str(write_sweep(tmp_path, glue_dir)))
    out = tmp_path / "sweep"
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk["best"] == report["best"] and len(on_disk["trials"]) == 3
    for trial in on_disk["trials"]:
        assert trial["status"] == "finished" and trial["feasible"]
        assert 1e-4 <= trial["params"]["training.lr"] <= 1e-2 and 4 <= trial["params"]["method.hidden_size"] <= 16
        assert trial["objective"] == trial["metrics"]["accuracy"]
        assert trial["energy"]["joules"] > 0 and trial["energy"]["source"] in ("nvml", "rapl", "estimate")
        assert trial["memory"]["trainable_params"] > 0 and trial["time"]["steps"] == 2
    assert report["best"]["objective"] == max(t["objective"] for t in on_disk["trials"])
    best_job = load_job(out / "best_job.yaml")
    assert best_job.training.lr == report["best"]["params"]["training.lr"]
    assert best_job.method.hidden_size == report["best"]["params"]["method.hidden_size"]
    study = optuna.load_study(study_name="rayeff", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3


@pytest.mark.slow
def test_trials_past_their_energy_budget_are_stopped_and_infeasible(tmp_path, glue_dir, local_ray):
    report = run_sweep(str(write_sweep(tmp_path, glue_dir, num_trials=2, energy={"trial_budget_j": 1e-9})))
    assert [t["status"] for t in report["trials"]] == ["stopped: energy budget"] * 2
    assert not any(t["feasible"] for t in report["trials"]) and report["best"] is None
    assert all(t["energy"]["joules"] > 0 for t in report["trials"])
    assert not (tmp_path / "sweep" / "best_job.yaml").exists()


def test_bad_sweep_files_are_one_line_errors(tmp_path, glue_dir):
    with pytest.raises(UserError, match="num_trials: Field required"):
        load_sweep(_without(write_sweep(tmp_path, glue_dir), "num_trials"))
    with pytest.raises(UserError, match="is for method lora but base job"):
        load_sweep(write_sweep(tmp_path, glue_dir, search_space=str(ROOT / "search_spaces" / "lora.yaml")))
    with pytest.raises(UserError, match="objective.metric 'f1' is not a dev metric of sst2"):
        load_sweep(write_sweep(tmp_path, glue_dir, objective={"metric": "f1"}))
    with pytest.raises(UserError, match="searcher.kind"):
        load_sweep(write_sweep(tmp_path, glue_dir, searcher={"kind": "grid"}))
    with pytest.raises(UserError, match="no such job file"):
        load_sweep(write_sweep(tmp_path, glue_dir, base_job="jobs/none.yaml"))


def _without(path: Path, key: str) -> Path:
    raw = yaml.safe_load(path.read_text())
    raw.pop(key)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_shipped_sweep_loads():
    sweep, job, space = load_sweep(ROOT / "jobs" / "sweep-read.yaml")
    assert job.method.name == space.method == "read" and job.data.train_subset == 512 and sweep.num_trials == 6
