"""The terminal display of a run: a live line (step, loss, throughput, energy so far) and a final summary table.

Rank 0 of the workers puts progress dicts on a Ray queue; the driver renders them here. On a terminal the line
updates in place (rich); otherwise each update is printed as one plain line, which suits logs and CI.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rayeff.measure.energy import energy_label
from rayeff.results import Progress, RunResult


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def progress_line(progress: dict) -> str:
    """One line of a `Progress` (rayeff/results.py)."""
    p = Progress.model_validate(progress)
    loss = "-" if p.loss is None else f"{p.loss:.4f}"
    evals = " ".join(f"{k} {v:.4f}" for k, v in (p.eval or {}).items())
    energy = energy_label({"joules": p.energy_joules, "source": p.energy_source})
    return (f"step {p.step}/{p.total_steps}  epoch {p.epoch}  loss {loss}  "
            f"{p.samples_per_second:.1f} samples/s  energy {energy}" + (f"  dev {evals}" if evals else ""))


class ProgressDisplay:
    def __init__(self, title: str, console: Console | None = None):
        self.console = console or Console()
        self.title = title
        self.live = Live(Text(f"{title}: starting"), console=self.console, transient=False,
                         refresh_per_second=4) if self.console.is_terminal else None

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        else:
            print(f"{self.title}: starting", flush=True)
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, progress: dict) -> None:
        line = f"{self.title}: {progress_line(progress)}"
        if self.live is not None:
            self.live.update(Text(line))
        else:
            print(line, flush=True)

    def print_summary(self, result: dict) -> None:
        self.console.print(summary_table(result))
        sys.stdout.flush()


def summary_table(summary: dict) -> Table:
    """The final table of a `RunResult` (rayeff/results.py): what result.json holds."""
    result = RunResult.model_validate(summary)
    table = Table(title=f"rayeff run: {result.method} on {result.task} ({result.model})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("status", result.status)
    for name, value in result.metrics.items():
        table.add_row(f"dev {name}", f"{value:.4f}")
    table.add_row("train loss (mean)", f"{result.train_loss:.4f}")
    mem = result.memory
    table.add_row("trainable / total params", f"{mem.trainable_params:,} / {mem.total_params:,}")
    for key in ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_state_bytes", "peak_activation_bytes",
                "tensor_account_bytes", "peak_device_bytes"):
        table.add_row(key.replace("_", " "), _fmt_bytes(getattr(mem, key)))
    energy = result.energy
    table.add_row("energy", energy_label({"joules": energy.joules, "source": energy.source}))
    table.add_row("  in training steps", energy_label({"joules": energy.train_joules, "source": energy.source}))
    if energy.scope:
        table.add_row("  what it covers", energy.scope)
    if energy.fallback:
        table.add_row("  meter fallback", energy.fallback)
    t = result.time
    table.add_row("train time", f"{t.train_seconds:.1f} s, {t.steps} steps, {t.samples_per_second:.1f} samples/s")
    table.add_row("workers / ZeRO stage", f"{result.workers} / {result.zero_stage}")
    table.add_row("output", result.output_dir or "")
    return table
