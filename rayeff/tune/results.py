"""A sweep's results, read from its Optuna study: every recorded trial once, the best feasible one, and for a
multi-objective sweep the Pareto front (pareto.json; its PNG is drawn by rayeff/report/figures.py's trial_scatter)."""

from __future__ import annotations

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
