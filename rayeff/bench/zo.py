"""`rayeff bench zo`: AdaZeta against its baselines and against itself on more workers, in one run on one machine.

    rayeff bench zo --job jobs/bench-zo.yaml --output zo.json --data-dir ../shared/data/glue

(a) convergence: adazeta and mezo-lora with the job's lr, eps, batch, steps and k-shot data; the first step at
    which each one's training loss (mean over a window of steps, as single steps are noisy) reaches `--loss-target`,
    the queries spent until then (adazeta spends more per step), and their final dev metrics;
(b) query parallelism: wall time per step at a fixed Q with 1 and with 2 workers, each worker on one CPU thread in
    both runs (median over steps), the parallel efficiency t1 / (2 t2), and each run's steps against their floor
    (the busiest worker's 2 ceil(Q / N) forwards at the time per forward the run measured, and nothing else);
(c) memory: adazeta's exact tensor account and device peak against an inference-only pass of the same model
    without adapters, measured as the run measures itself: in a worker process of its own on the resources of one
    of the run's workers (same threads, device and precision), the same device-peak measure (DevicePeak, taken from
    the same point) and saved-tensor counter, forwards without autograd over the batches the run trained on and the
    dev set in the run's evaluation batches; and against full fine-tuning (a short run of the same job with method
    full, ZeRO 0). AdaZeta's account exceeds the inference pass's by exactly its adapters and its perturbation
    snapshot;
(d) the TT adapters' forward time as a fraction of the backbone's, clocked inside forwards of the adapted model in
    this process on one training batch;
(e) batched queries: one step's Q queries one at a time and in groups of 2, 4, ... Q per vmapped forward, seconds
    and the largest difference in g_q;
(f) a scaling model for N = 1..256 workers from the parts the runs of (b) measured (see `scaling_model`).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rayeff.bench import output_and_runs_dir, run_measured
from rayeff.cluster.connect import init_ray
from rayeff.cluster.storage import write_json_atomic
from rayeff.config import JobSpec, validate_job
from rayeff.data.metrics import compute_metrics
from rayeff.data.task import task_of
from rayeff.data.tokenized import Collator, load_train_and_dev
from rayeff.errors import UserError
from rayeff.measure.energy import energy_label
from rayeff.measure.memory import DevicePeak, SavedActivationCounter
from rayeff.methods import get_method, method_config_from_dict
from rayeff.models import ModelSource, build_classifier, load_tokenizer, resolve_model
from rayeff.results import RunResult
from rayeff.train.query_batch import BatchedLosses
from rayeff.train.run_setup import RunSetup
from rayeff.train.spsa import MAX_QUERIES, Perturber, query_seed
from rayeff.train.state import batches_of, epoch_order
from rayeff.train.zeroth_order import PRECISIONS, AutocastForward, cast_frozen, prepare_model


def variant(job: JobSpec, runs: Path, name: str, method: dict | None = None, **sections) -> JobSpec:
    """The job with another method and/or sections changed, writing to runs/name."""
    raw = job.model_dump(mode="json")
    if method is not None:
        raw["method"] = method
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    raw["output_dir"], raw["resume"] = str(runs / name), False
    return validate_job(raw, f"{name} job")


def first_step_at(losses: list[float], target: float, window: int) -> int | None:
    """The first step (1-based) whose trailing mean loss over `window` steps is at or below `target`."""
    for end in range(window, len(losses) + 1):
        if statistics.fmean(losses[end - window:end]) <= target:
            return end
    return None


def convergence(job: JobSpec, runs: Path, target: float, window: int, show: bool, address: str | None) -> dict:
    adazeta = job.method.model_dump() if job.method.name == "adazeta" else {"name": "adazeta"}
    results = {"adazeta": run_measured(variant(job, runs, "adazeta", adazeta), address, show),
               "mezo-lora": run_measured(variant(job, runs, "mezo-lora", {"name": "mezo", "target": "lora",
                                                                        "eps": job.method.eps}), address, show)}
    metric = task_of(job.data).metrics[0]
    reached = {name: first_step_at(r.step_losses, target, window) for name, r in results.items()}
    out = {name: {"step_reaching_target": reached[name],
                  "queries_to_target": (sum(r.zeroth_order.step_queries[:reached[name]])
                                        if reached[name] else None),
                  "final_dev_metrics": r.metrics, "final_train_loss_window": statistics.fmean(
                      r.step_losses[-window:]), "steps": r.time.steps,
                  "queries_total": r.zeroth_order.queries_total,
                  "seconds_per_step": r.time.seconds_per_step, "energy": r.energy.dump(),
                  "step_losses": r.step_losses} for name, r in results.items()}
    a, m = out["adazeta"]["step_reaching_target"], out["mezo-lora"]["step_reaching_target"]
    out["steps_ratio_mezo_lora_to_adazeta"] = m / a if a and m else None
    qa, qm = out["adazeta"]["queries_to_target"], out["mezo-lora"]["queries_to_target"]
    out["queries_ratio_mezo_lora_to_adazeta"] = qm / qa if qa and qm else None
    out["dev_difference_adazeta_minus_mezo_lora"] = (results["adazeta"].metrics[metric]
                                                     - results["mezo-lora"].metrics[metric])
    return {"results": results, "summary": out}


def query_parallelism(job: JobSpec, runs: Path, queries: int, steps: int, show: bool, address: str | None) -> dict:
    fixed = {**job.method.model_dump(), "alpha": float(queries), "beta": 0.0, "q_target": None, "q_max": queries}
    if job.method.name != "adazeta":
        fixed = {"name": "adazeta", "alpha": float(queries), "beta": 0.0, "q_max": queries}
    per_workers = {}
    for workers in (1, 2):
        zo = run_measured(variant(job, runs, f"q{queries}-workers{workers}", fixed,
                                  training={"max_steps": steps, "epochs": None, "eval_every": None,
                                            "checkpoint_every": None},
                                  scaling={"num_workers": workers, "threads_per_worker": 1, "cpus_per_worker": 1}),
                          address, show).zeroth_order
        per_workers[workers] = {"median_seconds_per_step": statistics.median(zo.step_seconds),
                                "step_seconds": zo.step_seconds, "step_forward_seconds": zo.step_forward_seconds,
                                "seconds_per_forward": zo.seconds_per_forward, "step_over_floor": zo.step_over_floor,
                                "median_step_seconds_outside_forwards": zo.median_step_seconds_outside_forwards,
                                "forward_passes_per_worker_per_step": zo.forward_passes_per_worker_per_step,
                                "exchange_bytes_per_step": zo.exchange_bytes_per_step}
    t1, t2 = per_workers[1]["median_seconds_per_step"], per_workers[2]["median_seconds_per_step"]
    return {"queries_per_step": queries, "threads_per_worker": 1, "steps": steps,
            "workers_1": per_workers[1], "workers_2": per_workers[2],
            "speedup_t1_over_t2": t1 / t2, "parallel_efficiency": t1 / (2 * t2)}


def classifier_and_batch(job: JobSpec, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The job's seeded classifier (no method applied) and its first training batch, on `device`."""
    source, task = resolve_model(job.model.name), task_of(job.data)
    torch.manual_seed(job.training.seed)
    classifier = build_classifier(source, task.num_labels, job.model.dropout, job.model.pooling, job.model.head)
    tokenizer = load_tokenizer(source)
    train, _ = load_train_and_dev(job.data, tokenizer, job.training.max_seq_length)
    collate = Collator(tokenizer.pad_token_id, job.training.max_seq_length, job.training.padding == "max_length",
                       classifier.uses_token_types, task.is_regression)
    examples = [dict(train[i], index=i) for i in range(min(job.training.batch_size, len(train)))]
    return classifier, {k: v.to(device) for k, v in collate(examples).items()}


