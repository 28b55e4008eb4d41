"""`rayeff bench compare`: one job, run once per method on the same data, batch, sequence length, steps and seed;
each method's result.json plus its ratios to full fine-tuning.

    rayeff bench compare --job jobs/bench-compare.yaml --methods full,lora,read --output compare.json \
        --data-dir ../shared/data/glue --per-method read:training.lr=1e-3

Only the method section (and any `--per-method METHOD:FIELD=VALUE` override, e.g. a method's learning rate)
differs between the runs. Ratios are method / full, so figures from one run on one shared machine are compared.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rayeff.bench import output_and_runs_dir, run_measured
from rayeff.cluster.storage import write_json_atomic
from rayeff.config import JobSpec, parse_overrides, set_field, validate_job
from rayeff.data.task import task_of
from rayeff.errors import UserError
from rayeff.measure.energy import energy_label, estimate_note
from rayeff.results import RunResult
from rayeff.train.runner import prepare

RATIO_FIGURES = {
    "tensor_account_bytes": lambda r: r.memory.tensor_account_bytes,
    "peak_device_bytes": lambda r: r.memory.peak_device_bytes,
    "energy_joules": lambda r: r.energy.joules,
    "train_energy_joules": lambda r: r.energy.train_joules,
    "seconds_per_sample": lambda r: r.time.seconds_per_sample,
    "trainable_params": lambda r: r.memory.trainable_params,
}


def method_jobs(job: JobSpec, methods: list[str], per_method: list[str], runs_dir: Path) -> dict[str, JobSpec]:
    overrides: dict[str, list[str]] = {m: [] for m in methods}
    for item in per_method:
        method, sep, assignment = item.partition(":")
        if not sep or method not in overrides:
            raise UserError(f"--per-method {item!r}: expected METHOD:FIELD=VALUE with METHOD one of {methods}")
        overrides[method].append(assignment)
    jobs = {}
    for method in methods:
        raw = job.model_dump(mode="json")
        raw["method"] = raw["method"] if raw["method"]["name"] == method else {"name": method}
        raw["output_dir"] = str(runs_dir / method)
        raw["resume"] = False
        for key, value in parse_overrides(overrides[method]):
            set_field(raw, key, value)
        jobs[method] = validate_job(raw, f"{method} job")
    return jobs


def ratios(results: dict[str, RunResult], metric: str) -> dict[str, dict]:
    base = results.get("full")
    if base is None:
        return {}
    out = {}
    for method, result in results.items():
        row = {name: get(result) / get(base) if get(base) else None for name, get in RATIO_FIGURES.items()}
        row[f"dev_{metric}_difference"] = result.metrics[metric] - base.metrics[metric]
        out[method] = row
    return out


def compare_methods(job: JobSpec, methods: list[str], output: str, runs_dir: str | None = None,
                    address: str | None = None, show_progress: bool = True, per_method: list[str] = (),
                    overwrite: bool = False) -> dict:
    if not methods:
        raise UserError("--methods: name at least one method, e.g. full,lora,read")
    output_path, runs = output_and_runs_dir(output, runs_dir, overwrite)
    jobs = method_jobs(job, methods, list(per_method), runs)
    for j in jobs.values():   # every run's checks before the first one starts (and before Ray does)
        prepare(j)
    results = {m: run_measured(j, address, show_progress) for m, j in jobs.items()}
    metric = task_of(job.data).metrics[0]
    report = {"task": job.data.display_name, "model": job.model.name, "primary_metric": metric,
              "same_for_all": {"batch_size": job.training.batch_size, "max_seq_length": job.training.max_seq_length,
                               "padding": job.training.padding, "seed": job.training.seed,
                               "steps": {m: r.time.steps for m, r in results.items()},
                               "workers": job.scaling.num_workers},
              "results": {m: r.dump() for m, r in results.items()}, "ratios_to_full": ratios(results, metric)}
    write_json_atomic(output_path, report)
    # 13 columns: on a terminal rich fits them to the window; in a log, print them whole rather than at 80 columns
    Console(width=None if sys.stdout.isatty() else 200).print(comparison_table(report))
    print(f"rayeff: wrote {output_path}")
    return report


def comparison_table(report: dict) -> Table:
    metric = report["primary_metric"]
    table = Table(title=f"rayeff bench compare: {report['task']} ({report['model']}), ratios to full")
    for col in ("method", f"dev {metric}", "trainable", "tensor account", "x full", "device peak", "x full",
                "energy (source)", "x full", "in steps", "x full", "s/sample", "x full"):
        table.add_column(col, justify="right")
    results = {m: RunResult.model_validate(r) for m, r in report["results"].items()}
    for method, r in results.items():
        q = report["ratios_to_full"].get(method, {})

        def x(key, note=""):
            return f"{q[key]:.3f}{note}" if q.get(key) is not None else "-"

        mem, en = r.memory, r.energy
        full = results.get("full", r).energy
        energy_note = estimate_note(en.source, full.source)   # a ratio of estimates is one too
        table.add_row(method, f"{r.metrics[metric]:.4f}", f"{mem.trainable_params:,}",
                      f"{mem.tensor_account_bytes / 2**20:.1f} MiB", x("tensor_account_bytes"),
                      f"{mem.peak_device_bytes / 2**20:.1f} MiB", x("peak_device_bytes"),
                      energy_label(en.dump()), x("energy_joules", energy_note),
                      energy_label({**en.dump(), "joules": en.train_joules}), x("train_energy_joules", energy_note),
                      f"{r.time.seconds_per_sample * 1000:.2f} ms", x("seconds_per_sample"))
    return table
