"""`rayeff bench priors`: how many trials a sweep needs to reach a target dev metric, with transferred priors and
without, on tasks the priors were not built from.

    rayeff bench priors --sweep jobs/sweep-bench-priors.yaml --sources sst2 --targets stsb --seeds 0,1,2 \
        --output priors.json --data-dir ../shared/data/glue

1. One sweep per source task (no priors) fills a fresh prior store.
2. Per target task and sampler seed, the same sweep runs twice, with `priors: auto` and without, each on its own
   copy of the source-only store (so target sweeps never become priors of each other).
3. The target is `target_fraction` of the best dev metric seen across all runs on that task; a run's count is the
   number of the first trial that reaches it (a run that never does counts as num_trials + 1, and says so).
   The ratio is the median count with priors over the median without.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from rayeff.errors import UserError
from rayeff.train.runner import write_json_atomic
from rayeff.tune.spec import load_sweep
from rayeff.tune.sweep import run_sweep


def trials_to_target(objectives: list[float | None], target: float) -> int | None:
    for i, value in enumerate(objectives, start=1):
        if value is not None and value >= target:
            return i
    return None


def bench_priors(sweep_file: str, sources: list[str], targets: list[str], seeds: list[int], output: str,
                 runs_dir: str | None = None, data_dir: str | None = None, address: str | None = None,
                 target_fraction: float = 0.99) -> dict:
    runs = Path(runs_dir) if runs_dir else Path(output).with_suffix("")
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

    for task in sources:
        sweep(task, f"source-{task}", "priors.use=none", f"priors.store={store}")
    report = {"sweep": sweep_file, "sources": sources, "targets": targets, "seeds": seeds,
              "target_fraction": target_fraction, "tasks": {}}
    with_all, without_all = [], []
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
                                  "from_priors": [t["prior"] is not None for t in result["trials"]],
                                  "priors_used": (result["priors"] or {}).get("sweeps")})
        best = max(v for r in task_runs for v in r["objectives"] if v is not None)
        target = target_fraction * best
        counts = {"auto": [], "none": []}
        for r in task_runs:
            r["trials_to_target"] = trials_to_target(r["objectives"], target)
            counts[r["priors"]].append(r["trials_to_target"] or r["num_trials"] + 1)
        report["tasks"][task] = {"best": best, "target": target, "runs": task_runs,
                                 "median_with_priors": statistics.median(counts["auto"]),
                                 "median_without_priors": statistics.median(counts["none"]),
                                 "ratio": statistics.median(counts["auto"]) / statistics.median(counts["none"])}
        with_all += counts["auto"]
        without_all += counts["none"]
    report["median_with_priors"] = statistics.median(with_all)
    report["median_without_priors"] = statistics.median(without_all)
    report["ratio"] = report["median_with_priors"] / report["median_without_priors"]
    report["note"] = "a run that never reached the target counts as num_trials + 1"
    write_json_atomic(Path(output), report)
    return report
