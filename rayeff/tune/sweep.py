"""`rayeff tune SWEEP.yaml [--resume]`: a hyper-parameter sweep of one job over a search space, with Ray Tune and
Optuna (the sweep file's fields: `rayeff/tune/spec.py`).

Each trial is a Tune function that runs its job through a Ray Train `TorchTrainer` (`tune/trial.py`); trial
functions ask for a tenth of a CPU, so they never hold the CPUs their training workers need. Optuna (TPE, NSGA-II,
CMA-ES, or with `priors: auto` the transfer sampler; a grid sweep enqueues its grid) suggests the parameters; its
study lives in `optuna.db` (SQLite, which optuna-dashboard opens) and holds
every trial's record, so the study is the one account of what ran (`tune/searcher.py`). Energy and time limits are
kept by one actor that trials consult as they run (`tune/limits.py`).

Output folder (a local or shared path, or an s3:// / gs:// URI, where the study is worked on in a local copy that is
sent back after every trial): `optuna.db`, `sweep_spec.json` (the sweep as started, with its space and priors),
`trials/<id>/` (each trial's run), `sweep.json`, `best_job.yaml` (the best feasible trial's job, ready for
`rayeff run`), and for a multi-objective sweep `pareto.json` and `pareto.png`.

Interrupts: Ctrl-C or SIGTERM starts no new trial and makes each running trial stop after its current step with a
checkpoint (as `rayeff run` does); the sweep writes sweep.json and ends with exit 130. A second signal stops at once.

Resume: a killed or interrupted driver leaves the study with its finished trials recorded. `--resume` re-opens it,
re-queues the trials that were running, each continuing its run from its last checkpoint in its own folder, and runs
only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from rayeff.cluster.storage import Storage
from rayeff.errors import UserError
from rayeff.tune.searcher import PRIOR_TRIALS_ATTR, STUDY_FILE, save_study
from rayeff.tune.spec import ENERGY_METRIC, SweepSpec, load_sweep, metric_name

DRIVER_CPUS = 0.1
STARTED_FILE = "sweep_spec.json"
# Fields a resumed sweep may change: how many trials, how many at once, its limits.
RESUMABLE_CHANGES = {"num_trials", "max_concurrent", "time_limit_s", "energy"}
TUNE_OUTPUT_SWITCH = "RAY_AIR_NEW_OUTPUT"   # 0: Ray Tune 2.60's legacy reporter, silent at verbose=0


def _started(output: Storage, sweep: SweepSpec, resume: bool) -> dict | None:
    """The sweep as first started, when resuming; checks the folder is free otherwise."""
    has_study = output.exists(STUDY_FILE)
    if not resume:
        if has_study:
            raise UserError(f"output_dir: {output.location} already holds a sweep; pass --resume to continue it, or "
                            "choose another output_dir")
        return None
    if not has_study or not output.exists(STARTED_FILE):
        raise UserError(f"output_dir: {output.location} holds no sweep to resume; run without --resume to start one")
    started = json.loads(output.read_text(STARTED_FILE))
    before, now = started["sweep"], sweep.model_dump(mode="json")
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and now[k] != before.get(k, _default_dump(k)))
    if changed:
        raise UserError(f"{', '.join(changed)}: changed since the sweep in {output.location} started; resume with "
                        "the original values or choose another output_dir")
    return started


def _default_dump(field: str):
    """A sweep field's default as sweep_spec.json holds it: what a sweep started before the field existed had."""
    default = SweepSpec.model_fields[field].get_default(call_default_factory=True)
    return default.model_dump(mode="json") if hasattr(default, "model_dump") else default


def _study_file(output: Storage, resume: bool) -> Path:
    """The study's SQLite file: in the output folder, or, for an object store (SQLite needs a filesystem), a local
    working copy that --resume fetches and `save_study` sends back after every trial and at the end."""
    if output.local:
        return Path(output.root) / STUDY_FILE
    local = Path(tempfile.mkdtemp(prefix="rayeff-study-")) / STUDY_FILE
    if resume:
        output.download(STUDY_FILE, local)
    return local


