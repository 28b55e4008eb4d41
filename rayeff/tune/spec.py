"""What a sweep file holds, validated (pydantic), and `load_sweep`, which checks it with its base job and space.

    base_job: jobs/sst2-read.yaml            # the job every trial runs, with the tuned fields changed
    search_space: search_spaces/read.yaml
    overrides: {training.max_steps: 60}      # job fields fixed for the whole sweep
    objective: {metric: dev, mode: max}      # or a list: [{metric: dev, mode: max}, {metric: energy_j, mode: min}]
    searcher: {kind: tpe, seed: 0}           # tpe | nsga2 | cmaes | grid (with grid: {field: [values], ...})
    scheduler: {kind: asha, report_every_steps: 20}   # optional early stopping
    num_trials: 6
    max_concurrent: 1
    energy: {trial_budget_j: 2000, sweep_budget_j: 6000}
    time_limit_s: 3600
    priors: auto                             # or none (the default), or {use: auto, store: ..., max_sweeps: 4}
    output_dir: runs/sweep-read
"""

from __future__ import annotations

import itertools
import math
import random
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
from rayeff.data.task import LOWER_IS_BETTER, task_of
from rayeff.errors import UserError
from rayeff.results import RunResult
from rayeff.spec_base import Spec
from rayeff.tune.space import SearchSpace, check_fields, load_search_space

ENERGY_METRIC = "energy_j"


class ObjectiveSpec(Spec):
    metric: str = Field("dev", description="dev (the task's primary dev metric), another dev metric, or energy_j")
    mode: Literal["max", "min"] = "max"


# Optuna's samplers seed numpy's RandomState (below 2**32) with this seed plus the trials already done.
MAX_SEARCHER_SEED = 2**31


class SearcherSpec(Spec):
    kind: Literal["tpe", "nsga2", "cmaes", "grid"] = "tpe"
    seed: int = Field(0, ge=0, lt=MAX_SEARCHER_SEED)
    grid: dict[str, list[Any]] | None = Field(None, description="kind grid: the values of every tuned field; the "
                                              "sweep runs each combination once, in an order shuffled by `seed`")

    @model_validator(mode="after")
    def _grid_with_its_kind(self) -> SearcherSpec:
        if (self.kind == "grid") != (self.grid is not None):
            raise ValueError("searcher.grid goes with searcher.kind: grid, and kind grid needs grid: {field: [values]}")
        if self.grid is not None and not all(self.grid.values()):
            raise ValueError("searcher.grid: give each field at least one value")
        return self

    def grid_points(self) -> list[dict]:
        """Every combination of the grid's values, shuffled by the seed (a sweep cut short still spreads out)."""
        keys = sorted(self.grid)
        points = [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        random.Random(self.seed).shuffle(points)
        return points


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


class SweepConstraints(Spec):
    memory_per_worker_gb: float | None = Field(
        None, gt=0, description="memory of one worker in GB (1e9 bytes): a configuration whose plan (rayeff plan) puts "
        "more tensors on a worker is not started, and is recorded as infeasible with its planned figure")


class PriorsSpec(Spec):
    use: Literal["none", "auto"] = "none"
    store: str = Field("runs/priors.db", description="SQLite prior store; every finished sweep is added to it")
    max_sweeps: int = Field(4, gt=0, description="learn from at most this many of the most similar stored sweeps")
    method: Literal["ensemble", "weighted", "enqueue"] = Field(
        "ensemble", description="the transfer sampler's method (rayeff/tune/transfer.py): ensemble (Gaussian "
        "processes weighted by how well each ranks this sweep's trials), weighted (TPE with the sources' trials as "
        "weighted observations) or enqueue (their best configurations first, then TPE in their box)")


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
    constraints: SweepConstraints = SweepConstraints()
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
        if self.searcher.kind == "grid" and self.priors.use != "none":
            raise ValueError("priors: a grid sweep runs its grid as given; set priors: none")
        if self.searcher.kind == "grid" and self.scheduler is not None:
            raise ValueError("scheduler: a grid sweep runs every point to its end; drop the scheduler")
        if self.priors.use == "auto" and (many or self.searcher.kind != "tpe"):
            raise ValueError("priors: auto samples with the transfer sampler, for one objective and in place of "
                             "TPE; use searcher.kind: tpe with one objective, or priors: none")
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
    space = load_search_space(sweep.search_space, check=False)   # checked against the base job below
    if space.method != job.method.name:
        raise UserError(f"{path}: search space {sweep.search_space} is for method {space.method} but base job "
                        f"{sweep.base_job} uses {job.method.name}")
    check_fields(space, f"{path}: {sweep.search_space} with base job {sweep.base_job}",
                 job.model_dump(mode="json"))
    if sweep.searcher.grid is not None:
        check_grid(sweep, space, str(path))
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


def check_grid(sweep: SweepSpec, space: SearchSpace, source: str) -> None:
    """A grid names every tuned field, each value lies in the field's range (or among its choices), and the sweep
    runs no more trials than the grid has points."""
    grid = sweep.searcher.grid
    missing, extra = sorted(set(space.params) - set(grid)), sorted(set(grid) - set(space.params))
    if missing or extra:
        raise UserError(f"{source}: searcher.grid must list exactly the fields of {sweep.search_space}: "
                        + (f"missing {missing}" if missing else f"{extra} are not in the space"))
    for key, values in grid.items():
        p = space.params[key]
        for value in values:
            inside = value in p.choices if p.type == "categorical" else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high
                and (p.type == "float" or value == int(value))
                and (not p.step or math.isclose((value - p.low) / p.step, round((value - p.low) / p.step))))
            if not inside:
                allowed = p.choices if p.type == "categorical" else f"{p.type} in [{p.low}, {p.high}]" + (
                    f" on steps of {p.step}" if p.step else "")
                raise UserError(f"{source}: searcher.grid.{key} value {value!r} is outside the search space "
                                f"({allowed})")
    size = math.prod(len(v) for v in grid.values())
    if sweep.num_trials > size:
        raise UserError(f"{source}: num_trials is {sweep.num_trials} but the grid has {size} points; set "
                        f"num_trials: {size}")


def metric_name(objective: ObjectiveSpec, job: JobSpec) -> str:
    """The dev-metric key (or `energy_j`) an objective reads."""
    return task_of(job.data).metrics[0] if objective.metric == "dev" else objective.metric


def objective_values(sweep: SweepSpec, job: JobSpec, summary: dict) -> list[float]:
    """A finished trial's objectives, from its result summary (a `RunResult`, rayeff/results.py)."""
    result = RunResult.model_validate(summary)
    return [float(result.energy.joules) if o.metric == ENERGY_METRIC
            else float(result.metrics[metric_name(o, job)]) for o in sweep.objectives]
