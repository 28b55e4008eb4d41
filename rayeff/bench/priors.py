"""`rayeff bench priors`: how many trials a sweep needs to reach a target dev metric, with transferred priors (the
transfer sampler, `priors: auto`) and without (TPE), on tasks the priors were not built from: the live check,
real sweeps end to end. `--table` replays sweeps from measured tables instead (`rayeff/bench/replay.py`).

    rayeff bench priors --sweep jobs/sweep-bench-priors.yaml --sources sst2 --targets stsb --seeds 0,1,2 \
        --output priors.json --data-dir ../shared/data/glue

1. One sweep per source task (no priors) fills a fresh prior store. Source sweeps use sampler seeds that no target
   run uses (SOURCE_SEED + i): with the same seed and space, TPE's random start-up would otherwise draw the source's
   very configurations in the runs without priors.
2. Per target task and sampler seed, the same sweep runs twice, with `priors: auto` and without, each on its own
   copy of the source-only store (so target sweeps never become priors of each other).
3. The target is `target_fraction` of the best dev metric seen across all runs on that task; a run's count is the
   number of the first trial that reaches it (a run that never does counts as num_trials + 1, and says so).
   The ratio is the median count with priors over the median without. The same runs are also scored at the
   lower fractions in EXTRA_FRACTIONS, since one lucky trial can put 99% of the best out of reach of every run.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from rayeff.checks import check_output_file, check_output_location
from rayeff.cluster.storage import write_json_atomic
from rayeff.errors import UserError
from rayeff.tune.spec import MAX_SEARCHER_SEED, load_sweep
from rayeff.tune.sweep import run_sweep

SOURCE_SEED = 1000
EXTRA_FRACTIONS = (0.95, 0.9)


def trials_to_target(objectives: list[float | None], target: float) -> int | None:
    for i, value in enumerate(objectives, start=1):
        if value is not None and value >= target:
            return i
    return None


def medians(runs: list[dict], counts: list[int | None]) -> dict:
    """Median trials to the target with and without priors (a run that never reached it: num_trials + 1)."""
    censored = {use: [c or r["num_trials"] + 1 for r, c in zip(runs, counts) if r["priors"] == use]
                for use in ("auto", "none")}
    with_priors, without = statistics.median(censored["auto"]), statistics.median(censored["none"])
    return {"median_with_priors": with_priors, "median_without_priors": without, "ratio": with_priors / without}


def bench_priors(sweep_file: str, sources: list[str], targets: list[str], seeds: list[int], output: str,
                 runs_dir: str | None = None, data_dir: str | None = None, address: str | None = None,
                 target_fraction: float = 0.99, overwrite: bool = False) -> dict:
    for flag, values in (("--sources", sources), ("--targets", targets), ("--seeds", seeds)):
        if not values:
            raise UserError(f"{flag}: give at least one value (comma-separated)")
    bad = [s for s in seeds if not 0 <= s < MAX_SEARCHER_SEED]
    if bad:
        raise UserError(f"--seeds: {bad[0]} is not a sampler seed; use integers from 0 to {MAX_SEARCHER_SEED - 1}")
    if not 0 < target_fraction <= 1:
        raise UserError(f"--target-fraction: {target_fraction} is not in (0, 1]; e.g. 0.99 of the best dev metric")
    output_path = check_output_file(output, "--output", overwrite)
    runs = Path(runs_dir) if runs_dir else output_path.with_suffix("")
    check_output_location(str(runs), "--runs-dir")
    store = runs / "priors.db"
    if set(sources) & set(targets):
        raise UserError(f"--targets: {sorted(set(sources) & set(targets))} are also sources; priors must come from "
                        "other tasks")
    for task in sources + targets:   # every sweep is checked before any runs
        sweep, _, _ = load_sweep(sweep_file, [f"overrides.data.task={task}"], data_dir)
        if len(sweep.objectives) > 1 or sweep.objectives[0].mode != "max":
            raise UserError(f"{sweep_file}: bench priors needs one objective to maximise (a dev metric)")
    if store.exists():
        raise UserError(f"--runs-dir: {runs} already holds a benchmark; choose another")

    def sweep(task: str, name: str, *settings: str) -> dict:
        return run_sweep(sweep_file, [f"overrides.data.task={task}", f"output_dir={runs / name}", *settings],
                         data_dir=data_dir, address=address)

    for i, task in enumerate(sources):
        sweep(task, f"source-{task}", "priors.use=none", f"priors.store={store}", f"searcher.seed={SOURCE_SEED + i}")
    report = {"sweep": sweep_file, "sources": sources, "targets": targets, "seeds": seeds,
              "target_fraction": target_fraction, "tasks": {}}
    measured = []
    for task in targets:
        task_runs = []
        for seed in seeds:
            for use in ("auto", "none"):
                copy = runs / f"store-{task}-{seed}-{use}.db"
                shutil.copyfile(store, copy)
                result = sweep(task, f"{task}-seed{seed}-priors-{use}", f"priors.use={use}", f"priors.store={copy}",
                               f"searcher.seed={seed}")
                task_runs.append({"seed": seed, "priors": use, "num_trials": len(result["trials"]),
                                  "objectives": [t["objectives"][0] if t["feasible"] else None
                                                 for t in result["trials"]],
                                  "source_weights": [t["prior"] for t in result["trials"]],
                                  "priors_used": (result["priors"] or {}).get("sweeps")})
        best = max(v for r in task_runs for v in r["objectives"] if v is not None)
        for r in task_runs:
            r["trials_to_target"] = trials_to_target(r["objectives"], target_fraction * best)
        others = {str(f): {"target": f * best, **medians(task_runs, [trials_to_target(r["objectives"], f * best)
                                                                     for r in task_runs])}
                  for f in EXTRA_FRACTIONS}
        report["tasks"][task] = {"best": best, "target": target_fraction * best, "runs": task_runs,
                                 **medians(task_runs, [r["trials_to_target"] for r in task_runs]),
                                 "at_other_fractions": others}
        measured += task_runs
    report.update(medians(measured, [r["trials_to_target"] for r in measured]))
    report["note"] = "a run that never reached the target counts as num_trials + 1"
    write_json_atomic(output_path, report)
    return report
