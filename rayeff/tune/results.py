"""A sweep's results, read from its Optuna study: every recorded trial once, the best feasible one, and for a
multi-objective sweep the Pareto front (JSON, and a PNG of the first objective against the second)."""

from __future__ import annotations

from pathlib import Path

from rayeff.tune.searcher import RECORD_ATTR
from rayeff.tune.spec import SweepSpec


def study_records(study) -> list[dict]:
    """The recorded trials in the order they were asked for. Trials without a record (the one a killed driver
    left running, since re-run under a new number) are not trials of the sweep."""
    return [{"number": t.number, **t.user_attrs[RECORD_ATTR], "prior": t.user_attrs.get("prior")}
            for t in sorted(study.trials, key=lambda t: t.number) if RECORD_ATTR in t.user_attrs]


def pareto_front(study, trials: list[dict], modes: list[str]) -> list[dict]:
    """The records of the study's Pareto-optimal trials, best first by the first objective. Optuna's
    `study.best_trials` chooses them: complete trials whose constraints (the searcher's budgets, and `unfinished`)
    are all <= 0, that no other such trial dominates."""
    optimal = {t.number for t in study.best_trials}
    front = [t for t in trials if t["number"] in optimal]
    return sorted(front, key=lambda t: t["objectives"][0], reverse=modes[0] == "max")


def best_trial(study, trials: list[dict], sweep: SweepSpec) -> dict | None:
    """The best feasible trial by the first objective (for several objectives: the front's best by the first)."""
    candidates = pareto_front(study, trials, [o.mode for o in sweep.objectives])
    return candidates[0] if candidates else None


def plot_pareto(trials: list[dict], front: list[dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")   # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for feasible, style in ((True, dict(c="tab:blue", marker="o", label="feasible trial")),
                            (False, dict(c="tab:red", marker="x", label="infeasible trial"))):
        pts = [t["objectives"] for t in trials if t["feasible"] == feasible and t.get("objectives")]
        if pts:
            ax.scatter([p[1] for p in pts], [p[0] for p in pts], alpha=0.7, **style)
    if front:
        ax.plot([t["objectives"][1] for t in front], [t["objectives"][0] for t in front], "k--",
                marker="D", mfc="none", ms=9, label="Pareto front")
    ax.set_xlabel(labels[1])
    ax.set_ylabel(labels[0])
    ax.set_title(f"{len(trials)} trials, {len(front)} on the front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
