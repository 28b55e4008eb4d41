"""`rayeff tune SWEEP.yaml`: a hyper-parameter sweep of one job over a search space, with Ray Tune and Optuna.

    base_job: jobs/sst2-read.yaml            # the job every trial runs, with the tuned fields changed
    search_space: search_spaces/read.yaml
    overrides: {training.max_steps: 60}      # job fields fixed for the whole sweep
    objective: {metric: dev, mode: max}      # dev: the task's primary dev metric
    searcher: {kind: tpe, seed: 0}
    num_trials: 6
    max_concurrent: 1
    energy: {trial_budget_j: 2000}
    output_dir: runs/sweep-read

Each trial is a Tune function that runs its job through a Ray Train `TorchTrainer` (Ray 2.60's pattern, not
`Tuner(trainer)`); the trial function itself asks for a tenth of a CPU so that trial drivers never hold the CPUs
their training workers need. Optuna's TPE suggests the parameters; its study lives in `optuna.db` (SQLite, which
optuna-dashboard opens). A trial whose energy passes `trial_budget_j` is stopped by the run itself (status
`stopped: energy budget`, recorded with the energy it used) and counts as infeasible.

Writes `sweep.json` (every trial: parameters, metrics, energy with its source, memory, time, status, feasibility)
and `best_job.yaml`, the best feasible trial's job, ready for `rayeff run`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from rayeff.config import JobSpec, Spec, describe_errors, load_job, read_yaml_mapping, set_field, validate_job
from rayeff.data.metrics import primary_metric
from rayeff.errors import UserError
from rayeff.tune.space import SearchSpace, load_search_space, optuna_distributions

DRIVER_CPUS = 0.1
STUDY_NAME = "rayeff"


class ObjectiveSpec(Spec):
    metric: str = Field("dev", description="dev (the task's primary dev metric), another dev metric, or energy_j")
    mode: Literal["max", "min"] = "max"


class SearcherSpec(Spec):
    kind: Literal["tpe"] = "tpe"
    seed: int = 0


class SweepEnergySpec(Spec):
    trial_budget_j: float | None = Field(None, gt=0, description="stop a trial past this; it counts as infeasible")


class SweepSpec(Spec):
    base_job: str
    search_space: str
    overrides: dict[str, Any] = Field(default_factory=dict, description="job fields fixed for every trial")
    objective: ObjectiveSpec = ObjectiveSpec()
    searcher: SearcherSpec = SearcherSpec()
    num_trials: int = Field(gt=0)
    max_concurrent: int = Field(1, gt=0)
    energy: SweepEnergySpec = SweepEnergySpec()
    output_dir: str = "runs/sweep"


def load_sweep(path: str | Path, overrides: list[str] = (), data_dir: str | None = None
               ) -> tuple[SweepSpec, JobSpec, SearchSpace]:
    """The sweep, its base job (with the sweep's overrides) and its search space, each checked; paths in the sweep
    file are relative to the working directory. `--set overrides.training.lr=...` sets one job override."""
    from rayeff.config import parse_overrides

    raw = read_yaml_mapping(path, "sweep", "base_job, search_space and num_trials")
    for key, value in parse_overrides(list(overrides)):
        if key.startswith("overrides."):   # the rest is one dotted job field
            raw.setdefault("overrides", {})[key.removeprefix("overrides.")] = value
        else:
            set_field(raw, key, value)
    if data_dir is not None:
        raw.setdefault("overrides", {})["data.data_dir"] = data_dir
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: {describe_errors(err)}") from None
    job = load_job(sweep.base_job, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                    for k, v in sweep.overrides.items()])
    space = load_search_space(sweep.search_space)
    if space.method != job.method.name:
        raise UserError(f"{path}: search space {sweep.search_space} is for method {space.method} but base job "
                        f"{sweep.base_job} uses {job.method.name}")
    metric = sweep.objective.metric
    if metric not in ("dev", "energy_j") and not _is_dev_metric(job, metric):
        raise UserError(f"{path}: objective.metric {metric!r} is not a dev metric of {job.data.task}; use dev, "
                        "energy_j or one of the task's metrics")
    return sweep, job, space


def _is_dev_metric(job: JobSpec, metric: str) -> bool:
    from rayeff.data.glue import get_task

    return metric in get_task(job.data.task).metrics


def objective_value(sweep: SweepSpec, job: JobSpec, summary: dict) -> float:
    metric = sweep.objective.metric
    if metric == "energy_j":
        return float(summary["energy"]["joules"])
    name = primary_metric(job.data.task) if metric == "dev" else metric
    return float(summary["metrics"][name])


def run_trial(config: dict, base: dict, sweep: dict, sweep_dir: str) -> None:
    """One trial (a Tune function): the base job with this trial's parameters, run by a TorchTrainer."""
    from ray import tune

    from rayeff.train.runner import finish, make_trainer, prepare

    trial_id = tune.get_context().get_trial_id()
    raw = copy.deepcopy(base)
    for key, value in config.items():
        set_field(raw, key, value)
    raw["output_dir"], raw["resume"] = str(Path(sweep_dir) / "trials" / trial_id), False
    spec = SweepSpec.model_validate(sweep)
    if spec.energy.trial_budget_j is not None:
        raw["energy"]["budget_j"] = spec.energy.trial_budget_j
    job = validate_job(raw, f"trial {trial_id}")
    source = prepare(job)
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    summary = finish(job, make_trainer(job, source).fit())
    feasible = summary["status"] == "finished"
    tune.report({"objective": objective_value(spec, job, summary), "feasible": feasible,
                 "status": summary["status"], "summary": summary})


def trial_record(result) -> dict:
    metrics = result.metrics or {}
    summary = metrics.get("summary") or {}
    params = {k: v for k, v in (result.config or {}).items()}
    return {"trial_id": metrics.get("trial_id") or Path(result.path).name, "params": params,
            "status": summary.get("status") or ("error" if result.error else "unknown"),
            "error": str(result.error).splitlines()[0] if result.error else None,
            "feasible": bool(metrics.get("feasible")), "objective": metrics.get("objective"),
            "metrics": summary.get("metrics"), "energy": summary.get("energy"), "memory": summary.get("memory"),
            "time": summary.get("time"), "output_dir": summary.get("output_dir")}


def best_trial(trials: list[dict], sweep: SweepSpec) -> dict | None:
    feasible = [t for t in trials if t["feasible"] and t["objective"] is not None and math.isfinite(t["objective"])]
    if not feasible:
        return None
    pick = max if sweep.objective.mode == "max" else min
    return pick(feasible, key=lambda t: t["objective"])


def run_sweep(sweep_file: str, overrides: list[str] = (), data_dir: str | None = None,
              address: str | None = None) -> dict:
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from rayeff.train.runner import init_ray, write_json_atomic, write_text_atomic

    sweep, job, space = load_sweep(sweep_file, overrides, data_dir)
    output = Path(sweep.output_dir).resolve()
    if (output / "sweep.json").exists():
        raise UserError(f"output_dir: {output} already holds a sweep; choose another output_dir")
    output.mkdir(parents=True, exist_ok=True)
    if job.data.data_dir is not None:
        job.data.data_dir = str(Path(job.data.data_dir).resolve())
    base = job.model_dump(mode="json")
    per_trial = job.scaling.num_workers * job.scaling.cpus_per_worker + DRIVER_CPUS
    init_ray(address, sweep.max_concurrent * per_trial)
    searcher = OptunaSearch(space=optuna_distributions(space), metric="objective", mode=sweep.objective.mode,
                            sampler=optuna.samplers.TPESampler(seed=sweep.searcher.seed), study_name=STUDY_NAME,
                            storage=optuna.storages.RDBStorage(f"sqlite:///{output / 'optuna.db'}"))
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, sweep=sweep.model_dump(mode="json"),
                                                         sweep_dir=str(output)), {"CPU": DRIVER_CPUS})
    tuner = tune.Tuner(trainable,
                       tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, sweep.max_concurrent),
                                                   num_samples=sweep.num_trials,
                                                   max_concurrent_trials=sweep.max_concurrent),
                       run_config=tune.RunConfig(name="tune", storage_path=str(output), verbose=0))
    grid = tuner.fit()
    trials = [trial_record(r) for r in grid]
    best = best_trial(trials, sweep)
    report = {"sweep": sweep.model_dump(mode="json"), "objective": sweep.objective.model_dump(),
              "trials": trials, "best": best,
              "total_energy_j": sum((t["energy"] or {}).get("joules", 0.0) for t in trials),
              "study": str(output / "optuna.db")}
    if best is not None:
        raw = copy.deepcopy(base)
        for key, value in best["params"].items():
            set_field(raw, key, value)
        raw["output_dir"], raw["resume"] = str(output / "best"), False
        write_text_atomic(output / "best_job.yaml", yaml.safe_dump(validate_job(raw).model_dump(mode="json"),
                                                                  sort_keys=False))
        report["best_job"] = str(output / "best_job.yaml")
    write_json_atomic(output / "sweep.json", report)
    return report
