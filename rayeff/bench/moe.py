"""`rayeff bench moe`: dense fine-tuning against the same backbone upcycled to Mixture-of-Experts (E experts, top-k),
on the same data, batch, steps and seed.

    rayeff bench moe --job jobs/bench-moe.yaml --output moe.json --data-dir ../shared/data/glue

The job is run dense (method full) and once per (experts, top_k) pair with method moe; the other upcycle settings
(every, capacity_factor, noise) and the auxiliary-loss weights come from the job's own moe section when it has one.
Per run: dev metric, estimated FLOPs per token and their ratio to dense, the exact tensor account, device peak,
energy, time per sample, and the routing (load coefficient of variation and dropped fraction at step 0 and at the
end, the final auxiliary loss).
"""

from __future__ import annotations

from pathlib import Path

from rayeff.bench import output_and_runs_dir, run_measured
from rayeff.cluster.storage import write_json_atomic
from rayeff.config import JobSpec, validate_job
from rayeff.data.task import task_of
from rayeff.errors import UserError
from rayeff.measure.energy import estimate_note
from rayeff.results import RunResult
from rayeff.train.runner import prepare


def moe_jobs(job: JobSpec, experts: list[int], top_ks: list[int], runs_dir: Path) -> dict[str, JobSpec]:
    """The dense job and one upcycled job per (experts, top_k), named dense and moe-e{E}-k{k}."""
    base = job.model_dump(mode="json")
    moe = dict(base["method"]) if base["method"]["name"] == "moe" else {"name": "moe", "upcycle": {}}
    jobs = {"dense": {**base, "method": {"name": "full"}}}
    for e in experts:
        for k in top_ks:
            upcycled = {**(moe.get("upcycle") or {}), "experts": e, "top_k": k}
            jobs[f"moe-e{e}-k{k}"] = {**base, "method": {**moe, "upcycle": upcycled}}
    return {name: validate_job({**raw, "output_dir": str(runs_dir / name), "resume": False}, f"{name} job")
            for name, raw in jobs.items()}


def summarise(result: RunResult, metric: str, dense_flops: float) -> dict:
    row = {"dev": result.metrics[metric], "tensor_account_bytes": result.memory.tensor_account_bytes,
           "peak_device_bytes": result.memory.peak_device_bytes, "energy_joules": result.energy.joules,
           "energy_source": result.energy.source, "seconds_per_sample": result.time.seconds_per_sample,
           "trainable_params": result.memory.trainable_params}
    moe = result.moe
    if moe is None:
        return {**row, "flops_per_token": dense_flops, "flops_ratio_to_dense": 1.0}
    start, end = moe.routing[0], moe.routing[-1]
    return {**row, "flops_per_token": moe.flops_per_token, "flops_ratio_to_dense": moe.flops_ratio_to_dense,
            "total_params": moe.total_params, "active_params_per_token": moe.active_params_per_token,
            "load_cv_step0": start.load_cv, "load_cv_end": end.load_cv,
            "load_cv_fell": end.load_cv < start.load_cv, "dropped_fraction_step0": start.dropped_fraction,
            "dropped_fraction_end": end.dropped_fraction,
            "aux_loss_end": sum(layer.aux_loss for layer in end.layers) / len(end.layers)}


def bench_moe(job: JobSpec, output: str, experts: list[int], top_ks: list[int], runs_dir: str | None = None,
              address: str | None = None, show_progress: bool = True, overwrite: bool = False) -> dict:
    if not experts or not top_ks:
        raise UserError("--experts and --top-k: give at least one value each, e.g. --experts 4,8 --top-k 1,2")
    output_path, runs = output_and_runs_dir(output, runs_dir, overwrite)
    jobs = moe_jobs(job, experts, top_ks, runs)
    for j in jobs.values():   # every run's checks before the first one starts (and before Ray does)
        prepare(j)
    results = {name: run_measured(j, address, show_progress) for name, j in jobs.items()}
    metric = task_of(job.data).metrics[0]
    upcycled = [r.moe for r in results.values() if r.moe is not None]
    dense_flops = upcycled[0].dense_flops_per_token
    rows = {name: summarise(r, metric, dense_flops) for name, r in results.items()}
    dense = rows["dense"]
    for row in rows.values():
        row.update({f"{key}_ratio_to_dense": row[key] / dense[key] if dense[key] else None
                    for key in ("tensor_account_bytes", "energy_joules", "seconds_per_sample")},
                   dev_difference_to_dense=row["dev"] - dense["dev"])
    report = {"task": job.data.display_name, "model": job.model.name, "primary_metric": metric,
              "same_for_all": {"batch_size": job.training.batch_size, "max_seq_length": job.training.max_seq_length,
                               "seed": job.training.seed, "workers": job.scaling.num_workers,
                               "steps": {name: r.time.steps for name, r in results.items()}},
              "flops_formula": upcycled[0].flops_formula,
              "runs": rows, "results": {name: r.dump() for name, r in results.items()}}
    write_json_atomic(output_path, report)
    for line in summary_lines(rows):
        print(line)
    print(f"rayeff: wrote {output_path}")
    return report


def summary_lines(rows: dict[str, dict]) -> list[str]:
    """One printed line per run, its figures as ratios to the dense run (energy says "estimate" when either
    side's energy is estimated)."""
    lines, dense = [], rows["dense"]
    for name, row in rows.items():
        cv = f"  load CV {row['load_cv_step0']:.3f} -> {row['load_cv_end']:.3f}" if "load_cv_end" in row else ""
        energy = row["energy_joules_ratio_to_dense"]
        energy = "-" if energy is None else f"x{energy:.3f}"
        lines.append(f"{name:<10} dev {row['dev']:.4f}  FLOPs/token x{row['flops_ratio_to_dense']:.3f}  "
                     f"energy {energy}{estimate_note(row['energy_source'], dense['energy_source'])}  "
                     f"s/sample x{row['seconds_per_sample_ratio_to_dense']:.3f}{cv}")
    return lines
