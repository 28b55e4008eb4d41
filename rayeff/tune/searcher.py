"""The sweep's Ray Tune searcher: Optuna suggests each trial's parameters and the Optuna study keeps what a sweep
needs.

`SweepSearch` is a plain `ray.tune.search.Searcher` that drives one Optuna study through Optuna's public ask/tell
interface (`study.ask(distributions)`, `study.tell(trial, values, state=...)`); Tune hands it trial ids and results.
The call order is Tune's: `suggest(id)` once per trial, `on_trial_result(id, result)` for each report while the
trial runs, `on_trial_complete(id, result, error)` once at its end (a repeated completion is ignored).

At each trial's completion the searcher stores the trial's record (params, status, metrics, energy, memory, time)
as an Optuna user attribute and marks its budgets as Optuna constraints (`trial.set_constraint`, feasible when every
value is <= 0), which TPE and NSGA-II honour. CMA-ES ignores constraints, so for it an infeasible trial is told as
failed instead. Intermediate reports (single objective) are Optuna intermediate values, so a trial that ASHA stopped
is told as pruned with its last reported value. The study (SQLite) is thereby the sweep's single record:
`sweep.json` is written from it, and a resumed sweep reads it to know what is done; Tune's own searcher checkpoint
is therefore not written (`rayeff tune --resume` resumes a sweep, not `Tuner.restore`).

Before a trial starts, the sweep's limits actor is asked whether the sweep may start another (energy, time), and
the sweep's stop request whether the user interrupted it. After each completion, a sweep whose output is in an
object store sends its study copy back (`save_study`).

An interrupted trial (Ctrl-C: it checkpointed after its current step) is not told: it stays RUNNING in the study, as
the trials of a killed driver do, and `--resume` queues it again to continue from its checkpoint in its own folder
(user attribute `continues`: the Tune trial id that names the folder; Tune hands it to the trial as
`config["rayeff.continues"]`).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import optuna
import ray
from ray.tune.search import Searcher

from rayeff.cluster.storage import Storage
from rayeff.tune.spec import SearcherSpec, SweepSpec
from rayeff.train.state import INTERRUPTED
from rayeff.tune.trial import CONTINUES_KEY, objective_keys, planned_infeasible, trial_record

RECORD_ATTR = "rayeff"
PRIOR_TRIALS_ATTR = "prior_source_trials"   # how many of each source's trials fit the sweep's space
STUDY_NAME = "rayeff"
STUDY_FILE = "optuna.db"
TRAINING_ITERATION = "training_iteration"   # Tune's count of a trial's reports, the step of intermediate values
TRIAL_ID_ATTR = "tune_trial_id"             # the Tune trial an Optuna trial was asked for
CONTINUES_ATTR = "continues"                # a re-queued trial's folder: the Tune trial id it was first run as


def save_study(output_location: str, study_file: str) -> None:
    """Send an object-store sweep's study copy back (its finished trials must outlive this driver)."""
    output = Storage(output_location)
    if not output.local:
        output.upload(Path(study_file), STUDY_FILE)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, as Ray Tune can save it. Tune pickles the searcher, and so its sampler, when it builds the
    Tuner; Optuna 5.1.0's genetic samplers guard their generation cache with a `threading.Lock`, which pickle refuses
    ("cannot pickle '_thread.lock' object": every NSGA-II sweep failed at its start). A copy gets a lock of its own.
    Written against Optuna 5.1.0; on 5.0, which has no such lock, it is Optuna's sampler unchanged."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_thread_lock" in state:
            self._thread_lock = threading.Lock()


def make_sampler(spec: SearcherSpec, trials_done: int = 0, priors: tuple[str, list, dict] | None = None
                 ) -> optuna.samplers.BaseSampler:
    """The sampler, seeded by the sweep's seed plus the trials already done: a resumed sweep must not draw the
    random start-up points of its first invocation again. With priors (method, source tasks, the sweep's
    distributions): the transfer sampler in TPE's place."""
    seed = spec.seed + trials_done
    if priors is not None:
        from rayeff.tune.transfer import TransferSampler

        method, sources, space = priors
        return TransferSampler(sources, seed=seed, method=method, search_space=space)
    if spec.kind == "nsga2":
        return PicklableNSGAIISampler(seed=seed)
    if spec.kind == "cmaes":   # categorical parameters fall back to independent sampling
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if spec.kind == "grid":   # the sweep enqueues every grid point; nothing is left to sample
        return optuna.samplers.RandomSampler(seed=seed)
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