def _descriptors(job) -> dict:
    from rayeff.data.task import check_data
    from rayeff.data.tokenized import load_train_and_dev, scoring_of
    from rayeff.models import load_tokenizer, resolve_model
    from rayeff.tune.priors import describe_setting

    check_data(job.data)
    source = resolve_model(job.model.name)
    try:   # also fills the tokenised cache that every trial then reads
        train, _ = load_train_and_dev(job.data, load_tokenizer(source), job.training.max_seq_length,
                                      scoring_of(job.data, source))
    except ValueError as err:
        raise UserError(f"data: {err}") from None
    return describe_setting(job, len(train))


def enqueue_grid(study, sweep: SweepSpec, space) -> None:
    """A grid sweep's points, queued in the study in their seeded order; a point the study already has (queued,
    running or done) is not queued again, so a resume queues only what a killed driver had not. Values take the
    field's type, as the study stores them (a float field's 2 is 2.0), or a resume would not recognise them."""
    def typed(key: str, value):
        kind = space.params[key].type
        return float(value) if kind == "float" else int(value) if kind == "int" else value

    for point in sweep.searcher.grid_points():
        study.enqueue_trial({k: typed(k, v) for k, v in point.items()}, skip_if_exists=True)


def _requeue_interrupted(study) -> list[int]:
    """Trials a killed or interrupted driver left RUNNING. One whose record was written before the kill is told as
    recorded; the others are failed and queued again with their parameters and their folder, so that each
    continues its run from its last checkpoint (from the start if it had none)."""
    import optuna

    from rayeff.tune.searcher import CONTINUES_ATTR, RECORD_ATTR, TRIAL_ID_ATTR, outcome

    requeued = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if RECORD_ATTR in t.user_attrs:
            state, values = outcome(t.user_attrs[RECORD_ATTR])
            study.tell(t.number, values, state=state)
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        attrs = {k: v for k, v in t.user_attrs.items() if k == "prior"}
        folder = t.user_attrs.get(CONTINUES_ATTR) or t.user_attrs.get(TRIAL_ID_ATTR)
        if folder:
            attrs[CONTINUES_ATTR] = folder
        study.enqueue_trial(t.params, user_attrs=attrs)
        requeued.append(t.number)
    return requeued


