"""The zeroth-order training loop (adazeta, mezo): forward passes only, a step's SPSA queries split over the workers.

Every worker reads the same global minibatch and holds the same weights. At step t with Q queries (the schedule's),
worker r evaluates queries r, r + N, r + 2N, ... (N workers): for each, L(theta0 + eps z) and L(theta0 - eps z) with
z regenerated from the query's seed (rayeff/train/spsa.py), giving one scalar g_q. The workers then all-reduce a
Q x 3 table of int64 (seed, bits of g_q, bits of the query's mean loss), 24 Q bytes, each filling its own rows with
zeros elsewhere, so the sum is exact. Every worker replays all Q updates in query order from the seeds: replicas
stay bitwise identical, and N workers end with the same weights as one.

When Q < N the spare workers idle for that step (they still join the exchange). Giving them other data would make
the estimate depend on how many workers there are, and lose the 1-worker = N-worker equality; with AdaZeta's growing
schedule Q soon reaches N.

ZO forwards run without autograd and with dropout off: L+ and L- must differ only by the perturbation. When
`deepspeed.precision` puts the frozen backbone in bf16/fp16, its weight matrices are stored in that dtype and its
matrix products run under autocast, while the parameters that train, the norms and the residual stream stay float32
(perturbations of 1e-3 would vanish in bf16's 8-bit mantissa). A non-finite loss, or an update that overflows,
stops the run as `diverged` with the weights the step started from; its last checkpoint stays its final one.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rayeff.measure.memory import SavedActivationCounter
from rayeff.methods.zeroth_order_config import query_schedule
from rayeff.train.checkpointer import TRAINABLE_FILE, Checkpointer, read_state_file
from rayeff.train.collectives import max_over_workers
from rayeff.train.context import TrainContext
from rayeff.train.evaluation import evaluate
from rayeff.train.reporter import Reporter
from rayeff.train.run_setup import RunSetup
from rayeff.train.query_batch import BatchedLosses, auto_query_batch, busiest_worker_queries, query_groups
from rayeff.train.spsa import Perturber, QuerySchedule, query_seed
from rayeff.train.state import INTERRUPTED, TrainState, batches_from, batches_of, due, epoch_order, total_steps
from rayeff.train.step_meter import StepMeter
from rayeff.train.summary import memory_figures, run_summary

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXCHANGE_BYTES_PER_QUERY = 3 * 8   # int64 seed, float64 g_q, float64 loss


def train_loop(ctx: TrainContext, run: RunSetup, reporter: Reporter) -> None:
    """Train `run` on this worker to its end (or a stop), then evaluate, checkpoint and report the summary."""
    job, t, cfg, device = run.job, run.job.training, run.job.method, ctx.device

    def epoch_batches(epoch: int) -> list[list[int]]:   # the whole global batch on every worker
        return batches_of(epoch_order(len(run.train_set), 0, 1, t.seed, epoch), t.batch_size)

    steps_per_epoch = len(epoch_batches(0))
    total = total_steps(t, steps_per_epoch)
    schedule = query_schedule(cfg, total, steps_per_epoch)
    module, trained = prepare_model(run.model, device, PRECISIONS[job.deepspeed.precision])
    perturber = Perturber([p for _, p in trained], cfg.sparsity)
    activations = SavedActivationCounter(run.model)
    checkpointer = Checkpointer(ctx)
    state = checkpointer.restore(lambda folder: read_weights(trained, folder))
    meter = StepMeter.for_job(job.energy, device, ctx.rank, ctx.world_size, state)
    meter.start()

    def loss(batch: dict) -> float:   # no autograd: L+ and L- differ by the perturbation alone
        with torch.no_grad(), activations:
            return run.loss(module(**batch), batch["labels"]).item()

    batched_losses = BatchedLosses(module, trained, lambda outputs, batch: run.loss(outputs, batch["labels"]))
    forwards = ForwardClock()

    def query_losses(seeds: list[int], batch: dict, query_batch: int) -> list[tuple[float, float]]:
        """(L+, L-) of each query, one at a time or all in one batched forward; the forwards' time clocked."""
        if query_batch == 1:
            pairs = []
            for seed in seeds:
                perturber.set(seed, +1, cfg.eps)
                with forwards.timing(1):
                    plus = loss(batch)
                perturber.set(seed, -1, cfg.eps)
                with forwards.timing(1):
                    pairs.append((plus, loss(batch)))
            return pairs
        rows = perturber.perturbed_rows(seeds, cfg.eps)
        with activations, forwards.timing(len(rows)):
            values = batched_losses(rows, batch).tolist()
        return list(zip(values[0::2], values[1::2]))

    def write(folder: Path, _saved_state: dict) -> None:
        if ctx.rank == 0:   # every replica is identical
            save_file({n: p.detach().float().cpu().contiguous() for n, p in trained}, str(folder / TRAINABLE_FILE))

    status = "finished"
    for idx in batches_from(state, epoch_batches, total):
        batch = run.batch(idx, device)
        queries = schedule.queries(state.epoch, state.step)
        if cfg.query_batch != "auto":
            state.extra["query_batch"] = cfg.query_batch
        elif "query_batch" not in state.extra:   # chosen once and kept through a resume: the groups set the rounding
            state.extra["query_batch"] = auto_query_batch_for(run, device, lambda: loss(batch), perturber,
                                                              cfg.q_max, ctx.world_size)
        query_batch = state.extra["query_batch"]
        forwards.reset()
        with meter.step(state):
            perturber.begin_step()
            rows = torch.zeros(queries, 3, dtype=torch.int64)   # this worker's rows: (seed, g_q, mean loss)
            for group in query_groups(queries, query_batch, ctx.rank, ctx.world_size):
                seeds = [query_seed(t.seed, state.step, q) for q in group]
                for q, seed, (plus, minus) in zip(group, seeds, query_losses(seeds, batch, query_batch)):
                    g = (plus - minus) / (2 * cfg.eps)
                    rows[q] = torch.tensor([seed, float_bits(g), float_bits((plus + minus) / 2)])
            perturber.restore()
            seeds, grads, losses = exchange(rows, device, [query_seed(t.seed, state.step, q) for q in range(queries)])
            finite = all(math.isfinite(v) for v in grads + losses)
            if finite:
                lr = scheduled_lr(state.step, total, t.lr, t.warmup_ratio, t.lr_schedule)
                perturber.update(list(zip(seeds, grads)), lr, t.weight_decay)
                finite = perturber.all_finite()
                if not finite:   # the update overflowed: keep the step's starting weights, the last good ones
                    perturber.restore()
        state.extra.setdefault("step_seconds", []).append(meter.last_seconds)
        state.extra.setdefault("step_queries", []).append(queries)   # every other ZO count derives from these
        state.extra.setdefault("step_forward_seconds", []).append(forwards.seconds)
        state.extra.setdefault("step_forwards", []).append(forwards.count)
        if not finite:
            status = "diverged"
            break
        state.advance(sum(losses) / len(losses), t.batch_size)
        last = state.step >= total
        if reporter.interruptible and max_over_workers(reporter.stop_flag(), device) > 0 and not last:
            status = INTERRUPTED   # every worker heard it (rank 0 from the driver), after the same step
        if due(state.step, t.log_every) or last:
            energy = meter.energy(state)
            state.logged(energy)
            progress = reporter.progress(state, total, energy, query_progress(state))
            status = reporter.log(progress, energy) or status
        if due(state.step, t.eval_every) and not last and status == "finished":   # (a stop evaluates below)
            state.evaluated(evaluate(module, run, ctx), meter.energy(state))
        if due(state.step, t.checkpoint_every) and not last and status == "finished":
            energy = meter.energy(state)
            progress = reporter.progress(state, total, energy, query_progress(state))
            checkpointer.save(state, energy, {"progress": progress}, write)
        if last or status != "finished":
            break

    metrics = evaluate(module, run, ctx)
    energy = meter.energy(state)
    memory = memory_figures(zeroth_order_account(module, trained, activations, perturber), run.device_peak)
    figures = {"zeroth_order": zeroth_order_figures(state, ctx.world_size, cfg, schedule)}
    summary = run_summary(run, ctx, state, status, metrics, energy, memory, total, figures)
    # A diverged run holds the weights from before its bad step: its final checkpoint is new, the earlier kept.
    checkpointer.save(state, energy, summary, write, diverged=status == "diverged")
    reporter.end(status, energy, summary)


