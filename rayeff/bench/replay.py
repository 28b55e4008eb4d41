"""`rayeff bench priors --table FILE`: sweeps replayed from a table of measured configurations (`rayeff bench
table`), so that search strategies can be compared over many seeds at no training cost.

    rayeff bench priors --table benchmarks/issue-16/table-read.json --output priors-replay.json --seeds 30

Each task in turn is the target; the others are sources. For every seed, each source's earlier sweep is replayed
too (cold TPE, `--source-trials` trials, seeds no target run uses), and those studies are what the transfer
strategies learn from, as a user's earlier sweeps would be. Each strategy then asks for up to `--max-trials`
configurations on the target, each answered by the table's dev metric (a configuration whose trial failed counts
as the worst). Counted: the trials until one reaches the target's top 5% and top 1% of configurations; a run that
never does is censored at max_trials + 1 and counted as censored.

The replay space is the grid itself: a number's grid values become the integers 0..k-1 in order (a log-spaced grid
stays evenly spaced), choices stay choices. Strategies: random, cold_tpe (Optuna's TPE), the transfer sampler's
methods (transfer_ensemble, transfer_weighted, transfer_enqueue), its control without sources (transfer_none:
Bayesian optimisation on the target alone, which also never repeats a configuration, unlike TPE and random search:
the gap between it and cold_tpe is not transfer), and cmaes_warm (Optuna's CMA-ES warm-started with the sources'
trials, WS-CMA-ES; choices fall back to independent sampling).
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path
import numpy as np

from rayeff.checks import check_output_file
from rayeff.cluster.storage import write_json_atomic
from rayeff.errors import UserError

SOURCE_SEED = 10_000       # source replays use seeds no target replay uses
TOP_FRACTIONS = {"top5": 0.05, "top1": 0.01}
STRATEGIES = ("random", "cold_tpe", "transfer_none", "transfer_ensemble", "transfer_weighted", "transfer_enqueue",
              "cmaes_warm")


def load_table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--table: {path} not found; make one with `rayeff bench table SWEEP_DIR ...`")
    try:
        table = json.loads(p.read_text())
        grid, tasks = table["grid"], table["tasks"]
        for name, task in tasks.items():
            if task["mode"] not in ("max", "min"):
                raise ValueError(f"task {name}: mode {task['mode']!r}")
            for c in task["configurations"]:
                _ = c["params"], c["dev"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--table: {path} is not a table from `rayeff bench table` ({type(err).__name__}: "
                        f"{err})") from None
    if len(tasks) < 2:
        raise UserError(f"--table: {path} has {len(tasks)} task; a replay needs a target and at least one source")
    for name, task in tasks.items():
        try:
            keys = {_key(grid, c["params"]) for c in task["configurations"]}
        except (KeyError, ValueError):
            raise UserError(f"--table: task {name} has a configuration outside the grid; rebuild the table with "
                            "`rayeff bench table`") from None
        if len(keys) < math.prod(len(v) for v in grid.values()):
            raise UserError(f"--table: task {name} lacks some of the grid's configurations; rebuild the table "
                            "from finished sweeps")
        if all(c["dev"] is None for c in task["configurations"]):
            raise UserError(f"--table: task {name} has no configuration with a dev metric")
    return table


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def replay_space(grid: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    return {k: IntDistribution(0, len(v) - 1) if _numeric(v) else CategoricalDistribution(list(v))
            for k, v in sorted(grid.items())}


def _key(grid: dict, params: dict) -> tuple:
    """A configuration's place in the grid, by field name: each number's index among the field's values in
    increasing order (so the replay's integer axis runs as the values do), or the choice itself."""
    return tuple(sorted(grid[k]).index(params[k]) if _numeric(grid[k]) else params[k] for k in sorted(grid))


def _lookup(grid: dict, replay_params: dict) -> tuple:
    return tuple(replay_params[k] for k in sorted(grid))


class TaskTable:
    """One task's dev metric per grid point, as a function of replay parameters, higher better."""

    def __init__(self, grid: dict, task: dict):
        sign = 1.0 if task["mode"] == "max" else -1.0
        measured = [sign * c["dev"] for c in task["configurations"] if c["dev"] is not None]
        worst = min(measured)
        self.values = {_key(grid, c["params"]): worst if c["dev"] is None else sign * c["dev"]
                       for c in task["configurations"]}
        ordered = sorted(self.values.values(), reverse=True)
        self.thresholds, self.top = {}, {}
        for name, fraction in TOP_FRACTIONS.items():
            k = max(math.ceil(fraction * len(ordered)), 1)
            threshold = ordered[k - 1]
            at_or_above = sum(v >= threshold for v in ordered)   # ties can widen the share
            self.thresholds[name] = threshold
            self.top[name] = {"k": k, "threshold": sign * threshold, "configurations_at_or_above": at_or_above,
                              "fraction_at_or_above": at_or_above / len(ordered)}
        self.grid = grid

    def __call__(self, replay_params: dict) -> float:
        return self.values[_lookup(self.grid, replay_params)]


def replay(sampler, table: TaskTable, space: dict, max_trials: int, stop_when_reached: bool = True):
    """An Optuna study (maximising) driven by `sampler` over the table; returns it and the trial numbers (1-based)
    at which each top fraction was first reached (None: not within max_trials)."""
    import optuna

    study = optuna.create_study(direction="maximize", sampler=sampler)
    reached: dict[str, int | None] = dict.fromkeys(TOP_FRACTIONS)
    for n in range(1, max_trials + 1):
        trial = study.ask(space)
        value = table(trial.params)
        study.tell(trial, value)
        for name, threshold in table.thresholds.items():
            if reached[name] is None and value >= threshold:
                reached[name] = n
        if stop_when_reached and all(v is not None for v in reached.values()):
            break
    return study, reached


def _strategy(name: str, seed: int, sources: list, space: dict):
    """The Optuna sampler a strategy replays with."""
    import optuna

    from rayeff.tune.transfer import TransferSampler

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cold_tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "transfer_none":   # the control: the ensemble's machinery without sources (BO on the target alone)
        return TransferSampler([], seed=seed, search_space=space)
    if name.startswith("transfer_"):
        return TransferSampler(sources, seed=seed, method=name.removeprefix("transfer_"), search_space=space)
    if name == "cmaes_warm":
        return optuna.samplers.CmaEsSampler(seed=seed, source_trials=_cmaes_source_trials(sources, space),
                                            warn_independent_sampling=False)
    raise ValueError(name)


def _cmaes_source_trials(sources: list, space: dict) -> list:
    """The sources' trials as WS-CMA-ES takes them: over the numbers CMA-ES models (not choices, not single
    values), each source's values as normal scores of their ranks (the tasks' metrics have their own scales)."""
    import optuna

    from rayeff.tune.transfer import normal_scores

    numbers = {k: d for k, d in space.items()
               if not isinstance(d, optuna.distributions.CategoricalDistribution) and not d.single()}
    trials = []
    for s in sources:
        done = s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        scores = normal_scores([t.value for t in done], s.direction)
        trials += [optuna.trial.create_trial(params={k: t.params[k] for k in numbers}, distributions=numbers,
                                             value=float(score)) for t, score in zip(done, scores)]
    return trials


def _summary(counts: list[int], censored_at: int) -> dict:
    """Median, mean with a 95% interval (normal approximation) and how many runs were censored."""
    mean = statistics.fmean(counts)
    half = 1.96 * statistics.stdev(counts) / math.sqrt(len(counts)) if len(counts) > 1 else 0.0
    return {"median": statistics.median(counts), "mean": mean, "mean_ci95": [mean - half, mean + half],
            "censored": sum(c == censored_at for c in counts), "runs": len(counts)}


def bench_priors_table(table_path: str, output: str, seeds: int = 30, source_trials: int = 24,
                       max_trials: int | None = None, strategies: tuple[str, ...] = STRATEGIES,
                       overwrite: bool = False) -> dict:
    import optuna

    output_path = check_output_file(output, "--output", overwrite)
    for flag, value, least in (("--replay-seeds", seeds, 1), ("--source-trials", source_trials, 2),
                               ("--max-trials", max_trials or 1, 1)):
        if value < least:
            raise UserError(f"{flag}: {value}; give at least {least}")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise UserError(f"--strategies: {unknown} unknown; choose from {', '.join(STRATEGIES)}")
    table = load_table(table_path)
    grid, names = table["grid"], sorted(table["tasks"])
    if "cmaes_warm" in strategies and (len(names) - 1) * source_trials < 10:   # it starts from their top tenth
        raise UserError(f"--source-trials: warm-started CMA-ES needs at least 10 source trials in all; "
                        f"{len(names) - 1} sources x {source_trials} is fewer")
    space = replay_space(grid)
    size = math.prod(len(v) for v in grid.values())
    max_trials = max_trials or size
    tables = {n: TaskTable(grid, table["tasks"][n]) for n in names}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # CMA-ES's source_trials

    # Each task's earlier sweep per seed: cold TPE on the table, as a user would have run it.
    source_studies = {}
    for i, name in enumerate(names):
        for seed in range(seeds):
            study, _ = replay(optuna.samplers.TPESampler(seed=SOURCE_SEED + 100 * seed + i), tables[name], space,
                              source_trials, stop_when_reached=False)
            study.study_name = name
            source_studies[name, seed] = study

    censored_at = max_trials + 1
    runs: dict[str, dict[str, list]] = {s: {f: [] for f in TOP_FRACTIONS} for s in strategies}
    per_task: dict[str, dict] = {}
    for target in names:
        per_task[target] = {s: {f: [] for f in TOP_FRACTIONS} for s in strategies}
        for seed in range(seeds):
            sources = [source_studies[n, seed] for n in names if n != target]
            for strategy in strategies:
                _, reached = replay(_strategy(strategy, seed, sources, space), tables[target], space, max_trials)
                for f, n in reached.items():
                    count = n if n is not None else censored_at
                    runs[strategy][f].append(count)
                    per_task[target][strategy][f].append(count)

    def figures(counts: dict[str, dict[str, list]]) -> dict:
        out = {}
        for s in strategies:
            out[s] = {}
            for f in TOP_FRACTIONS:
                summary = _summary(counts[s][f], censored_at)
                out[s][f"median_{f}"] = summary["median"]
                out[s][f"{f}"] = summary
        if "cold_tpe" in strategies:
            for s in strategies:
                for f in TOP_FRACTIONS:
                    out[s][f"ratio_{f}"] = out[s][f"median_{f}"] / out["cold_tpe"][f"median_{f}"]
        return out

    report = {"table": table_path, "method": table.get("method"), "tasks": names, "grid_size": size,
              "seeds": seeds, "source_trials": source_trials, "max_trials": max_trials,
              "censored_at": censored_at, "top_fractions": TOP_FRACTIONS,
              "note": "trials until the first configuration in the target's top 5% (top 1%) of the table; leave one "
                      "task out, the others' replayed cold-TPE sweeps as sources; a run that never got there counts "
                      "as max_trials + 1 (censored)",
              "strategies": figures(runs),
              "per_task": {t: figures(per_task[t]) for t in names},
              "targets": {t: tables[t].top for t in names},
              "runs": {s: runs[s] for s in strategies}}
    report["plot"] = str(output_path.with_suffix(".png"))
    plot_replay(report, Path(report["plot"]))
    write_json_atomic(output_path, report)
    return report


def plot_replay(report: dict, path: Path) -> None:
    """Trials to the top 5% and top 1% per strategy: a box per strategy over all targets and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(report["runs"])
    fig, axes = plt.subplots(1, len(TOP_FRACTIONS), figsize=(5 * len(TOP_FRACTIONS), 4), sharey=True)
    for ax, f in zip(np.atleast_1d(axes), TOP_FRACTIONS):
        ax.boxplot([report["runs"][s][f] for s in strategies], showmeans=True)
        ax.set_xticks(range(1, len(strategies) + 1), strategies, rotation=30, ha="right")
        ax.set_title(f"trials to the {f.replace('top', 'top ')}% ({report['seeds']} seeds x "
                     f"{len(report['tasks'])} targets)")
        ax.axhline(report["censored_at"], color="grey", linestyle=":", linewidth=1)
    np.atleast_1d(axes)[0].set_ylabel(f"trials (censored at {report['censored_at']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