def inference_pass(job_dump: dict, source: dict, steps: int) -> dict:
    """The inference-only pass, in a fresh worker process set up as a training worker is (rayeff/train/worker.py,
    rayeff/train/zeroth_order.py): the same model without adapters (backbone frozen and cast to the job's precision,
    head float32, as adazeta leaves them), forwards without autograd over the first `steps` training batches of the
    run and over the dev set in the run's evaluation batches, with the run's device-peak measure and saved-tensor
    counter. Returns its tensor account (the zeroth-order worker's formula), device peak and dev metrics."""
    job = JobSpec.model_validate(job_dump)
    if job.scaling.threads_per_worker:
        torch.set_num_threads(job.scaling.threads_per_worker)
    device = torch.device("cuda", 0) if job.scaling.gpus_per_worker > 0 else torch.device("cpu")
    peak = DevicePeak(device)
    task = task_of(job.data)
    torch.manual_seed(job.training.seed)
    src = ModelSource(**source)
    tokenizer = load_tokenizer(src)
    train, dev = load_train_and_dev(job.data, tokenizer, job.training.max_seq_length)
    model = build_classifier(src, task.num_labels, job.model.dropout, job.model.pooling, job.model.head)
    collate = Collator(tokenizer.pad_token_id, job.training.max_seq_length, job.training.padding == "max_length",
                       model.uses_token_types, task.is_regression)
    model.freeze_backbone()
    model.to(device)
    dtype = PRECISIONS[job.deepspeed.precision]
    cast_frozen(model, dtype)
    model.eval()
    module = model if dtype == torch.float32 else AutocastForward(model, dtype)
    counter = SavedActivationCounter(model)
    forwards, epoch, predictions, labels = 0, 0, [], dev["label"]
    with torch.no_grad():
        while forwards < steps:
            for idx in batches_of(epoch_order(len(train), 0, 1, job.training.seed, epoch), job.training.batch_size):
                batch = {k: v.to(device) for k, v in collate([dict(train[i], index=i) for i in idx]).items()}
                with counter:
                    module(**batch)
                forwards += 1
                if forwards == steps:
                    break
            epoch += 1
        order = epoch_order(len(dev), 0, 1, 0, 0, shuffle=False)
        for idx in batches_of(order, job.micro_batch_size()):
            batch = {k: v.to(device) for k, v in collate([dict(dev[i], index=i) for i in idx]).items()}
            with counter:
                logits = module(**batch).float()
            predictions += (logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).cpu().tolist()
    params = list(module.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    return {"total_params": sum(p.numel() for p in params), "param_bytes": param_bytes, "buffer_bytes": buffer_bytes,
            "grad_bytes": 0, "optimizer_state_bytes": 0, "peak_activation_bytes": counter.peak_bytes,
            "tensor_account_bytes": param_bytes + buffer_bytes + counter.peak_bytes,
            "peak_device_bytes": peak.peak_bytes(), "peak_device_kind": peak.kind,
            "precision": job.deepspeed.precision, "training_batches": forwards,
            "dev_metrics": compute_metrics(task.metrics, predictions, [labels[i] for i in order])}


def start_inference_pass(job: JobSpec, steps: int, address: str | None = None):
    """`inference_pass` started in a worker process of its own on the resources of one of the job's workers; returns
    its object ref. A new process, so that its peak is its own: its runtime environment differs from every other
    worker's (no idle worker can take it) and it exits after the one call."""
    import ray

    raw = job.model_dump(mode="json")
    if raw["data"]["data_dir"] is not None:
        raw["data"]["data_dir"] = str(Path(raw["data"]["data_dir"]).resolve())
    init_ray(address, job.scaling.cpus_per_worker)   # (joined already by the runs before it)
    task = ray.remote(max_calls=1)(inference_pass).options(
        num_cpus=job.scaling.cpus_per_worker, num_gpus=job.scaling.gpus_per_worker,
        runtime_env={"env_vars": {"RAYEFF_INFERENCE_PASS": "1"}})
    return task.remote(raw, asdict(resolve_model(job.model.name)), steps)


def memory(job: JobSpec, runs: Path, adazeta: RunResult, steps: int, show: bool, address: str | None) -> dict:
    import ray

    # The inference pass runs beside the full fine-tuning run where resources allow: both report memory only,
    # each of its own process.
    inference_ref = start_inference_pass(job, adazeta.time.steps, address)
    full = run_measured(variant(job, runs, "full", {"name": "full"}, training={"max_steps": steps, "epochs": None,
                                                                              "eval_every": None,
                                                                              "checkpoint_every": None},
                                deepspeed={"zero_stage": 0}), address, show)
    inference = ray.get(inference_ref)
    keys = ("trainable_params", "total_params", "param_bytes", "buffer_bytes", "grad_bytes", "optimizer_state_bytes",
            "peak_activation_bytes", "perturbation_snapshot_bytes", "tensor_account_bytes", "peak_device_bytes")
    a = {k: getattr(adazeta.memory, k) or 0 for k in keys}   # (no snapshot: None)
    f = {k: getattr(full.memory, k) or 0 for k in keys}
    difference = {k: a[k] - inference.get(k, 0) for k in ("total_params", "param_bytes", "buffer_bytes",
                                                          "peak_activation_bytes", "perturbation_snapshot_bytes",
                                                          "tensor_account_bytes", "peak_device_bytes")}
    return {"adazeta": a, "inference_only": inference, "full_fine_tuning": f,
            "adazeta_minus_inference": difference,
            "peak_device_kind": adazeta.memory.peak_device_kind,
            "adazeta_over_inference": a["tensor_account_bytes"] / inference["tensor_account_bytes"],
            "peak_device_adazeta_over_inference": (a["peak_device_bytes"] / inference["peak_device_bytes"]
                                                   if inference["peak_device_bytes"] else None),
            "adazeta_over_full": a["tensor_account_bytes"] / f["tensor_account_bytes"],
            "full_over_adazeta": f["tensor_account_bytes"] / a["tensor_account_bytes"],
            "peak_device_adazeta_over_full": (a["peak_device_bytes"] / f["peak_device_bytes"]
                                              if f["peak_device_bytes"] else None)}


def adapter_time(job: JobSpec, repeats: int = 30) -> dict:
    """The TT adapters' share of a forward of the adapted model on one training batch, on one CPU thread (as each
    worker runs) or the GPU if there is one: clocks inside the forward time the merge of every adapter's cores and
    each adapter's call, against the whole forward (medians over `repeats`). Timing two forwards, with and without
    adapters, and subtracting was tried: this machine's speed drifts by more than the adapters cost."""
    config = job.method if job.method.name == "adazeta" else method_config_from_dict({"name": "adazeta"})
    device = torch.device("cuda" if torch.cuda.is_available() and job.scaling.gpus_per_worker > 0 else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classifier, batch = classifier_and_batch(job, device)
        model = get_method("adazeta").build(classifier, config).to(device).eval()
        clock = AdapterClock(model, device)
        forwards, inside = [], []
        with torch.no_grad():
            for _ in range(repeats + 1):   # the first warms up and is dropped
                clock.reset()
                forwards.append(timed_call(lambda: model(**batch), device))
                inside.append(clock.seconds)
        clock.remove()
    finally:
        torch.set_num_threads(threads)
    forward, adapters = statistics.median(forwards[1:]), statistics.median(inside[1:])
    tokens = int(batch["attention_mask"].numel())
    flops = sum(a.down.flops(tokens) + a.up.flops(tokens) for a in model.adapters.values())
    return {"device": device.type, "batch_size": int(batch["input_ids"].shape[0]), "tokens": tokens,
            "adapters": len(model.adapters), "repeats": repeats, "model_forward_seconds": forward,
            "adapters_seconds": adapters, "backbone_forward_seconds": forward - adapters,
            "adapter_fraction_of_backbone": adapters / (forward - adapters),
            "adapter_flops_per_token": flops / tokens}


class AdapterClock:
    """Seconds an AdaZetaModel's forward spends in its adapters: from its start to its classifier's (merging the
    cores), plus each adapter's call; hooks, so that the forward timed is the one training runs."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.seconds, self.started = device, 0.0, {}
        self.handles = [model.register_forward_pre_hook(lambda *_: self._start("merge")),
                        model.classifier.register_forward_pre_hook(lambda *_: self._stop("merge"))]
        for key, adapter in model.adapters.items():
            self.handles += [adapter.register_forward_pre_hook(lambda *_, k=key: self._start(k)),
                             adapter.register_forward_hook(lambda *_, k=key: self._stop(k))]

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self, key: str) -> None:
        self.started[key] = self._now()

    def _stop(self, key: str) -> None:
        self.seconds += self._now() - self.started.pop(key)

    def reset(self) -> None:
        self.seconds = 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def timed_call(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def batched_queries(job: JobSpec, queries: int, repeats: int = 3) -> dict:
    """One step's `queries` queries on the job's first training batch, one at a time and in groups of B = 2, 4, ...
    up to Q (rayeff/train/query_batch.py), on one CPU thread or the GPU as a worker runs: seconds per step (median
    over interleaved repeats), the speed-up over one at a time, and the largest |g_q| difference from it."""
    device = torch.device("cuda" if torch.cuda.is_available() and job.scaling.gpus_per_worker > 0 else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = RunSetup.build(job, resolve_model(job.model.name), device)
        module, trained = prepare_model(run.model, device, PRECISIONS[job.deepspeed.precision])
        perturber = Perturber([p for _, p in trained], job.method.sparsity)
        perturber.begin_step()
        batch = run.batch(batches_of(epoch_order(len(run.train_set), 0, 1, job.training.seed, 0),
                                     job.training.batch_size)[0], device)
        losses = BatchedLosses(module, trained, lambda outputs, b: run.loss(outputs, b["labels"]))
        seeds, eps = [query_seed(job.training.seed, 0, q) for q in range(queries)], job.method.eps

        def sequential() -> list[float]:
            values = []
            with torch.no_grad():
                for seed in seeds:
                    for sign in (+1, -1):
                        perturber.set(seed, sign, eps)
                        values.append(run.loss(module(**batch), batch["labels"]).item())
            perturber.restore()
            return values

        def grouped(size: int) -> list[float]:
            return [v for lo in range(0, queries, size)
                    for v in losses(perturber.perturbed_rows(seeds[lo:lo + size], eps), batch).tolist()]

        sizes = sorted({1, *(2 ** k for k in range(1, queries.bit_length()) if 2 ** k < queries), queries})
        seconds: dict[int, list[float]] = {size: [] for size in sizes}
        values: dict[int, list[float]] = {}
        for _ in range(repeats):
            for size in sizes:
                start = time.perf_counter()
                values[size] = sequential() if size == 1 else grouped(size)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[size].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)

    def g(v: list[float]) -> list[float]:
        return [(v[2 * i] - v[2 * i + 1]) / (2 * eps) for i in range(queries)]

    t1 = statistics.median(seconds[1])
    return {"device": device.type, "queries": queries, "method": job.method.name, "repeats": repeats,
            "batch_size": int(batch["input_ids"].shape[0]), "tokens": int(batch["attention_mask"].numel()),
            "per_query_batch": {str(size): {"seconds_per_step": statistics.median(seconds[size]),
                                            "speedup_over_one_at_a_time": t1 / statistics.median(seconds[size]),
                                            "max_abs_g_difference": max(abs(a - b) for a, b in
                                                                        zip(g(values[size]), g(values[1])))}
                                for size in sizes}}


def scaling_model(b: dict, queries: int, workers: list[int]) -> dict:
    """Time per step on N workers from the parts the runs of (b) measured on the same batches: the busiest worker's
    2 ceil(Q / N) forwards at the 1-worker run's seconds per forward; the rest of a step on one worker (o: the
    median time outside forwards: perturbing, updating, metering); and the exchange, x2 = the 2-worker run's least
    time outside forwards (a step where neither worker waited for the other) less o, taken to grow as a ring
    all-reduce of 24 Q bytes does when latency-bound: 2 (N - 1) hops of x2 / 2. A model, not a measurement: it
    leaves out what (b) shows costs the most at N = 2, workers slowing each other's forwards when they share a
    machine and waiting for the slower one (`waiting_seconds_per_step`, measured at N = 2, grows with N), and it
    ignores bandwidth (24 Q bytes is small) and nodes."""
    one, two = b["workers_1"], b["workers_2"]
    forward, rest = one["seconds_per_forward"], one["median_step_seconds_outside_forwards"]
    outside_two = [t - f for t, f in zip(two["step_seconds"], two["step_forward_seconds"])]
    hop = max(0.0, min(outside_two) - rest) / 2

    def step(q: int, n: int) -> float:
        return 2 * math.ceil(q / n) * forward + rest + 2 * (n - 1) * hop

    def row(q: int, n: int) -> dict:
        t = step(q, n)
        return {"workers": n, "queries": q, "seconds_per_step": t, "speedup": step(q, 1) / t,
                "parallel_efficiency": step(q, 1) / (n * t)}

    return {"forward_seconds": forward, "rest_seconds_per_step": rest, "exchange_hop_seconds": hop,
            "waiting_seconds_per_step": statistics.median(outside_two) - min(outside_two),
            "forward_slowdown_at_2_workers": two["seconds_per_forward"] / forward,
            "formula": "t_N = 2 ceil(Q/N) t_fwd + o + 2 (N - 1) h (ring all-reduce, latency-bound); leaves out "
                       "waiting for the slowest worker and workers slowing each other on one machine",
            "at_bench_queries": [row(queries, n) for n in workers],
            "one_query_per_worker": [row(n, n) for n in workers]}


def bench_zo(job: JobSpec, output: str, runs_dir: str | None = None, loss_target: float = 0.6, window: int = 5,
             queries: int = 8, timing_steps: int = 6, full_steps: int = 3, address: str | None = None,
             show_progress: bool = True, overwrite: bool = False) -> dict:
    output_path, runs = output_and_runs_dir(output, runs_dir, overwrite)
    for flag, value in (("--queries", queries), ("--window", window), ("--timing-steps", timing_steps)):
        if value < 1:
            raise UserError(f"{flag}: must be at least 1, not {value}")
    if queries > MAX_QUERIES:
        raise UserError(f"--queries: {queries} is more than the {MAX_QUERIES} queries a step can take; use fewer")
    if get_method(job.method.name).loop != "zeroth_order":
        raise UserError(f"{job.method.name}: bench zo needs a job whose method is adazeta or mezo")
    if job.data.task_type in ("causal_lm", "prompted_classification"):
        raise UserError(f"data.task_type: bench zo measures classification and regression jobs (its inference pass "
                        f"builds a classifier), not {job.data.task_type}; give it one")
    conv = convergence(job, runs, loss_target, window, show_progress, address)
    report = {
        "task": job.data.display_name, "model": job.model.name, "k_shot": job.data.k_shot,
        "same_for_all": {"lr": job.training.lr, "batch_size": job.training.batch_size, "seed": job.training.seed,
                         "eps": job.method.eps},
        "loss_target": loss_target, "loss_window": window,
        "a_convergence": conv["summary"],
        "b_query_parallelism": query_parallelism(job, runs, queries, timing_steps, show_progress, address),
        "c_memory": memory(job, runs, conv["results"]["adazeta"], full_steps, show_progress, address),
        "d_adapter_time": adapter_time(job),
        "e_batched_queries": batched_queries(job, queries),
    }
    report["f_scaling_model"] = scaling_model(report["b_query_parallelism"], queries, [1, 2, 8, 16, 32, 64, 128, 256])
    write_json_atomic(output_path, report)
    Console(width=None if sys.stdout.isatty() else 160).print(summary_table(report))
    print(f"rayeff: wrote {output_path}")
    return report


def summary_table(report: dict) -> Table:
    table = Table(title=f"rayeff bench zo: {report['task']} ({report['model']}), {report['k_shot']}-shot")
    table.add_column("figure")
    table.add_column("value", justify="right")
    a, b, c, d = (report[k] for k in ("a_convergence", "b_query_parallelism", "c_memory", "d_adapter_time"))
    for name in ("adazeta", "mezo-lora"):
        table.add_row(f"(a) {name}: step (queries) reaching loss {report['loss_target']}",
                      f"{a[name]['step_reaching_target']} ({a[name]['queries_to_target']})")
        table.add_row(f"(a) {name}: dev", ", ".join(f"{k} {v:.4f}" for k, v in a[name]["final_dev_metrics"].items()))
        table.add_row(f"(a) {name}: energy", energy_label(a[name]["energy"]))
    table.add_row(f"(b) s/step at Q={b['queries_per_step']}: 1 worker / 2 workers",
                  f"{b['workers_1']['median_seconds_per_step']:.3f} / {b['workers_2']['median_seconds_per_step']:.3f}")
    table.add_row("(b) parallel efficiency t1 / (2 t2)", f"{b['parallel_efficiency']:.3f}")
    table.add_row("(c) tensor account: adazeta / inference-only", f"{c['adazeta_over_inference']:.4f}")
    peak = c.get("peak_device_adazeta_over_inference")
    table.add_row("(c) device peak: adazeta / inference-only", "n/a" if peak is None else f"{peak:.4f}")
    table.add_row("(c) tensor account: full fine-tuning / adazeta", f"{c['full_over_adazeta']:.2f}")
    for n in (1, 2):
        table.add_row(f"(b) {n} worker(s): step / floor of 2 ceil(Q/{n}) forwards; s per forward",
                      f"{b[f'workers_{n}']['step_over_floor']:.3f}; {b[f'workers_{n}']['seconds_per_forward']:.3f}")
    table.add_row("(b) 2 workers: forward slowdown; median wait for the other worker (s)",
                  f"{report['f_scaling_model']['forward_slowdown_at_2_workers']:.3f}; "
                  f"{report['f_scaling_model']['waiting_seconds_per_step']:.3f}")
    table.add_row("(d) adapter forward / backbone forward", f"{d['adapter_fraction_of_backbone']:.4f}")
    e = report["e_batched_queries"]
    for size, figures in e["per_query_batch"].items():
        table.add_row(f"(e) Q={e['queries']} in groups of {size}: s/step (speed-up, max |dg|)",
                      f"{figures['seconds_per_step']:.3f} ({figures['speedup_over_one_at_a_time']:.2f}x, "
                      f"{figures['max_abs_g_difference']:.1e})")
    f = report["f_scaling_model"]
    for row in f["at_bench_queries"] + f["one_query_per_worker"]:
        if row["workers"] > 2:
            table.add_row(f"(f) model: {row['workers']} workers, Q={row['queries']}: s/step (efficiency)",
                          f"{row['seconds_per_step']:.3f} ({row['parallel_efficiency']:.3f})")
    return table
