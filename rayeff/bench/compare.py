"""`rayeff bench compare`: one job, run once per method on the same data, batch, sequence length, steps and seed;
each method's result.json plus its ratios to full fine-tuning.

    rayeff bench compare --job jobs/bench-compare.yaml --methods full,lora,read --output compare.json \
        --data-dir ../shared/data/glue --per-method read:training.lr=1e-3

Only the method section (and any `--per-method METHOD:FIELD=VALUE` override, e.g. a method's learning rate)
differs between the runs. Ratios are method / full, so figures from one run on one shared machine are compared.

Target mode (`--target`, which is `--target full`, or `--target VALUE`, with `--eval-every N`): every method is
evaluated on the dev set every N steps, and the report adds, per method, the first evaluation at which its dev
metric reached the target (by default full fine-tuning's final dev metric on the same budget): its step, and the
joules and seconds of the training steps up to it (evaluation excluded: it is the measuring, not the training), or
that it never did. Each method still runs its whole budget, so its final figures stay comparable.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rayeff.bench import output_and_runs_dir, run_measured
from rayeff.cluster.storage import write_json_atomic
from rayeff.config import JobSpec, parse_overrides, set_field, validate_job
from rayeff.data.task import LOWER_IS_BETTER, task_of
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


def first_reaching(result: RunResult, metric: str, target: float) -> dict:
    """The first evaluation of a run whose dev `metric` reached `target` (at least it; at most it for a
    lower-is-better metric): its step and value, the training steps' joules and seconds up to it and the whole
    run's joules; or `reached: false` with the best value of any evaluation."""
    lower = metric in LOWER_IS_BETTER
    for count, evaluation in enumerate(result.eval_history, start=1):
        value = evaluation.metrics[metric]
        if (value <= target) if lower else (value >= target):
            return {"reached": True, "step": evaluation.step, "value": value, "evaluations": count,
                    "train_joules": evaluation.train_joules, "train_seconds": evaluation.train_seconds,
                    "joules": evaluation.joules}
    values = [e.metrics[metric] for e in result.eval_history]
    return {"reached": False, "best": (min if lower else max)(values) if values else None,
            "evaluations": len(values)}


def to_target(results: dict[str, RunResult], metric: str, target: float, target_from: str,
              eval_every: int) -> dict:
    """Target mode's section of the report: each method's `first_reaching`, and its figures over full's."""
    reached = {m: first_reaching(r, metric, target) for m, r in results.items()}
    base = reached.get("full", {})
    over_full = {}
    for method, row in reached.items():
        if row["reached"] and base.get("reached"):
            # (None where a run resumed from a checkpoint older than these figures)
            over_full[method] = {k: row[k] / base[k] if row[k] is not None and base[k] else None
                                 for k in ("train_joules", "train_seconds", "joules", "step")}
    return {"metric": metric, "value": target, "from": target_from, "eval_every": eval_every,
            "reached": reached, "ratios_to_full": over_full}


def target_settings(job: JobSpec, methods: list[str], target: str | None,
                    eval_every: int | None) -> tuple[float | None, int | None]:
    """`--target` (full, or a number) and the evaluation interval it needs, checked before anything runs."""
    if target is None:
        return None, None
    if target != "full":
        try:
            value = float(target)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"--target {target!r}: give full (full fine-tuning's final dev metric) or a number, "
                            "e.g. 0.85")
    elif "full" not in methods:
        raise UserError("--target full: the target is full fine-tuning's final dev metric; add full to --methods")
    else:
        value = None
    every = eval_every if eval_every is not None else job.training.eval_every
    if every is None:
        raise UserError("--target: each method must be evaluated on the way; give --eval-every N (steps)")
    return value, every


def compare_methods(job: JobSpec, methods: list[str], output: str, runs_dir: str | None = None,
                    address: str | None = None, show_progress: bool = True, per_method: list[str] = (),
                    overwrite: bool = False, target: str | None = None, eval_every: int | None = None) -> dict:
    if not methods:
        raise UserError("--methods: name at least one method, e.g. full,lora,read")
    target_value, every = target_settings(job, methods, target, eval_every)
    if eval_every is not None:
        raw = job.model_dump(mode="json")
        set_field(raw, "training.eval_every", eval_every)
        job = validate_job(raw, "--eval-every")
    if target == "full":   # its final dev metric is the others' target
        methods = ["full"] + [m for m in methods if m != "full"]
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
    if target is not None:
        value = results["full"].metrics[metric] if target == "full" else target_value
        source = f"full's final dev {metric}" if target == "full" else "given"
        report["target"] = to_target(results, metric, value, source, every)
    write_json_atomic(output_path, report)
    # 13 columns: on a terminal rich fits them to the window; in a log, print them whole rather than at 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(comparison_table(report))
    if "target" in report:
        console.print(target_table(report))
    print(f"rayeff: wrote {output_path}")
    return report


def _ratio_cell(row: dict):
    """A table cell of one method's ratio to full: `x(key, note)`, or - where it has none."""
    def x(key: str, note: str = "") -> str:
        return f"{row[key]:.3f}{note}" if row.get(key) is not None else "-"
    return x


def comparison_table(report: dict) -> Table:
    metric = report["primary_metric"]
    table = Table(title=f"rayeff bench compare: {report['task']} ({report['model']}), ratios to full")
    for col in ("method", f"dev {metric}", "trainable", "tensor account", "x full", "device peak", "x full",
                "energy (source)", "x full", "in steps", "x full", "s/sample", "x full"):
        table.add_column(col, justify="right")
    results = {m: RunResult.model_validate(r) for m, r in report["results"].items()}
    for method, r in results.items():
        x = _ratio_cell(report["ratios_to_full"].get(method, {}))
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


def target_table(report: dict) -> Table:
    t = report["target"]
    results = {m: RunResult.model_validate(r) for m, r in report["results"].items()}
    table = Table(title=f"to dev {t['metric']} {t['value']:.4f} ({t['from']}), evaluated every {t['eval_every']} "
                        "steps; energy and time of the training steps up to it")
    for col in ("method", "reached at step", f"dev {t['metric']}", "energy", "x full", "seconds", "x full"):
        table.add_column(col, justify="right")
    full_source = results["full"].energy.source if "full" in results else None
    for method, row in t["reached"].items():
        if not row["reached"]:
            best = "-" if row["best"] is None else f"best {row['best']:.4f}"
            table.add_row(method, f"never ({row['evaluations']} evaluations)", best, "-", "-", "-", "-")
            continue
        x = _ratio_cell(t["ratios_to_full"].get(method, {}))
        source = results[method].energy.source
        note = estimate_note(source, full_source)
        known = row["train_joules"] is not None   # not for a run resumed from a checkpoint older than the figures
        table.add_row(method, str(row["step"]), f"{row['value']:.4f}",
                      energy_label({"joules": row["train_joules"], "source": source}) if known else "-",
                      x("train_joules", note), f"{row['train_seconds']:.1f} s" if known else "-", x("train_seconds"))
    return table
