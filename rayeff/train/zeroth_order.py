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
(perturbations of 1e-3 would vanish in bf16's 8-bit mantissa). A non-finite loss, or an update that overflows, stops the run as `diverged`
with the weights the step started from; its last checkpoint stays its final one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rayeff.config import JobSpec
from rayeff.measure.memory import SavedActivationCounter
from rayeff.train.spsa import Perturber, QuerySchedule, query_seed
from rayeff.train.worker import (
    STATE_FILE,
    TRAINABLE_FILE,
    Worker,
    batches_of,
    epoch_order,
    loss_fn,
    total_steps,
)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXCHANGE_BYTES_PER_QUERY = 3 * 8   # int64 seed, float64 g_q, float64 loss


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


def query_schedule(job: JobSpec, steps_per_epoch: int) -> QuerySchedule:
    """The run's query schedule; every worker reads the whole global batch, so an epoch is ceil(n / batch) steps.
    The driver builds it too, before Ray starts, so that a target it cannot reach is a one-line error."""
    steps = total_steps(job, steps_per_epoch)
    return QuerySchedule(job.method, total_epochs=math.ceil(steps / steps_per_epoch), total_steps=steps)


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


def float_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64))


class ZerothOrderWorker(Worker):
    def setup(self, model: torch.nn.Module) -> None:
        model.to(self.device)
        dtype = PRECISIONS[self.job.deepspeed.precision]
        cast_frozen(model, dtype)
        model.eval()  # dropout off, for training too
        self.module = model if dtype == torch.float32 else AutocastForward(model, dtype)
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        cfg = self.job.method
        self.perturber = Perturber([p for _, p in self.named_trainable], cfg.sparsity)
        self.schedule = query_schedule(self.job, self.steps_per_epoch)
        self.activations = SavedActivationCounter(model)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The whole global batch on every worker: all queries of a step use the same minibatch."""
        order = epoch_order(len(self.train_set), 0, 1, self.job.training.seed, epoch)
        return batches_of(order, self.job.training.batch_size)

    def loss(self, batch: dict) -> float:
        with torch.no_grad(), self.activations:
            return loss_fn(self.module(**batch), batch["labels"], self.task.is_regression).item()

    def evaluate_queries(self, batch: dict, queries: int) -> torch.Tensor:
        """This worker's rows of the step's exchange table: (seed, bits of g_q, bits of mean loss)."""
        eps, step = self.job.method.eps, self.state.step
        rows = torch.zeros(queries, 3, dtype=torch.int64)
        for q in range(self.rank, queries, self.world):
            seed = query_seed(self.job.training.seed, step, q)
            self.perturber.set(seed, +1, eps)
            plus = self.loss(batch)
            self.perturber.set(seed, -1, eps)
            minus = self.loss(batch)
            rows[q] = torch.tensor([seed, float_bits((plus - minus) / (2 * eps)), float_bits((plus + minus) / 2)])
        self.perturber.restore()
        return rows

    def exchange(self, rows: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.world > 1:
            on_device = rows.to(self.device)
            dist.all_reduce(on_device)
            rows = on_device.cpu()
        return rows

    def train_step(self, idx: list[int]) -> float:
        batch = self.batch(idx)
        start, joules_before = time.perf_counter(), self.meter.read_joules()
        s, t = self.state, self.job.training
        queries = self.schedule.queries(s.epoch, s.step)
        self.perturber.begin_step()
        rows = self.exchange(self.evaluate_queries(batch, queries))
        seeds = rows[:, 0].tolist()
        expected = [query_seed(t.seed, s.step, q) for q in range(queries)]
        if seeds != expected:
            raise RuntimeError(f"step {s.step}: workers disagree on the query seeds")
        grads = rows[:, 1].clone().view(torch.float64).tolist()
        losses = rows[:, 2].clone().view(torch.float64).tolist()
        finite = all(math.isfinite(v) for v in grads + losses)
        if finite:
            lr = scheduled_lr(s.step, self.total_steps, t.lr, t.warmup_ratio, t.lr_schedule)
            self.perturber.update(list(zip(seeds, grads)), lr, t.weight_decay)
            finite = self.perturber.all_finite()
            if not finite:  # the update overflowed: keep the step's starting weights, the last good ones
                self.perturber.restore()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_joules += self.meter.read_joules() - joules_before
        seconds = time.perf_counter() - start
        s.train_seconds += seconds
        s.extra.setdefault("step_seconds", []).append(seconds)
        s.extra.setdefault("step_queries", []).append(queries)   # every other ZO count derives from these
        return sum(losses) / len(losses) if finite else math.nan

    def save(self, folder: Path, saved_state: dict) -> None:
        from safetensors.torch import save_file

        if self.rank == 0:  # every replica is identical
            save_file({n: p.detach().float().cpu().contiguous() for n, p in self.named_trainable},
                      str(folder / TRAINABLE_FILE))

    def load(self, folder: Path) -> dict:
        from safetensors.torch import load_file

        saved = load_file(str(folder / TRAINABLE_FILE))
        with torch.no_grad():
            for n, p in self.named_trainable:
                p.copy_(saved[n].to(p.dtype))
        return json.loads((folder / STATE_FILE).read_text())

    def memory_account(self) -> dict:
        params = list(self.module.parameters())
        return {"trainable_params": sum(p.numel() for _, p in self.named_trainable),
                "total_params": sum(p.numel() for p in params),
                "param_bytes": sum(p.numel() * p.element_size() for p in params),
                "buffer_bytes": sum(b.numel() * b.element_size() for b in self.module.buffers()),
                "grad_bytes": 0, "optimizer_state_bytes": 0,                    # none exist
                "peak_activation_bytes": self.activations.peak_bytes,          # measured: 0 without autograd
                "perturbation_snapshot_bytes": self.perturber.snapshot_bytes}  # theta0, for the exact restore

    def _zo_figures(self) -> dict:
        per_step = self.state.extra.get("step_queries", [])
        total, steps = sum(per_step), max(self.state.step, 1)
        worker_passes = sum(2 * math.ceil(q / self.world) for q in per_step)
        return {"queries_total": total, "queries_last_step": per_step[-1] if per_step else 0,
                "queries_per_second": total / max(self.state.train_seconds, 1e-9),
                "forward_passes_per_step": 2 * total / steps,
                "forward_passes_per_worker_per_step": worker_passes / steps,
                "exchange_bytes_per_step": (EXCHANGE_BYTES_PER_QUERY * total if self.world > 1 else 0) / steps,
                "step_seconds": self.state.extra.get("step_seconds", []), "step_queries": per_step}

    def extra_progress(self) -> dict:
        z = self._zo_figures()
        return {"queries": z["queries_last_step"], "queries_per_second": z["queries_per_second"]}

    def extra_summary(self) -> dict:
        cfg = self.job.method
        return {"zeroth_order": {
            **self._zo_figures(),
            "schedule": {"alpha": cfg.alpha, "beta": self.schedule.beta, "q_max": cfg.q_max,
                         "over": self.schedule.over, "k_last": self.schedule.k_last,
                         **({"note": self.schedule.note} if self.schedule.note else {})},
            "eps": cfg.eps, "queries_split": f"round-robin over {self.world} workers; spare workers idle when Q < N",
        }}
