"""Ray Tune's `OptunaSearch`, made to keep what a sweep needs in the Optuna study itself.

At each trial's completion the searcher stores the trial's record (params, status, metrics, energy, memory, time)
as an Optuna user attribute and marks its budgets as Optuna constraints (`trial.set_constraint`, feasible when every
value is <= 0), which TPE and NSGA-II honour; Ray's own `on_trial_complete` drops constraints, so this one tells the
study itself. CMA-ES ignores constraints, so for it an infeasible trial is told as failed instead. The study
(SQLite) is thereby the sweep's single record: `sweep.json` is written from it, and a resumed sweep reads it to know
what is done.

Before a trial starts, the sweep's limits actor is asked whether the sweep may start another (energy, time). After
each completion, a sweep whose output is in an object store sends its study copy back (`save_study`).
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import ray
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from rayeff.cluster.storage import Storage
from rayeff.tune.spec import SearcherSpec, SweepSpec
from rayeff.tune.trial import objective_keys, trial_record

RECORD_ATTR = "rayeff"
STUDY_NAME = "rayeff"
STUDY_FILE = "optuna.db"


def save_study(output_location: str, study_file: str) -> None:
    """Send an object-store sweep's study copy back (its finished trials must outlive this driver)."""
    output = Storage(output_location)
    if not output.local:
        output.upload(Path(study_file), STUDY_FILE)


def make_sampler(spec: SearcherSpec, trials_done: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler, seeded by the sweep's seed plus the trials already done: a resumed sweep must not draw the
    random start-up points of its first invocation again."""
    seed = spec.seed + trials_done
    if spec.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if spec.kind == "cmaes":   # categorical parameters fall back to independent sampling
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def outcome(record: dict, error: bool = False) -> tuple[optuna.trial.TrialState, float | list[float] | None]:
    """The Optuna state and value(s) a trial's record tells the study: COMPLETE with finite objectives, PRUNED
    when ASHA stopped it, FAIL for errors and non-finite values."""
    values = record["objectives"]
    if error or record["status"].startswith("error") or (values is not None and
                                                         not all(math.isfinite(v) for v in values)):
        return optuna.trial.TrialState.FAIL, None
    if values is None or record["status"] == "stopped: asha":
        return optuna.trial.TrialState.PRUNED, None
    return optuna.trial.TrialState.COMPLETE, values if len(values) > 1 else values[0]


class SweepSearch(OptunaSearch):
    def __init__(self, sweep: SweepSpec, space: dict, output_location: str, study_file: str, limits=None,
                 trials_done: int = 0):
        keys = objective_keys(sweep)
        modes = [o.mode for o in sweep.objectives]
        super().__init__(space=space, metric=keys if len(keys) > 1 else keys[0],
                         mode=modes if len(modes) > 1 else modes[0], sampler=make_sampler(sweep.searcher, trials_done),
                         study_name=STUDY_NAME, storage=optuna.storages.RDBStorage(f"sqlite:///{study_file}"))
        self._output_location, self._study_file = output_location, study_file
        self._sweep_dump = sweep.model_dump(mode="json")
        self._limits = limits
        self._ignores_constraints = sweep.searcher.kind == "cmaes"   # Optuna's CmaEsSampler does not read them

    def suggest(self, trial_id: str):
        if self._limits is not None and trial_id not in self._ot_trials:
            reason = ray.get(self._limits.start.remote(trial_id))
            if reason is not None:
                return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        record = trial_record(trial_id, dict(ot_trial.params), result, SweepSpec.model_validate(self._sweep_dump))
        ot_trial.set_user_attr(RECORD_ATTR, record)
        for key, value in record["constraints"].items():
            ot_trial.set_constraint(key, value)
        state, values = outcome(record, error)
        if self._ignores_constraints and not record["feasible"] and state == optuna.trial.TrialState.COMPLETE:
            state, values = optuna.trial.TrialState.FAIL, None   # keep an over-budget trial out of CMA-ES's model
        self._ot_study.tell(ot_trial, values, state=state)
        self._completed_trials.add(trial_id)
        save_study(self._output_location, self._study_file)
        if self._limits is not None:
            self._limits.finish.remote(trial_id, (record.get("energy") or {}).get("joules"))