def run_sweep(sweep_file: str, overrides: list[str] = (), data_dir: str | None = None,
              address: str | None = None, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or with `resume`, continue) the sweep; `show_progress`: the live table of trials (tune/display.py)."""
    from rayeff.cluster.storage import output_lock
    from rayeff.train.preflight import check_sweep_inputs

    sweep, job, space = load_sweep(sweep_file, overrides, data_dir)
    output = Storage(sweep.output_dir)
    _started(output, sweep, resume)
    check_sweep_inputs(sweep, job, address)   # before anything is written or Ray starts
    job.data.resolve_paths()
    with output_lock(sweep.output_dir, "sweep"):
        return _run_sweep_locked(sweep, job, space, output, address, resume, show_progress)


def _run_sweep_locked(sweep: SweepSpec, job, space, output: Storage, address: str | None, resume: bool,
                      show_progress: bool) -> dict:
    import optuna
    import ray

    from rayeff.cluster.connect import init_ray
    from rayeff.cluster.storage import check_shared
    from rayeff.tune.limits import SweepLimits
    from rayeff.tune.priors import PriorStore, nearest_sweeps
    from rayeff.tune.results import study_records
    from rayeff.tune.searcher import STUDY_NAME
    from rayeff.tune.space import SearchSpace

    started = _started(output, sweep, resume)   # again, now that the folder is this sweep's
    if started is None:
        descriptors, priors = _descriptors(job), None
        store = PriorStore(sweep.priors.store)
        if sweep.priors.use == "auto":
            chosen = nearest_sweeps(store, descriptors, sweep.priors.max_sweeps) if store.path.is_file() else []
            priors = {"store": str(store.path), "method": sweep.priors.method,
                      "sweeps": [{"id": e["id"], "name": e["name"], "distance": round(d, 4),
                                  "task": e["descriptors"]["task"]} for d, e in chosen],
                      "sources": [e for _, e in chosen]}   # kept whole: a resume learns from the same trials
            if not chosen:
                priors["note"] = "no stored sweep of this method: the sampler has no source and works as plain BO"
        started = {"sweep": sweep.model_dump(mode="json"), "space": space.model_dump(mode="json"),
                   "descriptors": descriptors, "priors": priors}
        output.make()
        output.write_json(STARTED_FILE, started)
    else:
        space = SearchSpace.model_validate(started["space"])

    per_trial = job.scaling.num_workers * job.scaling.cpus_per_worker + DRIVER_CPUS
    init_ray(address, sweep.max_concurrent * per_trial)
    check_shared(output.location)
    study_file = _study_file(output, resume)
    storage_url = f"sqlite:///{study_file}"
    study = optuna.create_study(storage=storage_url, study_name=STUDY_NAME, load_if_exists=True,
                                directions=["maximize" if o.mode == "max" else "minimize" for o in sweep.objectives])
    if sweep.searcher.grid is not None:
        enqueue_grid(study, sweep, space)
    requeued = _requeue_interrupted(study) if resume else []
    save_study(output.location, str(study_file))
    done = study_records(study)
    # (a configuration the memory constraint kept from starting is no finished trial of the budget's mean)
    earlier_j = [(r.get("energy") or {}).get("joules", 0.0) for r in done if "planned_memory_per_worker_bytes" not in r]
    limits = ray.remote(num_cpus=0)(SweepLimits).remote(sweep.energy.sweep_budget_j, sweep.time_limit_s, earlier_j)
    sweep, parent = with_parent_run(sweep, output)
    interrupted = False
    if sweep.num_trials > len(done):
        sources = _prior_sources(started["priors"])
        interrupted = _run_trials(sweep, job, space, output, study_file, limits, len(done), sources, show_progress)
    report = write_results(sweep, job, output, started, optuna.load_study(study_name=STUDY_NAME, storage=storage_url),
                           ray.get(limits.why_stopped.remote()), requeued, interrupted)
    if parent is not None:
        parent.finish_sweep(report)
    save_study(output.location, str(study_file))
    if not interrupted:   # an unfinished sweep is no prior yet (--resume finishes it, and adds it then)
        PriorStore(sweep.priors.store).add(output.location, started["descriptors"],
                                           [o.model_dump() for o in sweep.objectives], started["space"],
                                           report["trials"])
    return report


def _prior_sources(priors: dict | None) -> list | None:
    """The transfer sampler's sources: the stored sweeps as they were when this sweep started (sweep_spec.json
    keeps them, so a resume learns from the same trials even if the store has changed since)."""
    from rayeff.tune.priors import source_task

    return None if priors is None else [source_task(e) for e in priors["sources"]]


def with_parent_run(sweep: SweepSpec, output: Storage):
    """With `tracking.mlflow`: the sweep's parent MLflow run (the same one again on --resume), and the sweep with
    the store as a URI and the parent's id, which its trials nest under. Without, or if MLflow cannot be reached
    (one warning line): the sweep unchanged, and None."""
    from rayeff.tracking import FAILED, SweepRun, guarded, mlflow_uri

    if not sweep.tracking.mlflow:
        return sweep, None
    uri = mlflow_uri(sweep.tracking, output.location)
    parent = guarded(SweepRun.open, uri, sweep.tracking.experiment, output.location, name=f"MLflow at {uri}")
    if parent is FAILED:
        return sweep.model_copy(update={"tracking": sweep.tracking.model_copy(update={"mlflow": None})}), None
    parent.log_settings(sweep.model_dump(mode="json", exclude={"tracking"}))
    tracking = sweep.tracking.model_copy(update={"mlflow": uri, "parent_run_id": parent.run_id})
    return sweep.model_copy(update={"tracking": tracking}), parent


def _run_trials(sweep: SweepSpec, job, space, output: Storage, study_file: Path, limits, done: int,
                sources: list | None, show_progress: bool = True) -> bool:
    """Run the sweep's remaining trials through Ray Tune; whether the user interrupted it (Ctrl-C, SIGTERM)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from ray.util.queue import Queue

    from rayeff.train.interrupts import StopRequest
    from rayeff.tune.searcher import SweepSearch
    from rayeff.tune.space import optuna_distributions
    from rayeff.tune.trial import objective_keys, run_trial

    stop_request = StopRequest.remote()
    queue = Queue(maxsize=1000, actor_options={"num_cpus": 0}) if show_progress else None
    searcher = SweepSearch(sweep, optuna_distributions(space), output.location, str(study_file), limits, done,
                           sources, stop_request, base_job=job.model_dump(mode="json"))
    scheduler = None
    if sweep.scheduler is not None:   # rungs count reports; a trial that runs out of steps simply ends (no max_t)
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=objective_keys(sweep)[0],
                                  mode=sweep.objectives[0].mode, grace_period=sweep.scheduler.grace_period,
                                  reduction_factor=sweep.scheduler.reduction_factor, max_t=10**6)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=job.model_dump(mode="json"), sweep=sweep.model_dump(mode="json"),
                             sweep_dir=output.location, limits=limits, stop_request=stop_request,
                             progress_queue=queue), {"CPU": DRIVER_CPUS})
    attempt = sum(name.startswith("tune-") for name in output.names())   # one Tune experiment per invocation
    tuner = tune.Tuner(trainable,
                       tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, sweep.max_concurrent),
                                                   scheduler=scheduler, num_samples=sweep.num_trials - done),
                       run_config=tune.RunConfig(name=f"tune-{attempt}", storage_path=output.location, verbose=0))
    # Tune's output (its experiment box and trial tables) gives way to rayeff's display: its legacy reporter, which
    # verbose=0 silences, is chosen by TUNE_OUTPUT_SWITCH. (Tune's own Ctrl-C handler, which would stop trials
    # mid-step, is not installed: fit() runs outside the main thread, where rayeff's handler is.)
    before = os.environ.get(TUNE_OUTPUT_SWITCH)
    os.environ[TUNE_OUTPUT_SWITCH] = "0"
    try:
        _fit_with_display(tuner, stop_request, queue, sweep, job, study_file)
    finally:
        if before is None:
            os.environ.pop(TUNE_OUTPUT_SWITCH, None)
        else:
            os.environ[TUNE_OUTPUT_SWITCH] = before
        if queue is not None:
            queue.shutdown()
    return ray.get(stop_request.is_requested.remote())


