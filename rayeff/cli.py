"""The `rayeff` command.

    rayeff run JOB.yaml [--set FIELD=VALUE ...] [--data-dir DIR] [--output DIR] [--resume] [--address ADDR]
                        [--memory-per-worker GB] [--strict]
    rayeff bench compare --job JOB.yaml --methods full,lora,read --output OUT.json [--overwrite] [--data-dir DIR]
                         [--per-method METHOD:FIELD=VALUE ...] [--target full|VALUE --eval-every N]
    rayeff tune SWEEP.yaml [--set FIELD=VALUE ...] [--data-dir DIR] [--output DIR] [--resume] [--address ADDR]
                           [--no-progress]
    rayeff priors list [--store FILE]
    rayeff priors show ID [--store FILE]
    rayeff priors remove ID [--store FILE]
    rayeff bench zo --job JOB.yaml --output OUT.json [--data-dir DIR] [--loss-target L] [--queries Q]
    rayeff bench moe --job JOB.yaml --output OUT.json [--experts 4,8] [--top-k 1,2] [--data-dir DIR]
    rayeff bench priors --output OUT.json [--sweep SWEEP.yaml] [--sources sst2] [--targets stsb] [--seeds 0,1,2]
    rayeff bench priors --table TABLE.json --output OUT.json [--replay-seeds 30] [--source-trials 24]
    rayeff plan JOB.yaml [--workers N] [--gpu-memory GB] [--methods all|a,b] [--calibration CAL.json]
                         [--json OUT.json] [--overwrite]
    rayeff calibrate --output CAL.json [--device cpu|cuda] [--threads N] [--hidden-sizes 64,256,768] [--overwrite]
    rayeff bench plan --job JOB.yaml --output OUT.json [--methods all|a,b] [--stages 0,1,2,3] [--workers 1,2]
                      [--calibration CAL.json]
    rayeff bench table SWEEP_DIR SWEEP_DIR ... --output TABLE.json
    rayeff submit JOB_OR_SWEEP.yaml --address http://HEAD:8265 [--set ...] [--data-dir DIR] [--output DIR] [--follow]
    rayeff jobs list|status ID|logs ID [--follow]|stop ID [--address http://HEAD:8265]
    rayeff status [--address ADDR]

Bad input (a job file, a field, a path, an address) ends with one line on stderr naming it, and exit code 2.
A benchmark refuses to replace an existing --output file unless given --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rayeff.errors import UserError
from rayeff.measure.energy import energy_label

_DASHBOARD_HELP = "the head's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"


_ADDRESS_HELP = "join the Ray cluster at this address instead of starting a local Ray"
_DATA_DIR_HELP = "GLUE data in its download layout (sets data.data_dir)"


def _set_option(parser: argparse.ArgumentParser, what: str, example: str = "training.lr=3e-4") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override a field of the {what} file, e.g. --set {example} (repeatable)")


def _job_options(parser: argparse.ArgumentParser) -> None:
    """A benchmark's options for the job it runs."""
    _set_option(parser, "job")
    parser.add_argument("--data-dir", help=_DATA_DIR_HELP)
    parser.add_argument("--address", help=_ADDRESS_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no live progress display")


def _file_options(parser: argparse.ArgumentParser, what: str, resume: str, data_dir: str = _DATA_DIR_HELP,
                  output: str = "output folder (sets output_dir)", example: str = "training.lr=3e-4") -> None:
    """The options of a command that runs one job or sweep file: overrides, data, output folder, resume."""
    _set_option(parser, what, example)
    parser.add_argument("--data-dir", help=data_dir)
    parser.add_argument("--output", help=output)
    parser.add_argument("--resume", action="store_true", help=resume)


def _bench_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="JSON file to write (an existing one is refused)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayeff", description="Efficient fine-tuning on Ray")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one fine-tuning job")
    run.add_argument("job", help="job YAML file (see jobs/)")
    _file_options(run, "job", "continue from the checkpoint in the output folder")
    run.add_argument("--address", help=_ADDRESS_HELP)
    run.add_argument("--no-progress", action="store_true", help="no live progress display")
    run.add_argument("--memory-per-worker", type=float, metavar="GB",
                     help="memory of one worker in GB (1e9 bytes), checked against the plan's tensors per worker "
                          "before the run starts (default: for a GPU job on the local Ray, the smallest local GPU)")
    run.add_argument("--strict", action="store_true", help="refuse (exit 2) a run that the plan says cannot fit its "
                                                           "workers, instead of warning")

    export = commands.add_parser("export", help="write a finished run as a Hugging Face model folder (or, where the "
                                                "method does not merge into the model, one rayeff.load reads)")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder")
    export.add_argument("--output", required=True, help="a new (or empty) folder to write the model to")
    export.add_argument("--adapter-only", action="store_true",
                        help="LoRA: write a PEFT adapter folder for the base model instead of merged weights")

    plan = commands.add_parser("plan", help="per-worker memory and bytes sent per step of a job, per method, from "
                                            "its model's config alone (nothing is loaded or launched)")
    plan.add_argument("job", help="job YAML file; model.name may also be a config.json or a folder holding one")
    _set_option(plan, "job")
    plan.add_argument("--workers", type=int, help="plan for this many workers (sets scaling.num_workers)")
    plan.add_argument("--gpu-memory", type=float, metavar="GB", help="memory of one GPU in GB (1e9 bytes): says "
                                                                     "whether each method's tensors fit")
    plan.add_argument("--methods", help="all (every method that trains the job's task type) or a comma-separated "
                                        "list; default the job's own")
    plan.add_argument("--calibration", metavar="CAL.json", help="a `rayeff calibrate` file of the machine kind the "
                                                                "job runs on: adds seconds and joules per step")
    plan.add_argument("--json", metavar="OUT.json", help="also write the plan as JSON (an existing file is refused)")
    plan.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")

    calibrate = commands.add_parser("calibrate", help="measure what one worker of this machine does per second "
                                                      "(arithmetic, operator calls, updates, all-reduce, power), "
                                                      "for `rayeff plan --calibration`")
    calibrate.add_argument("--output", required=True, metavar="CAL.json", help="the calibration file to write")
    calibrate.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="what a worker computes on")
    calibrate.add_argument("--threads", type=int, default=1, help="CPU: torch threads, as the job's workers run "
                                                                  "(a Ray worker of 1 CPU runs 1; default 1)")
    calibrate.add_argument("--hidden-sizes", help="hidden sizes to measure arithmetic at (default: 64,256,768 on a "
                                                  "CPU, 512,2048,4096 on a GPU); the plan interpolates between them")
    calibrate.add_argument("--seconds", type=float, default=1.0, help="least seconds of each timing (default 1)")
    calibrate.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")

    predict = commands.add_parser("predict", help="batch inference over a JSON-lines file, through Ray Data")
    predict.add_argument("source", metavar="RUN_OR_EXPORT", help="a finished run's folder, or a `rayeff export` folder")
    predict.add_argument("--input", required=True, help="JSON-lines file, one example object per line")
    predict.add_argument("--output", required=True, help="new JSON-lines file: each input line plus `prediction`")
    predict.add_argument("--workers", type=int, help="model replicas (default: the job's scaling.num_workers)")
    predict.add_argument("--batch-size", type=int, default=64, help="lines per forward (default 64)")
    predict.add_argument("--max-new-tokens", type=int, default=32, help="causal LM: tokens generated per line")
    predict.add_argument("--temperature", type=float, default=0.0,
                         help="causal LM: 0 (default) decodes greedily; above 0, samples at this temperature")
    predict.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability (default 1)")
    predict.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens")
    predict.add_argument("--seed", type=int, default=0, help="sampling: seed (with each prompt: the same answers on "
                                                             "any number of workers)")
    predict.add_argument("--address", help=_ADDRESS_HELP)

    tune = commands.add_parser("tune", help="run a hyper-parameter sweep (Ray Tune + Optuna)")
    tune.add_argument("sweep", help="sweep YAML file (see jobs/sweep-*.yaml)")
    _file_options(tune, "sweep", "continue the sweep in the output folder",
                  data_dir="GLUE data in its download layout (sets the base job's data.data_dir)",
                  example="num_trials=4 or --set overrides.training.lr=1e-3")
    tune.add_argument("--address", help=_ADDRESS_HELP)
    tune.add_argument("--no-progress", action="store_true", help="no live table of trials")

    priors = commands.add_parser("priors", help="inspect the store of finished sweeps that warm-start new ones")
    views = priors.add_subparsers(dest="view", required=True)
    for name, text in (("list", "one line per stored sweep"), ("show", "one stored sweep, as JSON"),
                       ("remove", "drop a stored sweep, so that no later sweep is warm-started from it")):
        view = views.add_parser(name, help=text)
        if name != "list":
            view.add_argument("id", type=int, help="the sweep's id (from `rayeff priors list`)")
        view.add_argument("--store", default="runs/priors.db", help="the prior store (default runs/priors.db)")

    report = commands.add_parser("report", help="an HTML page with plots of a run, a sweep or a `bench compare` "
                                                "JSON (the PNGs written beside it)")
    report.add_argument("path", metavar="PATH", help="a run folder, a sweep folder, or a bench compare JSON file")
    report.add_argument("--output", required=True, help="the HTML file to write (FILE-<figure>.png beside it)")

    submit = commands.add_parser("submit", help="submit a job or a sweep to a Ray cluster (Ray's Jobs API)")
    submit.add_argument("file", help="job or sweep YAML file; validated here before anything is submitted")
    _file_options(submit, "job (or sweep)", "continue the run or sweep in the output folder",
                  data_dir="GLUE data folder as the cluster sees it (sets data.data_dir)",
                  output="output folder as the cluster sees it: shared storage or s3://, gs://")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("--address", help=_DASHBOARD_HELP)

    jobs = commands.add_parser("jobs", help="list, inspect, follow and stop submitted jobs")
    actions = jobs.add_subparsers(dest="action", required=True)
    for name, text in (("list", "every job on the cluster, newest first"), ("status", "one job's status"),
                       ("logs", "one job's logs"), ("stop", "stop a running job")):
        action = actions.add_parser(name, help=text)
        if name != "list":
            action.add_argument("id", help="submission id (printed by `rayeff submit`, listed by `rayeff jobs list`)")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until the job ends")
        action.add_argument("--address", help=_DASHBOARD_HELP)

    status = commands.add_parser("status", help="live runs and sweep trials on a Ray cluster, with energy so far")
    status.add_argument("--address", default="auto",
                        help="the cluster's GCS address (default: the Ray running on this machine)")

    bench = commands.add_parser("bench", help="benchmarks that write JSON")
    kinds = bench.add_subparsers(dest="bench", required=True)
    compare = kinds.add_parser("compare", help="run one job once per method and compare cost and quality")
    compare.add_argument("--job", required=True, help="job YAML file; its method section is replaced per method")
    compare.add_argument("--methods", default="full,lora,read", help="comma-separated method names")
    _bench_output(compare)
    compare.add_argument("--runs-dir", help="folder for the per-method runs (default: next to --output)")
    compare.add_argument("--per-method", action="append", default=[], metavar="METHOD:FIELD=VALUE",
                         help="override a field for one method only, e.g. read:training.lr=1e-3 (repeatable)")
    compare.add_argument("--target", metavar="full|VALUE", nargs="?", const="full",
                         help="also report each method's energy, time and steps to reach this dev metric (full: "
                              "full fine-tuning's final one), evaluated every --eval-every steps")
    compare.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps (sets "
                                                                     "training.eval_every for every method)")
    _job_options(compare)
    bplan = kinds.add_parser("plan", help="`rayeff plan` against real runs: predicted / measured per term of the "
                                           "tensor account, per method, ZeRO stage and worker count")
    bplan.add_argument("--job", required=True, help="job YAML file, e.g. jobs/bench-plan.yaml")
    bplan.add_argument("--methods", default="full,lora,read,adazeta,mezo", help="comma-separated method names")
    bplan.add_argument("--stages", default="0,1,2,3", help="ZeRO stages of the first-order methods")
    bplan.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    _bench_output(bplan)
    bplan.add_argument("--runs-dir", help="folder for the runs (default: next to --output)")
    bplan.add_argument("--calibration", metavar="CAL.json", help="a `rayeff calibrate` file of this machine: also "
                                                                "compare the plan's seconds per step with the runs'")
    _job_options(bplan)
    zo = kinds.add_parser("zo", help="AdaZeta against MeZO-LoRA, on 1 and 2 workers, against inference and full")
    zo.add_argument("--job", required=True, help="an adazeta (or mezo) job YAML file, e.g. jobs/bench-zo.yaml")
    _bench_output(zo)
    zo.add_argument("--runs-dir", help="folder for the runs (default: next to --output)")
    zo.add_argument("--loss-target", type=float, default=0.6, help="training loss to reach (default 0.6)")
    zo.add_argument("--window", type=int, default=5, help="steps the training loss is averaged over (default 5)")
    zo.add_argument("--queries", type=int, default=8, help="queries per step of the 1- vs 2-worker timing")
    zo.add_argument("--timing-steps", type=int, default=6, help="steps of each timing run (default 6)")
    _job_options(zo)
    moe = kinds.add_parser("moe", help="dense fine-tuning against upcycled MoE (E experts, top-k) on the same data")
    moe.add_argument("--job", required=True, help="a dense or moe job YAML file, e.g. jobs/bench-moe.yaml")
    _bench_output(moe)
    moe.add_argument("--experts", default="4,8", help="comma-separated expert counts (default 4,8)")
    moe.add_argument("--top-k", default="1,2", help="comma-separated top-k values (default 1,2)")
    moe.add_argument("--runs-dir", help="folder for the runs (default: next to --output)")
    _job_options(moe)
    pri = kinds.add_parser("priors", help="trials to a target dev metric with and without transferred priors")
    pri.add_argument("--sweep", default="jobs/sweep-bench-priors.yaml", help="the sweep run on every task")
    pri.add_argument("--sources", default="sst2", help="comma-separated tasks the priors are built from")
    pri.add_argument("--targets", default="stsb", help="comma-separated tasks the sweeps are measured on")
    pri.add_argument("--seeds", default="0,1,2", help="comma-separated sampler seeds (at least 3 for a median)")
    pri.add_argument("--target-fraction", type=float, default=0.99,
                     help="target: this fraction of the best dev metric seen on the task (default 0.99)")
    pri.add_argument("--table", help="replay sweeps from this table (`rayeff bench table`) instead of running them: "
                                     "every strategy, each task left out in turn, --replay-seeds seeds")
    pri.add_argument("--replay-seeds", type=int, default=30, help="with --table: sampler seeds per target (default 30)")
    pri.add_argument("--source-trials", type=int, default=24,
                     help="with --table: trials of each source's replayed earlier sweep (default 24)")
    pri.add_argument("--max-trials", type=int,
                     help="with --table: trials per replayed sweep (default: the grid's size)")
    pri.add_argument("--strategies", help="with --table: comma-separated, from random, cold_tpe, transfer_none, "
                                          "transfer_ensemble, transfer_weighted, transfer_enqueue, cmaes_warm "
                                          "(default: all)")
    _bench_output(pri)
    pri.add_argument("--runs-dir", help="folder for the sweeps and stores (default: next to --output)")
    pri.add_argument("--data-dir", help="GLUE data in its download layout")
    pri.add_argument("--address", help="join the Ray cluster at this address instead of starting a local Ray")
    table = kinds.add_parser("table", help="finished grid sweeps gathered into one table for `bench priors --table`")
    table.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR", help="grid sweep folders; each names a task")
    table.add_argument("--made-by", help="the command or script that ran the sweeps, kept in the table")
    _bench_output(table)
    return parser


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _overrides(args: argparse.Namespace, output: str | None = None) -> list[str]:
    """The --set overrides, and output_dir when an output folder is given."""
    return list(args.overrides) + ([f"output_dir={output}"] if output else [])


