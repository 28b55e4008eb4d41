"""What a sweep file holds, validated (pydantic), and `load_sweep`, which checks it with its base job and space.

    base_job: jobs/sst2-read.yaml            # the job every trial runs, with the tuned fields changed
    search_space: search_spaces/read.yaml
    overrides: {training.max_steps: 60}      # job fields fixed for the whole sweep
    objective: {metric: dev, mode: max}      # or a list: [{metric: dev, mode: max}, {metric: energy_j, mode: min}]
    searcher: {kind: tpe, seed: 0}           # tpe | nsga2 | cmaes
    scheduler: {kind: asha, report_every_steps: 20}   # optional early stopping
    num_trials: 6
    max_concurrent: 1
    energy: {trial_budget_j: 2000, sweep_budget_j: 6000}
    time_limit_s: 3600
    priors: auto                             # or none (the default), or {use: auto, store: ..., max_sweeps: 2}
    output_dir: runs/sweep-read
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from rayeff.config import (
    JobSpec,
    TrackingSpec,
    describe_errors,
    load_job,
    parse_overrides,
    read_yaml_mapping,
    set_field,
)
from rayeff.data.task import task_of
from rayeff.errors import UserError
from rayeff.results import RunResult
from rayeff.spec_base import Spec
from rayeff.tune.space import SearchSpace, check_fields, load_search_space

ENERGY_METRIC = "energy_j"
LOWER_IS_BETTER = ("eval_loss", "perplexity")   # a causal LM's dev metrics; every other dev metric is higher-better


class ObjectiveSpec(Spec):
    metric: str = Field("dev", description="dev (the task's primary dev metric), another dev metric, or energy_j")
    mode: Literal["max", "min"] = "max"


# Optuna's samplers seed numpy's RandomState (below 2**32) with this seed plus the trials already done.
MAX_SEARCHER_SEED = 2**31


class SearcherSpec(Spec):
    kind: Literal["tpe", "nsga2", "cmaes"] = "tpe"
    seed: int = Field(0, ge=0, lt=MAX_SEARCHER_SEED)


class SchedulerSpec(Spec):
    """ASHA early stopping: trials report their objective every `report_every_steps` steps (an evaluation and a
    checkpoint); at each rung only the top 1/reduction_factor go on."""
    kind: Literal["asha"] = "asha"
    report_every_steps: int = Field(gt=0)
    grace_period: int = Field(1, gt=0, description="reports before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepEnergySpec(Spec):
    trial_budget_j: float | None = Field(None, gt=0, description="stop a trial past this; it counts as infeasible")
    sweep_budget_j: float | None = Field(None, gt=0, description="start no trial that would pass it; stop at it")


class PriorsSpec(Spec):
    use: Literal["none", "auto"] = "none"
    store: str = Field("runs/priors.db", description="SQLite prior store; every finished sweep is added to it")
    max_sweeps: int = Field(2, gt=0, description="warm-start from at most this many of the most similar sweeps")
    top_trials: int = Field(3, gt=0, description="best trials taken from each prior sweep")
    narrow: bool = Field(True, description="narrow numeric ranges to the region the priors' good trials occupy")


class SweepSpec(Spec):
    base_job: str
    search_space: str
    overrides: dict[str, Any] = Field(default_factory=dict, description="job fields fixed for every trial")
    objective: ObjectiveSpec | list[ObjectiveSpec] = ObjectiveSpec()
    searcher: SearcherSpec = SearcherSpec()
    scheduler: SchedulerSpec | None = None
    num_trials: int = Field(gt=0)
    max_concurrent: int = Field(1, gt=0)
    energy: SweepEnergySpec = SweepEnergySpec()
    time_limit_s: float | None = Field(None, gt=0, description="wall time of one `rayeff tune` invocation")
    priors: PriorsSpec = PriorsSpec()
    tracking: TrackingSpec = Field(TrackingSpec(), description="one parent MLflow run for the sweep and one nested "
                                   "run per trial (true: a SQLite store in the sweep's folder); TensorBoard event "
                                   "files per trial")
    output_dir: str = "runs/sweep"

    @field_validator("priors", mode="before")
    @classmethod
    def _priors_shorthand(cls, value: Any) -> Any:
        return {"use": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if isinstance(self.objective, list) and not self.objective:
            raise ValueError("objective: give at least one {metric, mode}")
        many = len(self.objectives) > 1
        if many and self.searcher.kind == "cmaes":
            raise ValueError("searcher.kind: cmaes optimises one objective; use nsga2 or tpe for several")
        if many and self.scheduler is not None:
            raise ValueError("scheduler: ASHA ranks trials by one objective; drop it for a multi-objective sweep")
        return self

    @property
    def objectives(self) -> list[ObjectiveSpec]:
        return self.objective if isinstance(self.objective, list) else [self.objective]


def load_sweep(path: str | Path, overrides: list[str] = (), data_dir: str | None = None
               ) -> tuple[SweepSpec, JobSpec, SearchSpace]:
    """The sweep, its base job (with the sweep's overrides) and its search space, each checked; paths in the sweep
    file are relative to the working directory. `--set overrides.training.lr=...` sets one job override."""
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
    check_fields(space, f"{path}: {sweep.search_space} with base job {sweep.base_job}",
                 job.model_dump(mode="json"))
    for i, objective in enumerate(sweep.objectives):
        if objective.metric not in ("dev", ENERGY_METRIC) and objective.metric not in task_of(job.data).metrics:
            where = "objective" if len(sweep.objectives) == 1 else f"objective.{i}"
            raise UserError(f"{path}: {where}.metric {objective.metric!r} is not a dev metric of "
                            f"{job.data.display_name}; use dev, {ENERGY_METRIC} or one of the task's metrics")
        metric = metric_name(objective, job)
        if metric in LOWER_IS_BETTER and objective.mode == "max":
            where = "objective" if len(sweep.objectives) == 1 else f"objective.{i}"
            raise UserError(f"{path}: {where}.mode is max but {metric} is lower-is-better; set {where}.mode: min")
    return sweep, job, space


def metric_name(objective: ObjectiveSpec, job: JobSpec) -> str:
    """The dev-metric key (or `energy_j`) an objective reads."""
    return task_of(job.data).metrics[0] if objective.metric == "dev" else objective.metric


def objective_values(sweep: SweepSpec, job: JobSpec, summary: dict) -> list[float]:
    """A finished trial's objectives, from its result summary (a `RunResult`, rayeff/results.py)."""
    result = RunResult.model_validate(summary)
    return [float(result.energy.joules) if o.metric == ENERGY_METRIC
            else float(result.metrics[metric_name(o, job)]) for o in sweep.objectives]