def _fit_with_display(tuner, stop_request, queue, sweep: SweepSpec, job, study_file: Path) -> None:
    """`tuner.fit()` in a thread while this (main) thread keeps the signal handlers and the display: each trial's
    progress from the queue as it comes, the study's records of ended trials every few seconds. A display that
    fails is given up (the sweep goes on); leaving early (a second Ctrl-C) asks the trials to stop first."""
    import threading
    import time

    import optuna

    from rayeff.train.interrupts import stop_on_signal
    from rayeff.tune.display import SweepDisplay
    from rayeff.tune.results import study_records
    from rayeff.tune.searcher import STUDY_NAME

    outcome: dict = {}

    def fit() -> None:
        try:
            tuner.fit()
        except BaseException as err:  # handed to this thread, which re-raises it
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    display = None if queue is None else SweepDisplay(
        sweep, [None if o.metric == ENERGY_METRIC else metric_name(o, job) for o in sweep.objectives])
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_file}")
    read_at = 0.0

    def show() -> None:
        nonlocal display, read_at
        try:
            while not queue.empty():
                display.progress(queue.get_nowait())
            if time.monotonic() - read_at > 3 or not thread.is_alive():
                display.records(study_records(optuna.load_study(study_name=STUDY_NAME, storage=storage)))
                read_at = time.monotonic()
        except Exception as err:  # noqa: BLE001  (the display must never end the sweep)
            print(f"rayeff: the live table stopped ({type(err).__name__}: {err}); the sweep goes on", file=sys.stderr)
            display = None

    try:
        with display or contextlib.nullcontext(), stop_on_signal(stop_request):
            while thread.is_alive():
                thread.join(timeout=0.5)
                if display is not None:
                    show()
            if display is not None:
                show()   # the last progress and records, once the experiment has ended
    except BaseException:
        stop_request.request.remote()   # leaving at once (a second Ctrl-C): the trials still stop at a step
        raise
    if "error" in outcome:
        raise outcome["error"]