class SweepSearch(Searcher):
    """Suggests from, and records into, the sweep's study `STUDY_NAME` in the SQLite file `study_file` (created by
    the sweep driver with its enqueued prior trials, which `study.ask` hands out first).

    `space` maps each dotted job field to its `optuna.distributions` distribution (`space.optuna_distributions`);
    suggestions use the same keys. `limits` is the sweep's `SweepLimits` actor, or None for no limits. `sources`
    (the stored sweeps' `SourceTask`s, with `priors: auto`) make the sampler the transfer sampler; each trial's user
    attribute `prior` then holds the sources' weights it was proposed with."""

    def __init__(self, sweep: SweepSpec, space: dict, output_location: str, study_file: str, limits=None,
                 trials_done: int = 0, sources: list | None = None, stop_request=None, base_job: dict | None = None):
        keys = objective_keys(sweep)
        modes = [o.mode for o in sweep.objectives]
        super().__init__(metric=keys if len(keys) > 1 else keys[0], mode=modes if len(modes) > 1 else modes[0])
        self._space = dict(space)
        self._study = optuna.create_study(
            storage=optuna.storages.RDBStorage(f"sqlite:///{study_file}"), study_name=STUDY_NAME, load_if_exists=True,
            directions=["maximize" if m == "max" else "minimize" for m in modes],
            sampler=make_sampler(sweep.searcher, trials_done,
                                 None if sources is None else (sweep.priors.method, sources, dict(space))),
            pruner=optuna.pruners.NopPruner())   # ASHA, in Tune, stops trials; the study only records them
        self._trials: dict[str, optuna.Trial] = {}   # Tune's trial id -> the Optuna trial asked for it
        self._told: set[str] = set()
        self._output_location, self._study_file = output_location, study_file
        self._sweep_dump = sweep.model_dump(mode="json")
        self._limits, self._stop_request = limits, stop_request
        self._ignores_constraints = sweep.searcher.kind == "cmaes"   # Optuna's CmaEsSampler does not read them
        self._base_job = base_job   # (for the memory constraint's plans)
        self._trials_left = sweep.num_trials - trials_done

    def suggest(self, trial_id: str) -> dict | str:
        if trial_id not in self._trials:
            if self._stop_request is not None and ray.get(self._stop_request.is_requested.remote()):
                return Searcher.FINISHED
            if self._limits is not None and ray.get(self._limits.start.remote(trial_id)) is not None:
                return Searcher.FINISHED
            trial = self._ask_one_that_fits()
            if trial is None:
                return Searcher.FINISHED
            trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
            weights_of = getattr(self._study.sampler, "weights_of", None)   # the transfer sampler's
            if weights_of is not None and weights_of(trial.number) is not None:   # (not for a re-queued trial)
                trial.set_user_attr("prior", weights_of(trial.number))
                self._study.set_user_attr(PRIOR_TRIALS_ATTR, self._study.sampler.source_trials_used)
            self._trials[trial_id] = trial
        trial = self._trials[trial_id]
        continues = trial.user_attrs.get(CONTINUES_ATTR)
        return {**trial.params, **({CONTINUES_KEY: continues} if continues else {})}

    def _ask_one_that_fits(self) -> optuna.Trial | None:
        """The next configuration to start. One that the memory constraint rules out is recorded as infeasible
        (planned figure, constraint) and told as pruned without being started (TPE then steers away from it; the
        other samplers ignore pruned trials and may propose it again); it counts as one of the sweep's trials. None
        once the sweep has no trials left."""
        while self._trials_left > 0:
            self._trials_left -= 1
            trial = self._study.ask(self._space)
            record = None if self._base_job is None or CONTINUES_ATTR in trial.user_attrs else \
                planned_infeasible(self._base_job, dict(trial.params), SweepSpec.model_validate(self._sweep_dump))
            if record is None:
                return trial
            self._record(trial, record)
        return None

    def _record(self, trial: optuna.Trial, record: dict, error: bool = False) -> None:
        """Tell the study a trial's record: its constraints, the record itself, its state and values."""
        for key, value in record["constraints"].items():   # first: a recorded trial always has its constraints
            trial.set_constraint(key, value)
        trial.set_user_attr(RECORD_ATTR, record)
        state, values = outcome(record, error)
        if self._ignores_constraints and not record["feasible"] and state == optuna.trial.TrialState.COMPLETE:
            state, values = optuna.trial.TrialState.FAIL, None   # keep an over-budget trial out of CMA-ES's model
        self._study.tell(trial, values, state=state)
        save_study(self._output_location, self._study_file)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """A report while the trial runs: its objective becomes an Optuna intermediate value (single objective
        only; Optuna keeps none for several), which a pruned trial is then ranked by."""
        if isinstance(self.metric, list) or trial_id not in self._trials or trial_id in self._told:
            return
        if self.metric in result and TRAINING_ITERATION in result:
            self._trials[trial_id].report(result[self.metric], result[TRAINING_ITERATION])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._told or trial_id not in self._trials:
            return
        trial = self._trials[trial_id]
        record = trial_record(trial_id, dict(trial.params), result, SweepSpec.model_validate(self._sweep_dump))
        if record["status"] == INTERRUPTED:   # left RUNNING: --resume continues it from its checkpoint
            self._told.add(trial_id)
            return
        self._record(trial, record, error)
        self._told.add(trial_id)
        if self._limits is not None:
            self._limits.finish.remote(trial_id, (record.get("energy") or {}).get("joules"))

    def save(self, checkpoint_path: str) -> None:
        """Writes nothing: every finished trial is already in the study, which `rayeff tune --resume` reopens."""

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a sweep resumes from its Optuna study: run `rayeff tune SWEEP.yaml --resume`")
