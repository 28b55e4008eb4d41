"""One trial of a sweep: a Tune function that runs the base job, with the trial's parameters, in a Ray Train
`TorchTrainer` (Ray 2.60's pattern, not `Tuner(trainer)`), and the record of it that `sweep.json` keeps.

Tune sees two kinds of result from a trial: intermediate ones, forwarded from each Train report (a checkpoint) by
`ReportObjectives` with the objectives read from the progress (what ASHA ranks), and the final one, from the
trial function itself, with the run's summary.
"""

from __future__ import annotations

import copy
import math

from ray.tune.integration.ray_train import TuneReportCallback

from pydantic import BaseModel, ConfigDict

from rayeff.cluster.storage import Storage, location_name
from rayeff.config import JobSpec, set_field, validate_job
from rayeff.results import Progress, RunResult, TrialSummary
from rayeff.tune.spec import ENERGY_METRIC, SweepSpec, metric_name, objective_values


class TrialReport(BaseModel):
    """A result Tune holds of a trial: the final one (`final`, with the `TrialSummary`) or an intermediate one
    forwarded from a Train report (with the run's `Progress`); both carry the objectives (`objective_<i>`), and
    Tune adds its own keys."""

    model_config = ConfigDict(extra="allow")

    final: bool = False
    summary: TrialSummary | None = None
    progress: Progress | None = None


CONTINUES_KEY = "rayeff.continues"   # in a trial's config: the folder (trial id) of the run it continues


def objective_keys(sweep: SweepSpec) -> list[str]:
    return [f"objective_{i}" for i in range(len(sweep.objectives))]