def prepare_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> tuple:
    """The model on the device with its frozen matrices in `dtype` and dropout off (for training too); returns
    what a forward calls and the trained (name, parameter) pairs."""
    model.to(device)
    cast_frozen(model, dtype)
    model.eval()
    module = model if dtype == torch.float32 else AutocastForward(model, dtype)
    return module, [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class ForwardClock:
    """The seconds this worker spends in forward passes during a step, and how many it ran (a batched forward of
    2B parameter sets counts 2B). `.item()` / `.tolist()` on the loss wait for the device, so the clock holds the
    forwards' whole time on a GPU too."""

    def __init__(self):
        self.seconds, self.count = 0.0, 0

    def reset(self) -> None:
        self.seconds, self.count = 0.0, 0

    @contextmanager
    def timing(self, forwards: int):
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start
        self.count += forwards


def auto_query_batch_for(run: RunSetup, device: torch.device, one_forward, perturber: Perturber, q_max: int,
                         world: int) -> int:
    """`query_batch: auto`, as rayeff/train/query_batch.py chooses it: on a GPU from its free memory and the measured
    transient memory of `one_forward()`."""
    free = forward = 0
    if device.type == "cuda":
        forward = run.device_peak.transient_bytes(one_forward)
        free = torch.cuda.mem_get_info(device)[0]
    return auto_query_batch(device, free, forward, perturber.snapshot_bytes, q_max, world)


def exchange(rows: torch.Tensor, device: torch.device, expected_seeds: list[int]) -> tuple[list, list, list]:
    """Every worker's rows summed (each filled its own, zeros elsewhere: the sum is exact); returns the seeds, the
    g_q and the mean losses of all the step's queries, in query order."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        on_device = rows.to(device)
        dist.all_reduce(on_device)
        rows = on_device.cpu()
    seeds = rows[:, 0].tolist()
    if seeds != expected_seeds:
        raise RuntimeError("workers disagree on the query seeds")
    return seeds, rows[:, 1].clone().view(torch.float64).tolist(), rows[:, 2].clone().view(torch.float64).tolist()


def read_weights(trained: list, folder: Path) -> dict:
    saved = load_file(str(folder / TRAINABLE_FILE))
    with torch.no_grad():
        for n, p in trained:
            p.copy_(saved[n].to(p.dtype))
    return read_state_file(folder)


def zeroth_order_account(module: torch.nn.Module, trained: list, activations: SavedActivationCounter,
                         perturber: Perturber) -> dict:
    params = list(module.parameters())
    return {"trainable_params": sum(p.numel() for _, p in trained),
            "total_params": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in module.buffers()),
            "grad_bytes": 0, "optimizer_state_bytes": 0,                    # none exist
            "peak_activation_bytes": activations.peak_bytes,               # measured: 0 without autograd
            "perturbation_snapshot_bytes": perturber.snapshot_bytes}       # theta0, for the exact restore


def query_counts(state: TrainState, world: int) -> dict:
    per_step = state.extra.get("step_queries", [])
    batch = state.extra.get("query_batch", 1)
    total, steps = sum(per_step), max(state.step, 1)
    busiest = [busiest_worker_queries(q, batch, world) for q in per_step]
    calls = sum(2 * b if batch == 1 else math.ceil(b / batch) for b in busiest)
    return {"queries_total": total, "queries_last_step": per_step[-1] if per_step else 0,
            "queries_per_second": total / max(state.train_seconds, 1e-9),
            "forward_passes_per_step": 2 * total / steps,
            "forward_passes_per_worker_per_step": 2 * sum(busiest) / steps,
            "query_batch": batch, "forward_calls_per_worker_per_step": calls / steps,
            "exchange_bytes_per_step": (EXCHANGE_BYTES_PER_QUERY * total if world > 1 else 0) / steps,
            "step_seconds": state.extra.get("step_seconds", []), "step_queries": per_step,
            **forward_floor(state, busiest)}


def forward_floor(state: TrainState, busiest: list[int]) -> dict:
    """This worker's time in forwards against its steps. The floor of a step is the busiest worker's 2 q forwards
    at the measured time per forward and nothing else (no perturbing, updating, exchange or waiting); rank 0, which
    reports, is always a busiest worker (it takes the first group)."""
    seconds, count = state.extra.get("step_forward_seconds", []), state.extra.get("step_forwards", [])
    per_forward = sum(seconds) / sum(count) if sum(count) else None
    floor = [2 * b * per_forward for b in busiest] if per_forward else []
    steps = state.extra.get("step_seconds", [])
    return {"step_forward_seconds": seconds, "seconds_per_forward": per_forward,
            "step_over_floor": sum(steps) / sum(floor) if floor and sum(floor) else None,
            "median_step_seconds_outside_forwards": (statistics.median(t - f for t, f in zip(steps, seconds))
                                                     if seconds else None)}


def query_progress(state: TrainState) -> dict:
    """The two query figures a progress line shows (query_counts' whole-run figures are for the summary)."""
    per_step = state.extra.get("step_queries", [])
    return {"queries": per_step[-1] if per_step else 0,
            "queries_per_second": sum(per_step) / max(state.train_seconds, 1e-9)}


def zeroth_order_figures(state: TrainState, world: int, cfg, schedule: QuerySchedule) -> dict:
    return {**query_counts(state, world),
            "schedule": {"alpha": cfg.alpha, "beta": schedule.beta, "q_max": cfg.q_max, "over": schedule.over,
                         "k_last": schedule.k_last, **({"note": schedule.note} if schedule.note else {})},
            "eps": cfg.eps,
            "queries_split": f"groups of {state.extra.get('query_batch', 1)} consecutive queries (one forward each), "
                             f"round-robin over {world} workers; spare workers idle when there are fewer groups"}


def float_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64))


def scheduled_lr(step: int, total: int, base: float, warmup_ratio: float, kind: str) -> float:
    """Linear warmup, then constant, linear decay to 0, or cosine decay to 0 (the first-order loop's schedules)."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


class AutocastForward(torch.nn.Module):
    """A model whose frozen matrices are bf16/fp16 (cast_frozen) run under autocast: matrix products in that dtype,
    their outputs back in float32, so that what trains (adapters, LoRA, head), norms and the residual stream stay
    float32. PEFT's LoRA layer, for one, casts its sum back to its base layer's output dtype: a bf16 output would
    round the perturbed LoRA term away."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype == dtype and weight.ndim == 2 and \
                    not isinstance(module, torch.nn.Embedding):
                module.register_forward_hook(_float32_output)

    def forward(self, **batch) -> torch.Tensor:
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=self.dtype):
            return self.model(**batch)


def _float32_output(_module, _inputs, output):
    return output.float() if isinstance(output, torch.Tensor) else output


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The frozen weight matrices (and embedding tables) to `dtype`, where the memory is; those that train, and
    1-D norm weights and biases, stay float32 (a float32 residual stream meets float32 norms)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.ndim >= 2:
            p.data = p.data.to(dtype)
