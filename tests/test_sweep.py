"""`rayeff tune`: sweeps of READ on tiny-bert through Ray Tune + Optuna (ASHA, budgets, priors, a multi-objective
sweep interrupted, killed and resumed), the sweep limits and Pareto front by hand, and bad sweep files."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rayeff.cli import main
from rayeff.cluster.storage import Storage
from rayeff.config import load_job, validate_job
from rayeff.errors import UserError
from rayeff.methods.read import ReadConfig, side_parameter_formula
from rayeff.plan.planner import worker_bytes
from rayeff.train.runner import run_in_process
from rayeff.tune.limits import ENERGY, TIME, SweepLimits
from rayeff.tune.priors import PriorStore
from rayeff.tune.results import pareto_front
from rayeff.tune.spec import load_sweep
from rayeff.tune.trial import trial_job
from run_folder import checkpoint_steps

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT_HEAD = (32 * 32 + 32) + (32 * 2 + 2)   # the mlp head on tiny-bert's width 32, two labels


def dominates(a: list[float], b: list[float], modes: list[str]) -> bool:
    """a is at least as good as b in every objective and better in one (the tests' own check of a front)."""
    no_worse = all(x >= y if m == "max" else x <= y for x, y, m in zip(a, b, modes))
    return no_worse and any(x > y if m == "max" else x < y for x, y, m in zip(a, b, modes))


def write_sweep(tmp_path, glue_dir, name="sweep", steps=2, **changes) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": {"name": "tiny-bert"},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 32, "eval_subset": 32},
        "method": {"name": "read", "hidden_size": 8},
        "training": {"max_steps": steps, "batch_size": 8, "log_every": 1},
        "scaling": {"num_workers": 1},
    }))
    space = tmp_path / "space.yaml"
    space.write_text("method: read\nparams:\n"
                     "  training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                     "  method.hidden_size: {type: int, low: 4, high: 16}\n")
    sweep = {"base_job": str(job), "search_space": str(space), "num_trials": 3, "max_concurrent": 1,
             "searcher": {"kind": "tpe", "seed": 3}, "output_dir": str(tmp_path / name),
             "priors": {"store": str(tmp_path / "priors.db")}, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_and_a_killed_sweep_continue_their_trials_from_checkpoints(tmp_path, glue_dir,
                                                                                  check_report):
    """A 2-trial multi-objective sweep through `rayeff tune`. Ctrl-C (SIGINT to its process group) while the first
    trial trains: exit 130, that trial stopped after a step with a checkpoint there, no other trial started.
    `--resume` continues it from that checkpoint in its own folder, then starts the second; SIGKILL to the driver
    while that one trains; `--resume` continues it from its last checkpoint. Both end with the weights of their job
    run straight through, bit for bit, and no trial is lost or repeated."""
    path = write_sweep(tmp_path, glue_dir, steps=120, num_trials=2, searcher={"kind": "nsga2", "seed": 1},
                       objective=[{"metric": "dev", "mode": "max"}, {"metric": "energy_j", "mode": "min"}])
    base = yaml.safe_load((tmp_path / "job.yaml").read_text())
    base["training"].update(checkpoint_every=20, log_every=5)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(base))
    out, db = tmp_path / "sweep", f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    command = [sys.executable, "-m", "rayeff.cli", "tune", str(path)]

    def start(*extra) -> subprocess.Popen:
        return subprocess.Popen(command + list(extra), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    driver = start()
    interrupted_folder = _folder_once_checkpointed(db, out, 0, driver)
    os.killpg(driver.pid, signal.SIGINT)
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 130, stderr[-3000:]
    assert "stopping after the current step" in stderr and "--resume" in stderr.strip().splitlines()[-1]
    report = json.loads((out / "sweep.json").read_text())
    assert report["interrupted"] and report["trials"] == []   # the trial is not done, and no other started
    assert [t.state for t in _trials(db)] == [optuna.trial.TrialState.RUNNING]
    stopped = json.loads((interrupted_folder / "result.json").read_text())
    assert stopped["status"] == "stopped: interrupted" and 20 <= stopped["time"]["steps"] < 120
    assert checkpoint_steps(interrupted_folder)[-1] == stopped["time"]["steps"]

    driver = start("--resume")
    # trial 1 continues trial 0; trial 2 is new: killed once it has written two checkpoints, so that Ray Train has
    # recorded at least the first (it records one shortly after it is written)
    killed_folder = _folder_once_checkpointed(db, out, 2, driver, count=2)
    os.kill(driver.pid, signal.SIGKILL)
    continued_stdout, _ = driver.communicate()
    time.sleep(3)   # let Ray's own processes notice the driver is gone
    killed_at = checkpoint_steps(killed_folder)[-1]

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((out / "sweep.json").read_text())
    # rayeff's display, not Ray Tune's: a line per progress update of the trial continued by the second driver, up
    # to its last step (the one the third continues may have no step left: see below)
    assert f"trial {report['trials'][0]['trial_id']}: step 120/120" in continued_stdout
    assert "Configuration for experiment" not in continued_stdout + resumed.stdout + resumed.stderr
    trials = _trials(db)
    assert [t["number"] for t in report["trials"]] == [1, 3] and len({t["trial_id"] for t in report["trials"]}) == 2
    assert report["requeued_after_interruption"] == [2] and not report["interrupted"]
    assert all(t["status"] == "finished" and t["time"]["steps"] == 120 for t in report["trials"])
    spec = load_sweep(path)[0]
    for record, first, folder, resumed_at in ((report["trials"][0], trials[0], interrupted_folder,
                                               stopped["time"]["steps"]),
                                              (report["trials"][1], trials[2], killed_folder, killed_at)):
        assert record["params"] == first.params and record["output_dir"] == str(folder)   # the same trial, continued
        # from the checkpoint at the interrupted step; after the kill, from the last one Ray Train had recorded (one
        # being written as the driver died is not used)
        [at] = record["time"]["resumed_at_steps"]
        assert at == resumed_at if folder == interrupted_folder else 20 <= at <= resumed_at
        straight = run_in_process(trial_job(base, first.params, spec, str(tmp_path / f"straight-{first.number}")))
        a, b = load_file(str(folder / "final" / "trainable.safetensors")), load_file(straight["weights"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert json.loads((folder / "result.json").read_text())["step_losses"] == straight["step_losses"]
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert [t["number"] for t in front] == report["pareto_front"] and front
    for t in front:
        assert not any(dominates(o["objectives"], t["objectives"], ["max", "min"]) for o in report["trials"])
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # `rayeff report` on the sweep folder: every trial, the front, the energy of each
    page = tmp_path / "report" / "sweep.html"
    assert main(["report", str(out), "--output", str(page)]) == 0
    check_report(page, {"trials", "trial-energy"})


def _folder_once_checkpointed(db: str, out: Path, number: int, driver: subprocess.Popen, count: int = 1) -> Path:
    """The run folder of the sweep's trial `number` once it holds `count` checkpoints while the trial trains."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        trials = _trials(db)
        if len(trials) > number and trials[number].state == optuna.trial.TrialState.RUNNING:
            attrs = trials[number].user_attrs
            folder = out / "trials" / attrs.get("continues", attrs.get("tune_trial_id", "?"))
            if len(checkpoint_steps(folder)) >= count:
                return folder
        time.sleep(0.1)
    driver.kill()
    pytest.fail(f"the sweep's trial {number} never wrote a checkpoint: {driver.communicate()[1][-2000:]}")


@pytest.mark.slow
@pytest.mark.ray
def test_rayeff_tune_starts_no_trial_whose_plan_cannot_fit_the_memory_constraint(tmp_path, glue_dir):
    """Through `rayeff tune` (its own local Ray): with
    `constraints.memory_per_worker_gb` under what any configuration's plan needs, every trial is recorded as
    infeasible with its planned figure, none is started (no trial folder, no energy), and there is no best."""
    path = write_sweep(tmp_path, glue_dir, num_trials=2, constraints={"memory_per_worker_gb": 1e-6})
    swept = subprocess.run([sys.executable, "-m", "rayeff.cli", "tune", str(path)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert "rayeff: no feasible trial" in swept.stdout
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    base = yaml.safe_load((tmp_path / "job.yaml").read_text())
    for trial in report["trials"]:
        planned = worker_bytes(trial_job(base, trial["params"], load_sweep(path)[0], "x"))
        assert trial["planned_memory_per_worker_bytes"] == planned and trial["energy"] is None
        assert trial["status"].startswith(f"infeasible: the plan puts {planned / 1e9:.4g} GB") and not trial["feasible"]
    assert len(report["trials"]) == 2 and report["best"] is None and report["energy"]["total_j"] == 0
    assert "Configuration for experiment" not in swept.stdout + swept.stderr   # Ray Tune's box, replaced
    assert not (tmp_path / "sweep" / "trials").exists()


@pytest.mark.slow
def test_an_asha_sweep_records_every_trial_and_a_later_sweep_starts_from_it_until_its_energy_budget(
        tmp_path, glue_dir, local_ray, s3_server):
    from rayeff.tune.sweep import run_sweep

    report = run_sweep(str(write_sweep(tmp_path, glue_dir, steps=3, num_trials=2,
                                       scheduler={"report_every_steps": 1})))
    out = tmp_path / "sweep"
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk["best"] == report["best"] and [t["number"] for t in on_disk["trials"]] == [0, 1]
    study = optuna.load_study(study_name="rayeff", storage=f"sqlite:///{out / 'optuna.db'}")
    states = {t.number: t.state for t in study.trials}
    for trial in on_disk["trials"]:
        assert 1e-4 <= trial["params"]["training.lr"] <= 1e-2 and 4 <= trial["params"]["method.hidden_size"] <= 16
        assert trial["energy"]["joules"] > 0 and trial["energy"]["source"] in ("nvml", "rapl", "estimate")
        if trial["status"] == "finished":   # ran all 3 steps: its objective is its final dev accuracy
            assert trial["feasible"] and trial["objectives"] == [trial["metrics"]["accuracy"]]
            # the trial's sampled hidden size reached its model: READ's side network of that size and the head
            read = ReadConfig(hidden_size=trial["params"]["method.hidden_size"], rnn="gru")
            side = side_parameter_formula(32, read, depth=2)
            assert trial["memory"]["trainable_params"] == side + TINY_BERT_HEAD and trial["time"]["steps"] == 3
            assert states[trial["number"]] == optuna.trial.TrialState.COMPLETE
        else:                               # ASHA stopped it after a report: pruned, ranked by that report
            assert trial["status"] == "stopped: asha" and trial["time"]["steps"] < 3 and not trial["feasible"]
            assert states[trial["number"]] == optuna.trial.TrialState.PRUNED
        assert study.trials[trial["number"]].constraints == trial["constraints"]
    assert on_disk["trials"][0]["status"] == "finished"   # the first trial has no rival at its rung
    assert report["best"]["objectives"][0] == max(t["objectives"][0] for t in on_disk["trials"] if t["feasible"])
    best_job = load_job(out / "best_job.yaml")
    assert best_job.training.lr == report["best"]["params"]["training.lr"]
    assert best_job.training.eval_every is None   # the job as the user wrote it, not the trial's ASHA settings
    assert [e["name"] for e in PriorStore(tmp_path / "priors.db").entries()] == [str(out)]

    # The next sweep with priors (the transfer sampler's enqueue method) evaluates the stored sweep's best
    # configuration first; sweep.json names the source and its weight for each trial.
    # It also has a sweep energy budget that its first trial passes at its first log step: that trial stops there
    # and no other starts. It lives in S3: trials, results and the study (sent back after every trial) go there.
    uri = f"{s3_server}/sweeps/warm"
    warm = run_sweep(str(write_sweep(tmp_path, glue_dir, name="warm", steps=8, num_trials=3,
                                     energy={"sweep_budget_j": 1e-9}, output_dir=uri,
                                     priors={"use": "auto", "store": str(tmp_path / "priors.db"),
                                             "method": "enqueue"})))
    assert warm["priors"]["sweeps"][0]["name"] == str(out) and warm["priors"]["sweeps"][0]["distance"] == 0
    assert warm["priors"]["method"] == "enqueue" and warm["priors"]["last_weights"] == {str(out): 1.0}
    finished = [t for t in on_disk["trials"] if t["status"] == "finished"]   # ASHA-stopped ones do not teach
    assert warm["priors"]["trials_used"] == {str(out): len(finished)} and "sources" not in warm["priors"]
    assert [e["trials"] for e in json.loads(Storage(uri).read_text("sweep_spec.json"))["priors"]["sources"]] == \
        [PriorStore(tmp_path / "priors.db").entries()[0]["trials"]]   # the source as it was, for a resume
    assert warm["trials"][0]["params"] == report["best"]["params"] and warm["trials"][0]["prior"] == {str(out): 1.0}

    assert [t["status"] for t in warm["trials"]] == ["stopped: sweep energy budget"]
    assert warm["trials"][0]["time"]["steps"] == 1
    assert warm["energy"]["stopped_by"] == ENERGY
    assert warm["energy"]["overshoot_j"] == pytest.approx(warm["energy"]["total_j"] - 1e-9)
    stored = Storage(uri)
    assert {"optuna.db", "sweep.json", "sweep_spec.json", "trials", "tune-0"} <= set(stored.names())
    assert [t["trial_id"] for t in json.loads(stored.read_text("sweep.json"))["trials"]] == \
        [warm["trials"][0]["trial_id"]]
    trial_dir = f"trials/{warm['trials'][0]['trial_id']}"
    assert {"result.json", "train", "final"} <= set(stored.names(trial_dir))
    resumed = run_sweep(str(tmp_path / "warm.yaml"), resume=True)   # fetches the study; the budget is spent
    assert [t["trial_id"] for t in resumed["trials"]] == [warm["trials"][0]["trial_id"]]


@pytest.mark.slow
def test_a_trial_energy_budget_stops_every_trial_and_the_sweep_goes_on(tmp_path, glue_dir, local_ray, mlflow_server):
    """Also: the sweep logs to a real MLflow server, one parent run and one nested run per trial; and it is a grid
    sweep cut short, which runs the first points of its seeded order."""
    from mlflow.tracking import MlflowClient

    from rayeff.tune.sweep import run_sweep

    grid = {"training.lr": [1e-3, 3e-3], "method.hidden_size": [4, 8]}
    path = write_sweep(tmp_path, glue_dir, num_trials=2, energy={"trial_budget_j": 1e-9},
                       searcher={"kind": "grid", "seed": 5, "grid": grid},
                       tracking={"mlflow": mlflow_server, "experiment": "budget"})
    per_trial = run_sweep(str(path))
    points = load_sweep(path)[0].searcher.grid_points()
    assert [t["params"] for t in per_trial["trials"]] == points[:2] and points[0] != points[1]
    assert [t["status"] for t in per_trial["trials"]] == ["stopped: energy budget"] * 2
    assert not any(t["feasible"] for t in per_trial["trials"]) and per_trial["best"] is None
    assert all(t["energy"]["joules"] > 0 and t["constraints"]["energy_over_budget_j"] > 0
               for t in per_trial["trials"])
    assert not (tmp_path / "sweep" / "best_job.yaml").exists()
    # The sweep's own energy budget is checked in the ASHA test's second sweep.

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("budget").experiment_id])
    [parent] = [r for r in runs if "rayeff.sweep" in r.data.tags]
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 3 and sorted(trials) == sorted(t["trial_id"] for t in per_trial["trials"])
    assert parent.data.params["sweep.energy.trial_budget_j"] == "1e-09" and parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == 2
    for trial in per_trial["trials"]:
        logged = trials[trial["trial_id"]]
        assert logged.data.tags["rayeff.status"] == "stopped: energy budget" and logged.info.status == "KILLED"
        assert logged.data.metrics["energy_joules"] == pytest.approx(trial["energy"]["joules"])
        assert logged.data.params["method.hidden_size"] == str(trial["params"]["method.hidden_size"])


def _trials(db: str) -> list:
    try:
        return optuna.load_study(study_name="rayeff", storage=db).trials
    except Exception:  # the driver has not created the study yet
        return []


def test_sweep_limits_refuse_trials_that_would_pass_the_budget():
    limits = SweepLimits(budget_j=10.0, time_limit_s=None)
    assert limits.start("a") is None and limits.update("a", 4.0) == (None, 6.0)
    limits.finish("a", 4.0)
    assert limits.start("b") is None            # 4 spent + 4 expected <= 10
    assert limits.update("b", 3.0)[0] is None
    assert limits.start("c") == ENERGY          # 7 spent + 1 more expected of b + 4 expected of c > 10
    assert limits.update("b", 10.5)[0] == ENERGY and limits.why_stopped() == ENERGY
    resumed = SweepLimits(budget_j=10.0, time_limit_s=None, earlier_j=[6.0])
    assert resumed.start("d") == ENERGY         # 6 earlier + 6 expected > 10
    late = SweepLimits(budget_j=None, time_limit_s=1e-3)
    time.sleep(0.01)
    assert late.start("a") == TIME and late.update("a", 1.0)[0] == TIME


def test_the_pareto_front_is_optunas_best_trials_among_feasible_complete_trials():
    """The front comes from the study (`study.best_trials`), which leaves out trials over a budget (a constraint
    > 0) and trials that did not complete, whatever their objectives."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    trials = []
    for n, (acc, joules, over, state) in enumerate([(0.8, 10, 0, "COMPLETE"), (0.9, 20, 0, "COMPLETE"),
                                                    (0.7, 15, 0, "COMPLETE"), (0.9, 25, 0, "COMPLETE"),
                                                    (0.95, 5, 1.0, "COMPLETE"), (0.99, 1, 0, "PRUNED")]):
        state = optuna.trial.TrialState[state]
        values = [acc, joules] if state == optuna.trial.TrialState.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(state=state, values=values,
                                                  constraints={"energy_over_budget_j": over}))
        trials.append({"number": n, "objectives": [acc, joules], "feasible": over <= 0 and values is not None})
    front = pareto_front(study, trials, ["max", "min"])
    assert [t["number"] for t in front] == [1, 0]
    feasible = [t for t in trials if t["feasible"]]   # checked by hand: no feasible trial dominates one on it
    assert all(not any(dominates(o["objectives"], t["objectives"], ["max", "min"]) for o in feasible) for t in front)


@pytest.mark.parametrize("changes, message", [
    ({"num_trials": None}, "num_trials"),
    ({"searcher": {"kind": "grid"}}, "kind grid needs grid"),
    ({"searcher": {"kind": "grid", "grid": {"training.lr": [1e-3]}}}, "missing ['method.hidden_size']"),
    ({"searcher": {"kind": "grid", "grid": {"training.lr": [1e-3, 0.5], "method.hidden_size": [4]}}},
     "searcher.grid.training.lr value 0.5 is outside the search space (float in [0.0001, 0.01])"),
    ({"searcher": {"kind": "grid", "grid": {"training.lr": [1e-3], "method.hidden_size": [4.5]}}},
     "searcher.grid.method.hidden_size value 4.5 is outside"),
    ({"searcher": {"kind": "grid", "grid": {"training.lr": [1e-3], "method.hidden_size": [4, 8]}}},
     "num_trials is 3 but the grid has 2 points; set num_trials: 2"),
    ({"searcher": {"kind": "grid", "grid": {"training.lr": [1e-3], "method.hidden_size": [4]}}, "priors": "auto",
      "num_trials": 1}, "a grid sweep runs its grid as given"),
    ({"searcher": {"kind": "grid", "grid": {"training.lr": [1e-3], "method.hidden_size": [4]}}, "num_trials": 1,
      "scheduler": {"report_every_steps": 1}}, "a grid sweep runs every point to its end; drop the scheduler"),
    ({"priors": "auto", "searcher": {"kind": "nsga2"}}, "priors: auto samples with the transfer sampler"),
    ({"energy": {"sweep_budget_j": -5}}, "energy.sweep_budget_j: Input should be greater than 0"),
    ({"objective": {"metric": "f1"}}, "objective.metric 'f1' is not a dev metric of sst2"),
    ({"objective": [{"metric": "dev"}, {"metric": "energy_j", "mode": "min"}], "searcher": {"kind": "cmaes"}},
     "cmaes optimises one objective"),
    ({"base_job": "jobs/none.yaml"}, "no such job file"),
    ({"priors": "sometimes"}, "priors.use"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, glue_dir, changes, message):
    path = write_sweep(tmp_path, glue_dir, **changes)
    with pytest.raises(UserError, match=re.escape(message)):
        load_sweep(path)


@pytest.mark.parametrize("space, changes, message", [
    ("  method.rank: {type: int, low: 2, high: 8}\n", {}, "params.method.rank = 2 does not make a valid read job"),
    ("  training.lr: {type: float, low: 1.0e-3, high: 1.0e-3}\n", {}, "the range is empty"),
    (None, {"searcher": {"kind": "hyperband"}}, "searcher.kind: Input should be 'tpe', 'nsga2', 'cmaes' or 'grid'"),
    (None, {"energy": {"trial_budget_j": -1}}, "energy.trial_budget_j: Input should be greater than 0"),
])
def test_bad_input_exits_2_and_alters_no_study_or_store(tmp_path, glue_dir, capsys, space, changes, message):
    path = write_sweep(tmp_path, glue_dir, priors="auto", **changes)
    if space:
        (tmp_path / "space.yaml").write_text("method: read\nparams:\n" + space)
    store = PriorStore(tmp_path / "priors.db")
    store.add("earlier", {"method": "read", "task": "sst2"}, [{"metric": "dev", "mode": "max"}], {}, [])
    before = (tmp_path / "priors.db").read_bytes()
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (tmp_path / "priors.db").read_bytes() == before and not (tmp_path / "sweep").exists()


def test_a_grid_is_queued_once_with_each_fields_type_and_a_resume_queues_only_what_is_missing(tmp_path, glue_dir):
    from rayeff.tune.sweep import enqueue_grid

    grid = {"training.lr": [1e-3, 3e-3, 1e-2], "method.hidden_size": [4, 8]}
    (tmp_path / "steps.yaml").write_text("method: read\nparams:\n"
                                         "  training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                         "  method.hidden_size: {type: int, low: 4, high: 16, step: 4}\n")
    path = write_sweep(tmp_path, glue_dir, num_trials=6, searcher={"kind": "grid", "seed": 1, "grid": grid},
                       search_space=str(tmp_path / "steps.yaml"))
    sweep, _, space = load_sweep(path)
    study = optuna.create_study()
    enqueue_grid(study, sweep, space)
    first = study.ask()   # as a killed driver leaves it: one point running, the rest waiting
    enqueue_grid(study, sweep, space)
    queued = [t.system_attrs["fixed_params"] for t in study.trials]
    assert len(study.trials) == 6 and queued == sweep.searcher.grid_points()
    assert isinstance(queued[0]["training.lr"], float) and first.number == 0
    with pytest.raises(UserError, match=re.escape("method.hidden_size value 6 is outside the search space (int in "
                                                  "[4.0, 16.0] on steps of 4.0)")):
        load_sweep(path, ["searcher.grid={training.lr: [1.0e-3], method.hidden_size: [6]}", "num_trials=1"])


def test_the_shipped_sweeps_load():
    sweep, job, space = load_sweep(ROOT / "jobs" / "sweep-read.yaml")
    assert job.method.name == space.method == "read" and job.data.train_subset == 512 and sweep.num_trials == 6
    pareto, job, _ = load_sweep(ROOT / "jobs" / "sweep-adazeta-pareto.yaml")
    assert [o.metric for o in pareto.objectives] == ["dev", "energy_j"] and pareto.searcher.kind == "nsga2"
    bench, job, _ = load_sweep(ROOT / "jobs" / "sweep-bench-priors.yaml", ["overrides.data.task=stsb"])
    assert job.data.task == "stsb" and bench.max_concurrent == 2 and job.scaling.num_workers == 1
    table, job, space = load_sweep(ROOT / "jobs" / "sweep-table-read.yaml", ["overrides.data.task=rte"])
    assert table.searcher.kind == "grid" and table.num_trials == len(table.searcher.grid_points()) == 48
    assert set(table.searcher.grid) == set(space.params) and job.data.train_subset == 512
    side, job, space = load_sweep(ROOT / "jobs" / "sweep-read-side.yaml")
    assert "method.attention_pooling" in space.params and job.model.pooling == "mean" and side.num_trials == 20


# The rest of a Progress (rayeff/results.py), as Tune hands it over (flattened); eval is absent before the first one.
PROGRESS_REST = {"progress/total_steps": 8, "progress/epoch": 0, "progress/loss": 0.5,
                 "progress/samples_per_second": 2.0}


def test_a_trial_asha_stopped_is_recorded_from_its_last_report_and_pruned():
    from rayeff.tune.searcher import outcome
    from rayeff.tune.spec import SweepSpec
    from rayeff.tune.trial import trial_record

    sweep = SweepSpec(base_job="j", search_space="s", num_trials=2, energy={"trial_budget_j": 100.0})
    flat = {"objective_0": 0.6, "progress/step": 4, "progress/energy_joules": 30.0,   # as Tune hands it over
            "progress/energy_source": "estimate", "progress/eval/accuracy": 0.6, "training_iteration": 2,
            **PROGRESS_REST}
    record = trial_record("t1", {"training.lr": 1e-3}, flat, sweep)
    assert record["status"] == "stopped: asha" and record["objectives"] == [0.6] and record["time"] == {"steps": 4}
    assert record["constraints"] == {"unfinished": 1.0, "energy_over_budget_j": -70.0} and not record["feasible"]
    assert outcome(record) == (optuna.trial.TrialState.PRUNED, None)
    final = {"objective_0": 0.7, "final": True, "summary/status": "finished", "summary/metrics/accuracy": 0.7,
             "summary/energy/joules": 120.0, "summary/energy/source": "estimate",
             "summary/energy/train_joules": 100.0}
    over = trial_record("t2", {}, final, sweep)
    assert over["constraints"] == {"unfinished": 0.0, "energy_over_budget_j": 20.0} and not over["feasible"]
    assert outcome(over) == (optuna.trial.TrialState.COMPLETE, 0.7)
    crashed = trial_record("t3", {}, {"final": True, "summary/status": "error: RuntimeError: boom"}, sweep)
    assert outcome(crashed) == (optuna.trial.TrialState.FAIL, None) and not crashed["feasible"]


def test_the_searcher_records_each_trial_and_its_constraints_in_the_study(tmp_path):
    """SweepSearch driven as Tune drives it (no Ray cluster): the study gets every trial's record, constraints and
    state, an enqueued trial is suggested first, an ASHA-stopped trial is pruned at its last report, and a repeated
    completion changes nothing. For CMA-ES an over-budget trial is told as failed."""
    import ray.cloudpickle

    from rayeff.tune.searcher import RECORD_ATTR, STUDY_NAME, SweepSearch
    from rayeff.tune.spec import SweepSpec

    space = {"training.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "method.hidden_size": optuna.distributions.IntDistribution(4, 16)}
    final = {"objective_0": 0.7, "final": True, "summary/status": "finished", "summary/metrics/accuracy": 0.7,
             "summary/energy/joules": 120.0, "summary/energy/source": "estimate", "summary/energy/train_joules": 100.0,
             "training_iteration": 3}
    for kind in ("tpe", "cmaes"):
        sweep = SweepSpec(base_job="j", search_space="s", num_trials=2, energy={"trial_budget_j": 100.0},
                          searcher={"kind": kind})
        db = f"sqlite:///{tmp_path / kind}.db"
        optuna.create_study(storage=db, study_name=STUDY_NAME, direction="maximize").enqueue_trial(
            {"training.lr": 1e-3, "method.hidden_size": 8}, user_attrs={"prior": 1})
        searcher = SweepSearch(sweep, space, str(tmp_path), f"{tmp_path / kind}.db")
        ray.cloudpickle.dumps(searcher)   # Tune pickles its search algorithm with the Tuner
        assert searcher.suggest("a") == {"training.lr": 1e-3, "method.hidden_size": 8}
        assert set(searcher.suggest("b")) == set(space)
        for step, value in ((1, 0.5), (2, 0.6)):
            searcher.on_trial_result("b", {"objective_0": value, "progress/step": 4 * step,
                                           "progress/energy_joules": 30.0, "progress/energy_source": "estimate",
                                           "training_iteration": step, **PROGRESS_REST})
        searcher.on_trial_result("a", final)
        searcher.on_trial_complete("a", final)
        searcher.on_trial_complete("b", {"objective_0": 0.6, "progress/step": 8, "progress/energy_joules": 30.0,
                                         "progress/energy_source": "estimate", "training_iteration": 2,
                                         **PROGRESS_REST})
        searcher.on_trial_complete("a", None, error=True)   # Tune may tell a completion twice: the first counts
        a, b = optuna.load_study(study_name=STUDY_NAME, storage=db).trials
        assert a.user_attrs[RECORD_ATTR]["trial_id"] == "a" and a.user_attrs["prior"] == 1
        assert a.user_attrs[RECORD_ATTR]["status"] == "finished" and not a.user_attrs[RECORD_ATTR]["feasible"]
        assert a.constraints == {"unfinished": 0.0, "energy_over_budget_j": 20.0}
        if kind == "tpe":   # TPE reads the constraints: the over-budget trial is complete with its value
            assert a.state == optuna.trial.TrialState.COMPLETE and a.value == 0.7
        else:               # CMA-ES does not: the trial is kept out of its model
            assert a.state == optuna.trial.TrialState.FAIL and a.value is None
        assert b.user_attrs[RECORD_ATTR]["status"] == "stopped: asha" and b.user_attrs[RECORD_ATTR]["params"] == \
            b.params
        assert b.constraints == {"unfinished": 1.0, "energy_over_budget_j": -70.0}
        assert b.state == optuna.trial.TrialState.PRUNED and b.intermediate_values == {1: 0.5, 2: 0.6}
        assert b.value == 0.6   # a pruned trial's value is its last report, which TPE then ranks it by


def test_a_used_output_folder_needs_resume_and_resume_needs_a_sweep(tmp_path, glue_dir, capsys):
    path = write_sweep(tmp_path, glue_dir)
    assert main(["tune", str(path), "--resume"]) == 2
    assert "holds no sweep to resume; run without --resume" in capsys.readouterr().err
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "optuna.db").write_bytes(b"")
    assert main(["tune", str(path)]) == 2
    assert "already holds a sweep; pass --resume to continue it" in capsys.readouterr().err


@pytest.mark.parametrize("kind, sampler", [("tpe", "TPESampler"), ("nsga2", "NSGAIISampler"),
                                           ("cmaes", "CmaEsSampler")])
def test_each_searcher_kind_samples_the_space_and_a_pickled_copy_samples_on(kind, sampler):
    """Ray Tune pickles the searcher, sampler included, when it builds the Tuner (Optuna 5.1.0's NSGA-II could not
    be pickled)."""
    import pickle

    from rayeff.tune.searcher import make_sampler
    from rayeff.tune.space import load_search_space, optuna_distributions
    from rayeff.tune.spec import SearcherSpec

    space = optuna_distributions(load_search_space(ROOT / "search_spaces" / "adazeta.yaml"))
    study = optuna.create_study(sampler=make_sampler(SearcherSpec(kind=kind, seed=0)), direction="maximize")
    assert isinstance(study.sampler, getattr(optuna.samplers, sampler))
    for i in range(12):   # past every sampler's start-up, so the model-based path runs too
        if i == 6:
            study.sampler = pickle.loads(pickle.dumps(study.sampler))
        trial = study.ask(fixed_distributions=space)
        trial.set_constraint("energy_over_budget_j", 1.0 if i % 3 == 0 else -1.0)
        study.tell(trial, -abs(math.log10(trial.params["training.lr"]) + 3))
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 12
    assert all(set(t.params) == set(space) for t in study.trials)
    assert study.trials[0].constraints == {"energy_over_budget_j": 1.0}


def test_rayeff_tune_prints_the_sources_and_their_last_weights(monkeypatch, capsys):
    import argparse

    import rayeff.tune.sweep as sweep_module
    from rayeff import cli

    report = {"best": None, "trials": [], "output_dir": "out", "interrupted": False,
              "energy": {"total_j": 0.0, "sources": [], "stopped_by": None},
              "priors": {"method": "ensemble", "sweeps": [{"name": "runs/a"}, {"name": "runs/b"}],
                         "last_weights": {"runs/a": 0.7, "runs/b": 0.0, "target": 0.3}}}
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *a, **k: report)
    cli.cmd_tune(argparse.Namespace(sweep="s.yaml", overrides=[], output=None, data_dir=None, address=None,
                                    resume=False, no_progress=False))
    assert "rayeff: priors (ensemble): runs/a (weight 0.70), runs/b (weight 0.00); this sweep's own model 0.30" \
        in capsys.readouterr().out


def test_a_configuration_whose_plan_cannot_fit_a_worker_is_recorded_infeasible_and_never_started(tmp_path, glue_dir):
    """`constraints.memory_per_worker_gb` between the plan's figures for batch 4 and batch 256 (tiny-bert, full):
    each batch-256 configuration the study proposes is told as pruned with its planned figure and counts as a
    trial, without reaching Tune; the batch-4 one is suggested. With the sweep's 3 trials used up, it is finished."""
    from ray.tune.search import Searcher

    from rayeff.tune.searcher import RECORD_ATTR, STUDY_NAME, SweepSearch
    from rayeff.tune.spec import SweepSpec

    base = yaml.safe_load(write_sweep(tmp_path, glue_dir).with_name("job.yaml").read_text())
    base["method"] = {"name": "full"}
    base = validate_job(base).model_dump(mode="json")
    planned = {b: worker_bytes(trial_job(base, {"training.batch_size": b}, SweepSpec(
        base_job="j", search_space="s", num_trials=1), "x")) for b in (4, 256)}
    limit = (planned[4] + planned[256]) / 2 / 1e9
    sweep = SweepSpec(base_job="j", search_space="s", num_trials=3, constraints={"memory_per_worker_gb": limit})
    db = tmp_path / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name=STUDY_NAME, direction="maximize")
    for batch in (256, 4, 256):
        study.enqueue_trial({"training.batch_size": batch})
    space = {"training.batch_size": optuna.distributions.CategoricalDistribution([4, 256])}
    searcher = SweepSearch(sweep, space, str(tmp_path), str(db), base_job=base)
    assert searcher.suggest("a") == {"training.batch_size": 4}
    assert searcher.suggest("b") == Searcher.FINISHED   # the third trial: batch 256 again, not started
    trials = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db}").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING,
                                         optuna.trial.TrialState.PRUNED]
    for trial in (trials[0], trials[2]):
        record = trial.user_attrs[RECORD_ATTR]
        assert record["planned_memory_per_worker_bytes"] == planned[256] and not record["feasible"]
        assert record["status"].startswith(f"infeasible: the plan puts {planned[256] / 1e9:.4g} GB of tensors")
        assert trial.constraints == {"unfinished": 1.0, "memory_over_limit_gb": planned[256] / 1e9 - limit}
        assert record["params"] == {"training.batch_size": 256} and record["trial_id"] is None
    assert RECORD_ATTR not in trials[1].user_attrs   # started: recorded when Tune reports it complete


def test_the_sweep_display_shows_each_trials_progress_records_and_the_budget_left(capsys):
    """Fed as the sweep driver feeds it: a running trial's progress (one line each off a terminal), then the
    study's records; the table has a row per trial, the never-started one under its study number, and the title
    the budget left after every trial's energy."""
    import io

    from rich.console import Console

    from rayeff.tune.display import SweepDisplay
    from rayeff.tune.spec import SweepSpec

    sweep = SweepSpec(base_job="j", search_space="s", num_trials=3, energy={"sweep_budget_j": 100.0},
                      objective=[{"metric": "dev", "mode": "max"}, {"metric": "energy_j", "mode": "min"}])
    progress = {"step": 4, "total_steps": 8, "epoch": 0, "loss": 0.5, "samples_per_second": 2.0,
                "energy_joules": 12.5, "energy_source": "estimate", "eval": {"accuracy": 0.75}, "trial": "b"}
    with SweepDisplay(sweep, ["accuracy", None], console=Console(file=io.StringIO())) as display:
        display.progress(progress)
        assert capsys.readouterr().out.strip() == ("trial b: step 4/8  epoch 0  loss 0.5000  2.0 samples/s  energy "
                                                   "12.5 J (estimate)  dev accuracy 0.7500  sweep budget left 87.5 J")
        display.records([{"number": 0, "trial_id": "a", "status": "finished", "objectives": [0.8, 30.0],
                          "energy": {"joules": 30.0, "source": "estimate"}, "time": {"steps": 8}},
                         {"number": 2, "trial_id": None, "status": "infeasible: the plan puts ...",
                          "objectives": None, "energy": None, "time": None}])
    assert display.budget_left() == 100.0 - 12.5 - 30.0
    console = Console(file=io.StringIO(), width=200)
    console.print(display.table())
    text = console.file.getvalue()
    assert "3 of 3 trials, sweep energy budget left 57.5 J" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["b", "a", "#2"]
    assert [cell.strip() for cell in rows[0].split("│")[2:6]] == ["running", "4/8", "0.75", "12.5"]
    assert "finished" in rows[1] and "0.8" in rows[1] and "infeasible" in rows[2]


def test_a_sweep_started_before_a_field_existed_resumes_with_that_fields_default(tmp_path):
    """sweep_spec.json of a sweep started before `constraints` existed has no such key: the field at its default
    is no change, while a set constraint is one."""
    from rayeff.tune.spec import SweepSpec
    from rayeff.tune.sweep import STARTED_FILE, _started

    sweep = SweepSpec(base_job="j", search_space="s", num_trials=2, output_dir=str(tmp_path))
    older = sweep.model_dump(mode="json")
    del older["constraints"]
    (tmp_path / "optuna.db").write_bytes(b"")
    (tmp_path / STARTED_FILE).write_text(json.dumps({"sweep": older}))
    assert _started(Storage(str(tmp_path)), sweep, resume=True)["sweep"] == older
    constrained = sweep.model_copy(update={"constraints": {"memory_per_worker_gb": 1.0}})
    with pytest.raises(UserError, match="constraints: changed since the sweep"):
        _started(Storage(str(tmp_path)), SweepSpec.model_validate(constrained.model_dump()), resume=True)