def job_with_params(base: dict, params: dict, output_dir: str, resume: bool = False) -> dict:
    """The base job (a dump) with tuned parameters set and its own output folder."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_field(raw, key, value)
    raw["output_dir"], raw["resume"] = output_dir, resume
    return raw


def trial_job(base: dict, params: dict, sweep: SweepSpec, output_dir: str, resume: bool = False) -> JobSpec:
    """A trial's job: the base job with its parameters and the sweep's per-trial settings (`resume`: it continues
    an interrupted trial's run in that folder); raises UserError when the combination is not a valid job."""
    raw = job_with_params(base, params, output_dir, resume)
    if sweep.energy.trial_budget_j is not None:
        raw["energy"]["budget_j"] = sweep.energy.trial_budget_j
    if sweep.tracking.enabled:   # (the sweep driver has made mlflow a URI and set the parent run)
        raw["tracking"] = sweep.tracking.model_dump(mode="json")
    if sweep.scheduler is not None:   # ASHA needs an evaluated, reported objective every interval
        every = sweep.scheduler.report_every_steps
        raw["training"]["eval_every"] = raw["training"]["checkpoint_every"] = every
    return validate_job(raw, f"trial {location_name(output_dir)}")


def planned_infeasible(base: dict, params: dict, sweep: SweepSpec) -> dict | None:
    """With `constraints.memory_per_worker_gb`: the record of a configuration whose plan (rayeff/plan) puts more
    tensors on a worker than that, which is therefore not started; None for one that fits, for a sweep without
    the constraint, and for a job that cannot be planned or is not valid (its trial then runs, or fails, as any)."""
    from rayeff.plan.fit import GB
    from rayeff.plan.planner import worker_bytes

    limit = sweep.constraints.memory_per_worker_gb
    if limit is None:
        return None
    try:
        planned = worker_bytes(trial_job(base, params, sweep, "planned"))
    except Exception:  # noqa: BLE001  (not plannable or not valid: the trial runs, or fails, as any other)
        return None
    over = planned / GB - limit
    if over <= 0:
        return None
    record = TrialSummary(status=f"infeasible: the plan puts {planned / GB:.4g} GB of tensors on each worker, over "
                                 f"constraints.memory_per_worker_gb {limit:g}; not started").record()
    record.update(planned_memory_per_worker_bytes=planned, objectives=None, trial_id=None, params=params,
                  constraints={"unfinished": 1.0, "memory_over_limit_gb": over}, feasible=False)
    return record


class ReportObjectives(TuneReportCallback):
    """Forwards each intermediate Train report to Tune with the objectives read from its progress; the final
    report is made by the trial function, with the summary. Only Tune's public hook is used: the metrics are
    rewritten, then handed to `TuneReportCallback.after_report`, which sends rank 0's dict on to Tune (without a
    checkpoint, so no `checkpoint_path` is added: the trial's checkpoints are its job's own)."""

    def __init__(self, sweep: dict, job: dict):
        super().__init__()
        self.sweep, self.job = SweepSpec.model_validate(sweep), JobSpec.model_validate(job)

    def after_report(self, run_context, metrics, checkpoint):
        if "progress" not in metrics[0]:   # the final report (the summary): the trial function reports it
            return
        progress = Progress.model_validate(metrics[0]["progress"])
        values = {}
        for key, objective in zip(objective_keys(self.sweep), self.sweep.objectives):
            values[key] = progress.energy_joules if objective.metric == ENERGY_METRIC else \
                (progress.eval or {}).get(metric_name(objective, self.job))
        if None not in values.values():
            super().after_report(run_context, [{**values, "progress": progress.dump()}], None)


def run_trial(config: dict, base: dict, sweep: dict, sweep_dir: str, limits, stop_request=None,
              progress_queue=None) -> None:
    """The Tune function. Any failure becomes a final report with status `error: ...`, so the sweep records it
    and goes on. A trial that continues an interrupted one (`config[CONTINUES_KEY]`) resumes that trial's run in
    its folder; `stop_request` is the sweep's (Ctrl-C: the run stops after its current step, checkpointed), and
    `progress_queue` its display's (rayeff/tune/display.py)."""
    from ray import tune

    from rayeff.train.runner import final_report, finish, prepare, start

    spec = SweepSpec.model_validate(sweep)
    trial_id = tune.get_context().get_trial_id()
    params = {k: v for k, v in config.items() if k != CONTINUES_KEY}
    folder = config.get(CONTINUES_KEY) or trial_id
    try:
        sweep_storage = Storage(sweep_dir)
        job = trial_job(base, params, spec, sweep_storage.child("trials", folder), resume=folder != trial_id)
        source = prepare(job)
        trainer = start(job, source, callbacks=[ReportObjectives(sweep, job.model_dump(mode="json"))],
                        sweep_limits=limits, trial_key=trial_id, run_name=location_name(sweep_storage.location),
                        stop_request=stop_request, progress_queue=progress_queue)
        with final_report(trainer.fit()) as (summary, checkpoint):
            summary = finish(job, summary, checkpoint)
    except Exception as err:  # noqa: BLE001  (recorded, not raised: one bad trial must not end the sweep)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        failed = TrialSummary(status=f"error: {type(err).__name__}: {first}")
        tune.report({"final": True, "summary": failed.dump()})
        return
    values = objective_values(spec, job, summary)
    tune.report({**dict(zip(objective_keys(spec), values)), "final": True,
                 "summary": TrialSummary.of(RunResult.model_validate(summary)).record()})


def trial_record(trial_id: str, params: dict, result: dict | None, sweep: SweepSpec) -> dict:
    """What sweep.json keeps of a trial, from its last result: the final one, or the last intermediate one of a
    trial that ASHA stopped, or nothing (a trial that crashed outside the trial function). Tune hands searchers
    results flattened ("summary/status"); they are nested again here."""
    from ray.tune.utils.util import unflatten_dict

    result = unflatten_dict(result or {})
    report = TrialReport.model_validate(result)
    keys = objective_keys(sweep)
    if report.final and report.summary is not None:
        record = report.summary.record()
        record["objectives"] = [result[k] for k in keys] if all(k in result for k in keys) else None
    elif report.progress is not None:
        progress = report.progress
        record = {"status": "stopped: asha", "metrics": progress.eval,
                  "energy": {"joules": progress.energy_joules, "source": progress.energy_source},
                  "time": {"steps": progress.step}, "objectives": [result[k] for k in keys]}
    else:
        record = {"status": "error: the trial ended without a result (see Ray's logs)", "objectives": None}
    joules = (record.get("energy") or {}).get("joules")
    constraints = {"unfinished": 0.0 if record["status"] == "finished" else 1.0}
    if sweep.energy.trial_budget_j is not None and joules is not None:
        constraints["energy_over_budget_j"] = joules - sweep.energy.trial_budget_j
    values = record["objectives"]
    record.update(trial_id=trial_id, params=params, constraints=constraints,
                  feasible=all(v <= 0 for v in constraints.values()) and values is not None
                  and all(math.isfinite(v) for v in values))
    return record
