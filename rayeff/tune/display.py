"""The terminal display of a sweep while it runs, in place of Ray Tune's own output: a table of its trials (state,
step, objectives, energy so far) under a title with the sweep's energy budget left.

Two sources feed it: the progress that each trial's rank 0 puts on the sweep's display queue (a running trial's
step, last dev metric and energy, rayeff/train/reporter.py), and the records the searcher writes to the study as
trials end (rayeff/tune/searcher.py), read again every few seconds. On a terminal the table updates in place (rich);
otherwise each progress update is printed as one plain line, which suits logs and CI.
"""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table

from rayeff.measure.energy import energy_label
from rayeff.results import Progress
from rayeff.train.progress import progress_line
from rayeff.tune.spec import ENERGY_METRIC, SweepSpec


class SweepDisplay:
    def __init__(self, sweep: SweepSpec, dev_metrics: list[str | None], console: Console | None = None):
        """`dev_metrics`: per objective, the dev metric it reads (None for energy). The table has every trial
        recorded in the study, an earlier invocation's too, so the budget left counts them all."""
        self.console = console or Console()
        self.sweep, self.dev_metrics = sweep, dev_metrics
        self.rows: dict[str, dict] = {}   # Tune's trial id -> its row, in the order trials first appear
        self.live = Live(self.table(), console=self.console, refresh_per_second=2) \
            if self.console.is_terminal else None

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self.table())
            self.live.__exit__(*exc)

    def progress(self, message: dict) -> None:
        """A running trial's progress (a `Progress` with its `trial`)."""
        p = Progress.model_validate(message)
        row = self.rows.setdefault(p.trial, {})
        row.update(state="running", step=f"{p.step}/{p.total_steps}", joules=p.energy_joules,
                   source=p.energy_source,
                   objectives=[p.energy_joules if m is None else (p.eval or {}).get(m) for m in self.dev_metrics])
        if self.live is not None:
            self.live.update(self.table())
        else:
            left = self.budget_left()
            print(f"trial {p.trial}: {progress_line(message)}"
                  + (f"  sweep budget left {left:.1f} J" if left is not None else ""), flush=True)

    def records(self, records: list[dict]) -> None:
        """The study's records of ended trials (`rayeff.tune.results.study_records`)."""
        for record in records:
            if record.get("trial_id") is None and record["status"].startswith("infeasible"):
                key = f"#{record['number']}"   # never started: no Tune trial id
            elif record.get("trial_id") is None:
                continue
            else:
                key = record["trial_id"]
            row = self.rows.setdefault(key, {})
            energy = record.get("energy") or {}
            row.update(state=record["status"], objectives=record.get("objectives"),
                       joules=energy.get("joules", row.get("joules")), source=energy.get("source", row.get("source")))
            if record.get("time"):
                row["step"] = str(record["time"]["steps"])
        if self.live is not None:
            self.live.update(self.table())

    def budget_left(self) -> float | None:
        budget = self.sweep.energy.sweep_budget_j
        if budget is None:
            return None
        return budget - sum(row.get("joules") or 0.0 for row in self.rows.values())

    def table(self) -> Table:
        left = self.budget_left()
        title = f"rayeff tune: {len(self.rows)} of {self.sweep.num_trials} trials" + (
            f", sweep energy budget left {left:.1f} J" if left is not None else "")
        table = Table(title=title)
        for column in ("trial", "state", "step", *self._objective_names(), "energy so far"):
            table.add_column(column, justify="left" if column in ("trial", "state") else "right")
        for key, row in self.rows.items():
            values = row.get("objectives") or [None] * len(self.dev_metrics)
            cells = ["-" if v is None else f"{v:.4g}" for v in values]
            energy = "-" if row.get("joules") is None else energy_label({"joules": row["joules"],
                                                                         "source": row.get("source")})
            table.add_row(key, row.get("state", "-"), row.get("step", "-"), *cells, energy)
        return table

    def _objective_names(self) -> list[str]:
        return [f"{ENERGY_METRIC if m is None else 'dev ' + m} ({o.mode})"
                for m, o in zip(self.dev_metrics, self.sweep.objectives)]
