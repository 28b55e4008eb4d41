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

from rayeff.cluster.storage import Storage, location_name
from rayeff.config import JobSpec, set_field, validate_job
from rayeff.tune.spec import ENERGY_METRIC, SweepSpec, metric_name, objective_values

SUMMARY_FIELDS = ("status", "metrics", "energy", "memory", "time", "output_dir")


def objective_keys(sweep: SweepSpec) -> list[str]:
    return [f"objective_{i}" for i in range(len(sweep.objectives))]


def job_with_params(base: dict, params: dict, output_dir: str) -> dict:
    """The base job (a dump) with tuned parameters set and its own output folder."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_field(raw, key, value)
    raw["output_dir"], raw["resume"] = output_dir, False
    return raw


def trial_job(base: dict, params: dict, sweep: SweepSpec, output_dir: str) -> JobSpec:
    """A trial's job: the base job with its parameters and the sweep's per-trial settings; raises UserError when
    the combination is not a valid job."""
    raw = job_with_params(base, params, output_dir)
    if sweep.energy.trial_budget_j is not None:
        raw["energy"]["budget_j"] = sweep.energy.trial_budget_j
    if sweep.scheduler is not None:   # ASHA needs an evaluated, reported objective every interval
        every = sweep.scheduler.report_every_steps
        raw["training"]["eval_every"] = raw["training"]["checkpoint_every"] = every
    return validate_job(raw, f"trial {location_name(output_dir)}")


class ReportObjectives(TuneReportCallback):
    """Forwards each intermediate Train report to Tune with the objectives read from its progress; the final
    report is made by the trial function, with the summary."""

    def __init__(self, sweep: dict, job: dict):
        super().__init__()
        self.sweep, self.job = SweepSpec.model_validate(sweep), JobSpec.model_validate(job)

    def after_report(self, run_context, metrics, checkpoint):
        progress = metrics[0].get("progress")
        if progress is None:
            return
        values = {}
        for key, objective in zip(objective_keys(self.sweep), self.sweep.objectives):
            values[key] = progress["energy_joules"] if objective.metric == ENERGY_METRIC else \
                (progress.get("eval") or {}).get(metric_name(objective, self.job))
        if None not in values.values():
            self._training_actor_item_queue.put({**values, "progress": progress})


def run_trial(config: dict, base: dict, sweep: dict, sweep_dir: str, limits) -> None:
    """The Tune function. Any failure becomes a final report with status `error: ...`, so the sweep records it
    and goes on."""
    from ray import tune

    from rayeff.train.runner import finish, make_trainer, prepare

    spec = SweepSpec.model_validate(sweep)
    trial_id = tune.get_context().get_trial_id()
    try:
        sweep_storage = Storage(sweep_dir)
        job = trial_job(base, config, spec, sweep_storage.child("trials", trial_id))
        source = prepare(job)
        Storage(job.output_dir).make()
        trainer = make_trainer(job, source, callbacks=[ReportObjectives(sweep, job.model_dump(mode="json"))],
                               sweep_limits=limits, trial_key=trial_id,
                               run_name=location_name(sweep_storage.location))
        summary = finish(job, trainer.fit())
    except Exception as err:  # noqa: BLE001  (recorded, not raised: one bad trial must not end the sweep)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        tune.report({"final": True, "summary": {"status": f"error: {type(err).__name__}: {first}"}})
        return
    values = objective_values(spec, job, summary)
    tune.report({**dict(zip(objective_keys(spec), values)), "final": True,
                 "summary": {k: summary.get(k) for k in SUMMARY_FIELDS}})


def trial_record(trial_id: str, params: dict, result: dict | None, sweep: SweepSpec) -> dict:
    """What sweep.json keeps of a trial, from its last result: the final one, or the last intermediate one of a
    trial that ASHA stopped, or nothing (a trial that crashed outside the trial function). Tune hands searchers
    results flattened ("summary/status"); they are nested again here."""
    from ray.tune.utils.util import unflatten_dict

    result = unflatten_dict(result or {})
    keys = objective_keys(sweep)
    if result.get("final"):
        summary = result["summary"]
        record = {k: summary.get(k) for k in SUMMARY_FIELDS}
        record["objectives"] = [result[k] for k in keys] if all(k in result for k in keys) else None
    elif "progress" in result:
        progress = result["progress"]
        record = {"status": "stopped: asha", "metrics": progress.get("eval"),
                  "energy": {"joules": progress["energy_joules"], "source": progress["energy_source"]},
                  "time": {"steps": progress["step"]}, "objectives": [result[k] for k in keys]}
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