def trial_energy_label(trials: list[dict], job) -> str:
    """The energy axis's label for these trials: their sources, and the formula where any is an estimate."""
    from rayeff.measure.energy import energy_axis_label

    return energy_axis_label([(t.get("energy") or {}).get("source") for t in trials], job.energy.watts_per_cpu)


def objective_labels(sweep: SweepSpec, job, energy: str) -> list[str]:
    """Each objective's name for pareto.json and the Pareto plot's axes; energy's (`energy`) says how its trials
    measured it ("energy (J, estimate: CPU-s x 10 W), min")."""
    return [f"{energy if o.metric == ENERGY_METRIC else 'dev ' + metric_name(o, job)}, {o.mode}"
            for o in sweep.objectives]


def write_results(sweep: SweepSpec, job, output: Storage, started: dict, study, stopped_by: str | None,
                  requeued: list[int], interrupted: bool = False) -> dict:
    from rayeff.config import validate_job
    from rayeff.tune.results import best_trial, pareto_front, study_records
    from rayeff.tune.trial import job_with_params

    trials = study_records(study)
    best = best_trial(study, trials, sweep)
    energy_label = trial_energy_label(trials, job)
    labels = objective_labels(sweep, job, energy_label)
    total = sum((t.get("energy") or {}).get("joules", 0.0) for t in trials)
    budget = sweep.energy.sweep_budget_j
    priors = started["priors"]
    if priors is not None:   # what the sources weighed when the last trial was proposed (each trial has its own)
        priors = {**{k: v for k, v in priors.items() if k != "sources"},
                  "trials_used": study.user_attrs.get(PRIOR_TRIALS_ATTR),
                  "last_weights": next((t["prior"] for t in reversed(trials) if t["prior"]), None)}
    report = {"sweep": sweep.model_dump(mode="json"), "search_space": started["space"],
              "descriptors": started["descriptors"], "priors": priors, "objective_labels": labels,
              "trials": trials, "best": best,
              "energy": {"total_j": total, "sweep_budget_j": budget,
                         "overshoot_j": max(total - budget, 0.0) if budget is not None else None,
                         "stopped_by": stopped_by,
                         "sources": sorted({(t.get("energy") or {}).get("source") for t in trials} - {None}),
                         "axis_label": energy_label},
              "requeued_after_interruption": requeued, "interrupted": interrupted,
              "output_dir": output.location,
              "study": output.child(STUDY_FILE),
              "dashboard": f"optuna-dashboard sqlite:///{output.child(STUDY_FILE)}" if output.local else
              f"copy {output.child(STUDY_FILE)} here, then: optuna-dashboard sqlite:///{STUDY_FILE}"}
    if len(sweep.objectives) > 1:
        front = pareto_front(study, trials, [o.mode for o in sweep.objectives])
        report["pareto_front"] = [t["number"] for t in front]
        output.write_json("pareto.json", {"objectives": labels, "front": front})
        with tempfile.TemporaryDirectory() as tmp:   # the trials and front as `rayeff report` draws them
            from rayeff.report.figures import trial_scatter
            from rayeff.report.page import save_png

            save_png(trial_scatter(trials, report["pareto_front"], labels), Path(tmp) / "pareto.png")
            output.upload(Path(tmp) / "pareto.png", "pareto.png")
    if best is not None:
        best_job = validate_job(job_with_params(job.model_dump(mode="json"), best["params"], output.child("best")))
        output.write_text("best_job.yaml", yaml.safe_dump(best_job.model_dump(mode="json"), sort_keys=False))
        report["best_job"] = output.child("best_job.yaml")
    output.write_json("sweep.json", report)
    return report
