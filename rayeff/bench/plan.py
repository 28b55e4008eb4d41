"""`rayeff bench plan`: the planner (rayeff/plan) against real runs of the same job, side by side, for every method,
ZeRO stage and worker count asked for; per term of the tensor account, predicted / measured.

    rayeff bench plan --job jobs/bench-plan.yaml --output plan-vs-run.json --data-dir ../shared/data/glue \
        --methods full,lora,read,adazeta,mezo --stages 0,1,2,3 --workers 1,2

With `--calibration CAL.json` (`rayeff calibrate`), each case also sets the plan's seconds per step beside the
run's (training-step time over steps). Every run pads its sequences to max_seq_length, the plan's case.
Zeroth-order methods run at ZeRO-0 only (they use no DeepSpeed). A run's memory figures are those of its largest
worker.
"""

from __future__ import annotations

from pathlib import Path

from rayeff.bench import output_and_runs_dir, run_measured
from rayeff.cluster.storage import write_json_atomic
from rayeff.config import JobSpec, validate_job
from rayeff.errors import UserError
from rayeff.methods import get_method
from rayeff.plan.calibration import Calibration
from rayeff.plan.planner import job_for_method, plan_job, plan_method
from rayeff.plan.shapes import plan_model_config
from rayeff.results import RunResult
from rayeff.train.runner import prepare

TERMS = {"parameters": "param_bytes", "buffers": "buffer_bytes", "gradients": "grad_bytes",
         "optimizer_state": "optimizer_state_bytes", "activations": "peak_activation_bytes",
         "perturbation_snapshot": "perturbation_snapshot_bytes"}


def case_jobs(job: JobSpec, methods: list[str], stages: list[int], workers: list[int], runs: Path) -> list[JobSpec]:
    jobs = []
    for method in methods:
        first_order = get_method(method).loop == "first_order"
        for n in workers:
            for stage in stages if first_order else [0]:
                raw = job_for_method(job, method).model_dump(mode="json")
                raw["deepspeed"]["zero_stage"], raw["scaling"]["num_workers"] = stage, n
                raw["training"]["padding"], raw["resume"] = "max_length", False
                raw["output_dir"] = str(runs / f"{method}-zero{stage}-{n}w")
                jobs.append(validate_job(raw, f"{method} at ZeRO-{stage} on {n} worker(s)"))
    return jobs


def ratio(predicted: int, measured: int | None) -> float | None:
    """predicted / measured; 1.0 when both are 0 (a term the method does not have), None when only one is."""
    measured = measured or 0
    if measured == 0:
        return 1.0 if predicted == 0 else None
    return predicted / measured


def time_case(job: JobSpec, config, calibration: Calibration, result: RunResult) -> dict:
    """The plan's seconds per step for the run's own work (a zeroth-order run at the queries per step it ran) beside
    the run's training-step seconds per step."""
    queries = None
    if result.zeroth_order is not None:
        queries = result.zeroth_order.queries_total / result.time.steps
    planned = plan_method(job, config, None, calibration, queries).time
    measured = result.time.seconds_per_step
    return {"predicted_s": planned.seconds_per_step, "measured_s": measured,
            "ratio": planned.seconds_per_step / measured, "terms_s": planned.seconds}


def bench_plan(job: JobSpec, methods: list[str], stages: list[int], workers: list[int], output: str,
               runs_dir: str | None = None, address: str | None = None, show_progress: bool = True,
               overwrite: bool = False, calibration: Calibration | None = None) -> dict:
    """With a calibration, each case also holds `time_per_step` (`time_case`)."""
    if not methods or not stages or not workers:
        raise UserError("--methods, --stages and --workers: name at least one of each")
    output_path, runs = output_and_runs_dir(output, runs_dir, overwrite)
    jobs = case_jobs(job, methods, stages, workers, runs)
    config = plan_model_config(job.model.name)
    plans = []
    for j in jobs:   # every run's checks, and every plan, before the first run starts (and before Ray does)
        prepare(j)
        plan = plan_job(j, config, [j.method.name], None)
        if plan.refused:
            raise UserError(f"--methods: {j.method.name} cannot be planned for this job: {plan.refused[j.method.name]}")
        plans.append(plan.methods[j.method.name].memory_per_worker_bytes.model_dump())
    cases = []
    for j, planned in zip(jobs, plans):
        result = run_measured(j, address, show_progress)
        measured = result.memory.model_dump()
        cases.append({"method": j.method.name, "zero_stage": j.deepspeed.zero_stage, "workers": j.scaling.num_workers,
                      "predicted": {t: planned[t] for t in TERMS},
                      "measured": {t: measured.get(k) or 0 for t, k in TERMS.items()},
                      "ratio": {t: ratio(planned[t], measured.get(k)) for t, k in TERMS.items()}})
        if calibration is not None:
            cases[-1]["time_per_step"] = time_case(j, config, calibration, result)
    worst = {t: max((abs(c["ratio"][t] - 1) for c in cases if c["ratio"][t] is not None), default=None)
             for t in TERMS}
    report = {"model": job.model.name, "task": job.data.display_name, "batch_size": job.training.batch_size,
              "max_seq_length": job.training.max_seq_length, "cases": cases,
              "largest_relative_error": worst,
              "unmatched": [f"{c['method']} ZeRO-{c['zero_stage']} {c['workers']}w {t}" for c in cases
                            for t in TERMS if c["ratio"][t] is None]}
    if calibration is not None:
        report["calibration"] = calibration.model_dump(mode="json")
        report["time_ratio_range"] = [min(c["time_per_step"]["ratio"] for c in cases),
                                      max(c["time_per_step"]["ratio"] for c in cases)]
    write_json_atomic(output_path, report)
    return report