def job_from_args(path: str, args: argparse.Namespace, output: str | None = None):
    from rayeff.config import load_job

    overrides = _overrides(args, output)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "resume", False):
        overrides.append("resume=true")
    return load_job(path, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from rayeff.plan.fit import check_run_fits
    from rayeff.train.runner import run_job

    from rayeff.train.state import INTERRUPTED

    job = job_from_args(args.job, args, args.output)
    warning = check_run_fits(job, args.memory_per_worker, args.address, args.strict)
    if warning:
        print(warning, file=sys.stderr)
    result = run_job(job, address=args.address, show_progress=not args.no_progress)
    print(f"rayeff: wrote {result['output_dir']}/result.json")
    if result["status"] == INTERRUPTED:
        print(f"rayeff: interrupted at step {result['time']['steps']}; `rayeff run ... --resume` continues it",
              file=sys.stderr)
        return 130
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rayeff.export import export_run

    out, form = export_run(args.run_dir, args.output, adapter_only=args.adapter_only)
    kind = {"adapter": "a PEFT adapter", "language_model": "a Hugging Face language model",
            "sequence_classifier": "a Hugging Face sequence classifier",
            "rayeff": "the trained tensors and the base model's reference (load with rayeff.load)"}[form]
    print(f"rayeff: wrote {kind} to {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rayeff.checks import check_output_file
    from rayeff.cluster.storage import write_json_atomic
    from rayeff.config import load_job
    from rayeff.plan.calibration import load_calibration
    from rayeff.plan.planner import method_names, plan_job
    from rayeff.plan.shapes import plan_model_config

    overrides = list(args.overrides)
    if args.workers is not None:
        if args.workers < 1:
            raise UserError(f"--workers: {args.workers}; give 1 or more")
        overrides.append(f"scaling.num_workers={args.workers}")
    if args.gpu_memory is not None and not 0 < args.gpu_memory < 1e6:
        raise UserError(f"--gpu-memory: {args.gpu_memory}; give one GPU's memory in GB (1e9 bytes), e.g. 80")
    out = check_output_file(args.json, "--json", args.overwrite) if args.json else None
    calibration = load_calibration(args.calibration) if args.calibration else None
    job = load_job(args.job, overrides)
    names = method_names(job, args.methods)
    gpu_bytes = None if args.gpu_memory is None else int(args.gpu_memory * 1e9)
    plan = plan_job(job, plan_model_config(job.model.name), names, gpu_bytes, calibration)
    print(f"{plan.model} · {plan.task} · {plan.workers} worker(s), {plan.batch_per_worker} x {plan.max_seq_length} "
          f"tokens each · ZeRO-{plan.zero_stage} {plan.precision}   (GB per worker)")
    print(f"{'method':<9}{'trainable':>13}{'params':>9}{'grads':>9}{'opt|snap':>9}{'activ':>9}{'total':>9}  fits  "
          "sent/step")
    for name, m in plan.methods.items():
        mem = m.memory_per_worker_bytes
        fits = {True: "yes", False: "NO", None: "-"}[m.fits]
        print(f"{name:<9}{m.trainable_params:>13,}" + "".join(f"{v / 1e9:>9.3f}" for v in (
            mem.parameters, mem.gradients, mem.optimizer_state + mem.perturbation_snapshot, mem.activations,
            mem.total)) + f"  {fits:<5} {m.comm_bytes_per_step / 1e6:,.1f} MB ({m.comm_kind})")
    if calibration is not None:
        _print_plan_time(plan, calibration)
    for name, why in plan.refused.items():
        print(f"{name:<9}cannot run this job: {why}")
    if not plan.methods:
        raise UserError("--methods: no method could be planned for this job (reasons above)")
    if out is not None:
        write_json_atomic(out, plan.model_dump(mode="json"))
        print(f"rayeff: wrote {out}")
    return 0


def _print_plan_time(plan, calibration) -> None:
    from rayeff.measure.energy import source_label

    print(f"\ntime and energy per step, from the calibration of {calibration.device} ({calibration.threads} "
          f"thread(s), {calibration.measured_at}); energy: {source_label(calibration.energy_source)}")
    for name, m in plan.methods.items():
        t = m.time
        terms = ", ".join(f"{k} {'not measured' if v is None else f'{v * 1e3:,.1f} ms'}" for k, v in t.seconds.items())
        total = "" if t.steps is None else \
            f"; {t.steps:,} steps: {t.seconds_total:,.2f} s, {t.joules_total:,.2f} J"
        q = t.queries_per_step
        queries = "" if q is None else f" at {q:g} quer{'y' if q == 1 else 'ies'}"
        print(f"{name:<9}{m.flops_per_step / 1e9:,.3f} GFLOP{queries}: {t.seconds_per_step * 1e3:,.1f} ms "
              f"({terms}), {t.joules_per_step:,.3f} J{total}")
    if calibration.energy_source == "estimate":
        print(f"energy is an estimate: {calibration.energy_formula}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from rayeff.checks import check_output_file
    from rayeff.cluster.storage import write_json_atomic
    from rayeff.measure.energy import source_label
    from rayeff.plan.calibration import calibrate

    out = check_output_file(args.output, "--output", args.overwrite)
    if args.threads < 1:
        raise UserError(f"--threads: {args.threads}; give 1 or more")
    if not 0 < args.seconds <= 60:
        raise UserError(f"--seconds: {args.seconds}; give a time between 0 and 60")
    try:
        sizes = [int(x) for x in _names(args.hidden_sizes)] if args.hidden_sizes else None
    except ValueError:
        raise UserError("--hidden-sizes: expected comma-separated integers, e.g. 64,256,768") from None
    if sizes is not None and (not sizes or min(sizes) < 1):
        raise UserError(f"--hidden-sizes: {args.hidden_sizes!r}; give sizes of 1 or more")
    result = calibrate(args.device, args.threads, sizes, args.seconds)
    write_json_atomic(out, result.model_dump(mode="json"))
    print(f"{result.device}, {result.threads} thread(s): {result.op_seconds * 1e6:.2f} us per operator call; "
          + ", ".join(f"h={t.hidden_size} {t.forward_flops_per_s / 1e9:,.1f}/{t.backward_flops_per_s / 1e9:,.1f} "
                      "GFLOP/s" for t in result.throughput)
          + f" (forward/backward); {result.watts:,.1f} W ({source_label(result.energy_source)}); wrote {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rayeff.generation import Sampling
    from rayeff.predict import predict_file

    for name in ("workers", "batch_size", "max_new_tokens", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"--temperature {args.temperature:g} / --top-p {args.top_p:g}: the temperature is at least 0 "
                        "and top-p in (0, 1]")
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed) if args.temperature > 0 else None
    if sampling is None and (args.top_k is not None or args.top_p != 1.0):
        raise UserError("--top-p and --top-k shape sampling; set --temperature above 0 (0 decodes greedily)")
    report = predict_file(args.source, args.input, args.output, args.workers, args.batch_size, args.max_new_tokens,
                          args.address, sampling)
    print(f"rayeff: wrote {report['lines']} predictions to {args.output} in {report['seconds']:.1f} s "
          f"({report['lines_per_second']:.1f} lines/s on {report['workers']} worker(s))")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rayeff.tune.sweep import run_sweep

    report = run_sweep(args.sweep, _overrides(args, args.output), data_dir=args.data_dir, address=args.address,
                       resume=args.resume, show_progress=not args.no_progress)
    best, energy = report["best"], report["energy"]
    for t in report["trials"]:
        spent = energy_label(t["energy"]) if t.get("energy") else "no energy reported"
        print(f"  trial {t['number']}: {t['status']}, objectives {t['objectives']}, {spent}, {t['params']}")
    print(f"rayeff: best: {best['params']} -> {best['objectives']}" if best else "rayeff: no feasible trial")
    priors = report["priors"]
    if priors is not None:
        weights = priors.get("last_weights") or {}
        sources = ", ".join(f"{s['name']} (weight {weights.get(s['name'], 0.0):.2f})" for s in priors["sweeps"])
        print(f"rayeff: priors ({priors['method']}): {sources or 'no stored sweep of this method'}"
              + (f"; this sweep's own model {weights['target']:.2f}" if "target" in weights else ""))
    print(f"rayeff: {len(report['trials'])} trials, "
          f"{energy_label({'joules': energy['total_j'], 'source': '+'.join(energy['sources'])})}"
          + (f"; stopped by the {energy['stopped_by']}" if energy["stopped_by"] else ""))
    print(f"rayeff: wrote {report['output_dir']}/sweep.json")
    if report["interrupted"]:
        print(f"rayeff: interrupted: the running trials stopped with a checkpoint; `rayeff tune {args.sweep} --resume` "
              "continues them and the sweep", file=sys.stderr)
        return 130
    return 0


def cmd_priors(args: argparse.Namespace) -> int:
    from rayeff.tune.priors import PriorStore, best_trials

    store = PriorStore(args.store)
    if args.view == "show":
        print(json.dumps(store.entry(args.id), indent=2))
        return 0
    if args.view == "remove":
        removed = store.remove(args.id)
        print(f"rayeff: removed sweep {args.id} ({removed['name']}) from {args.store}")
        return 0
    for e in store.entries():
        d, best, objective = e["descriptors"], best_trials(e, 1), e["objectives"][0]
        outcome = f"best {objective['metric']} {best[0]['objectives'][0]:.4g}" if best else "no feasible trial"
        print(f"{e['id']:>4}  {e['finished_at']}  {d['method']:<8} {d['task']:<6} {d['model']:<12} "
              f"n={d['train_size']:<6} {len(e['trials'])} trials  {outcome}  {e['name']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rayeff.report.page import write_report

    written = write_report(args.path, args.output)
    print(f"rayeff: wrote {written['html']} ({written['kind']}, {len(written['figures'])} figures beside it)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from rayeff.cluster.jobs import submit

    cluster, submission_id, output = submit(args.file, _overrides(args, args.output), args.data_dir, args.address,
                                            args.resume)
    print(submission_id, flush=True)
    print(f"rayeff: submitted to {cluster.address}; output: {output}", file=sys.stderr)
    if not args.follow:
        print(f"rayeff: follow it with `rayeff jobs logs {submission_id} --follow`", file=sys.stderr)
        return 0
    return _ended(submission_id, cluster.follow(submission_id))


def _ended(submission_id: str, status: str) -> int:
    print(f"rayeff: job {submission_id} {status.lower()}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from rayeff.cluster.jobs import Cluster, job_rows

    cluster = Cluster(args.address)
    if args.action == "list":
        for r in job_rows(cluster):
            print(f"{r['id']:<40} {r['status']:<10} {r['started']}  {r['kind']:<5} {r['file']:<28} {r['output_dir']}")
    elif args.action == "status":
        print(cluster.status(args.id))
    elif args.action == "logs":
        if args.follow:
            return _ended(args.id, cluster.follow(args.id))
        print(cluster.call("get_job_logs", args.id), end="")
    else:
        stopped = cluster.call("stop_job", args.id)
        print(f"rayeff: {'stopping' if stopped else 'not running'}: {args.id} ({cluster.status(args.id)})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    from rayeff.cluster.live import BOARD_NAME, BOARD_NAMESPACE, status_text
    from rayeff.cluster.connect import init_ray

    init_ray(args.address, 0)
    try:
        board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
    except ValueError:
        print("rayeff: no run has reported on this cluster yet")
        return 0
    lines = ray.get(board.snapshot.remote())
    for line in sorted(lines, key=lambda x: x["state"] != "running"):   # live ones first
        print(status_text(line, time.time()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "table":
        from rayeff.bench.table import build_table

        table = build_table(args.sweeps, args.output, made_by=args.made_by, overwrite=args.overwrite)
        print(f"rayeff: {len(table['tasks'])} tasks x {len(next(iter(table['tasks'].values()))['configurations'])} "
              f"configurations of {table['method']}; wrote {args.output}")
        return 0
    if args.bench == "priors" and args.table:
        from rayeff.bench.replay import STRATEGIES, bench_priors_table

        strategies = tuple(_names(args.strategies)) if args.strategies else STRATEGIES
        report = bench_priors_table(args.table, args.output, seeds=args.replay_seeds, source_trials=args.source_trials,
                                    max_trials=args.max_trials, strategies=strategies, overwrite=args.overwrite)
        for name, figures in report["strategies"].items():
            ratios = (f" (x{figures['ratio_top5']:.2f}, x{figures['ratio_top1']:.2f} of cold TPE)"
                      if "ratio_top5" in figures else "")
            print(f"  {name:18s} median trials to top 5%: {figures['median_top5']:g}, to top 1%: "
                  f"{figures['median_top1']:g}{ratios}")
        print(f"rayeff: wrote {args.output} and {report['plot']}")
        return 0
    if args.bench == "priors":
        from rayeff.bench.priors import bench_priors

        try:
            seeds = [int(s) for s in _names(args.seeds)]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        report = bench_priors(args.sweep, _names(args.sources), _names(args.targets), seeds, args.output,
                              runs_dir=args.runs_dir, data_dir=args.data_dir, address=args.address,
                              target_fraction=args.target_fraction, overwrite=args.overwrite)
        print(f"rayeff: median trials to target {report['median_with_priors']} with priors, "
              f"{report['median_without_priors']} without (ratio {report['ratio']:.2f}); wrote {args.output}")
        return 0
    job = job_from_args(args.job, args)
    if args.bench == "moe":
        from rayeff.bench.moe import bench_moe

        try:
            experts, top_ks = [int(x) for x in _names(args.experts)], [int(x) for x in _names(args.top_k)]
        except ValueError:
            raise UserError("--experts, --top-k: expected comma-separated integers, e.g. 4,8") from None
        bench_moe(job, args.output, experts, top_ks, runs_dir=args.runs_dir, address=args.address,
                  show_progress=not args.no_progress, overwrite=args.overwrite)
        return 0
    if args.bench == "plan":
        from rayeff.bench.plan import bench_plan
        from rayeff.plan.calibration import load_calibration
        from rayeff.plan.planner import method_names

        try:
            stages = sorted({int(x) for x in _names(args.stages)})
            workers = sorted({int(x) for x in _names(args.workers)})
        except ValueError:
            raise UserError("--stages, --workers: expected comma-separated integers, e.g. 0,1,2,3") from None
        if not set(stages) <= {0, 1, 2, 3} or min(workers, default=1) < 1:
            raise UserError(f"--stages {args.stages!r}, --workers {args.workers!r}: stages are 0-3, workers 1 or more")
        calibration = load_calibration(args.calibration) if args.calibration else None
        report = bench_plan(job, method_names(job, args.methods), stages, workers, args.output,
                            runs_dir=args.runs_dir, address=args.address, show_progress=not args.no_progress,
                            overwrite=args.overwrite, calibration=calibration)
        print(f"rayeff: {len(report['cases'])} runs; largest |predicted / measured - 1| per term: "
              + ", ".join(f"{t} {e:.4f}" for t, e in report["largest_relative_error"].items() if e is not None)
              + ("" if "time_ratio_range" not in report else
                 "; time per step predicted / measured {:.2f}-{:.2f}".format(*report["time_ratio_range"]))
              + f"; wrote {args.output}")
        return 0
    if args.bench == "zo":
        from rayeff.bench.zo import bench_zo

        bench_zo(job, args.output, runs_dir=args.runs_dir, loss_target=args.loss_target, window=args.window,
                 queries=args.queries, timing_steps=args.timing_steps, address=args.address,
                 show_progress=not args.no_progress, overwrite=args.overwrite)
        return 0
    from rayeff.bench.compare import compare_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    compare_methods(job, methods, args.output, runs_dir=args.runs_dir, address=args.address,
                    show_progress=not args.no_progress, per_method=args.per_method, overwrite=args.overwrite,
                    target=args.target, eval_every=args.eval_every)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "address", None):
        from rayeff.cluster.connect import keep_local_ray_on_loopback

        keep_local_ray_on_loopback()
    from rayeff.quiet import quiet_libraries

    quiet_libraries()
    try:
        commands = {"run": cmd_run, "export": cmd_export, "predict": cmd_predict, "tune": cmd_tune,
                    "priors": cmd_priors, "plan": cmd_plan, "calibrate": cmd_calibrate, "report": cmd_report,
                    "submit": cmd_submit,
                    "jobs": cmd_jobs, "status": cmd_status, "bench": cmd_bench}
        return commands[args.command](args)
    except UserError as err:
        print(f"rayeff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayeff: interrupted; re-run with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:  # a failure inside training: its first line here, the whole story in Ray's logs
        if os.environ.get("RAYEFF_DEBUG"):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"rayeff: failed: {type(err).__name__}: {first}\n  worker logs: /tmp/ray/session_latest/logs; "
              "set RAYEFF_DEBUG=1 for the traceback; --resume continues from the last checkpoint", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
