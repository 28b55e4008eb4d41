"""The first-order training loop: forward, `engine.backward(loss)`, `engine.step()` on every worker.

Every first-order method (full, lora, read, moe) trains through one DeepSpeed engine, whose ZeRO stage comes from
the job; experts split over workers (moe with expert_parallel) are stepped beside it by an ExpertOptimizer.
The batch size in the job is global: each of the N workers takes batch_size / N examples of the same shuffled
order (DistributedSampler's interleaving), so 1 worker and N workers see the same global batch at every step.
Checkpoints are DeepSpeed's (weights, optimizer, LR schedule) plus the trained weights alone on rank 0.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rayeff.config import JobSpec
from rayeff.measure.memory import SavedActivationCounter, TensorAccount, tensor_account
from rayeff.train.expert_optimizer import ExpertOptimizer, expert_parameters
from rayeff.train.worker import TRAINABLE_FILE, Worker, batches_of, epoch_order, loss_fn, mean_over_workers

CHECKPOINT_TAG = "deepspeed"


BUCKET_ELEMENTS = 500_000_000   # DeepSpeed's default reduction / all-gather bucket (elements)


def deepspeed_config(job: JobSpec, trainable_elements: int = BUCKET_ELEMENTS) -> dict:
    """DeepSpeed's config for the job. Its buckets are no larger than what they carry: at its default size ZeRO-3
    allocates a 5e8-element reduction bucket (2 GB in float32) whatever the model, which the tensor account counts."""
    ds = job.deepspeed
    bucket = max(1, min(BUCKET_ELEMENTS, trainable_elements))
    zero: dict = {"stage": ds.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = min(bucket, BUCKET_ELEMENTS // 10)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": job.training.batch_size,
        "train_micro_batch_size_per_gpu": job.micro_batch_size(),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": job.training.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "zero_allow_untested_optimizer": True,   # we pass torch's AdamW
        "zero_force_ds_cpu_optimizer": False,    # ... also when offloading, so no C++ Adam has to compile
        "steps_per_print": 2**31 - 1,
    }


def optimizer_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


class FirstOrderWorker(Worker):
    def setup(self, model: torch.nn.Module) -> None:
        import deepspeed

        split_experts = getattr(self.job.method, "expert_parallel", False)
        apart = {id(p) for p in expert_parameters(self.moe)} if split_experts else set()
        optimizer, scheduler = self._optimizer([p for p in model.parameters() if id(p) not in apart])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(self.job, trainable))
        self.module = self.engine
        self.activations = SavedActivationCounter(self.engine.module)
        self.account, self.accounted_steps = None, 0
        if self.moe and self.world > 1:   # after DeepSpeed's initial broadcast, which sends every expert
            for layer in self.moe:
                layer.distribute(None, split_experts)
        self.expert_optimizer = None
        if split_experts:
            self.expert_optimizer = ExpertOptimizer(model, self.moe, *self._optimizer(expert_parameters(self.moe)),
                                                    self.job.training.max_grad_norm or 0.0)

    def _optimizer(self, params: list) -> tuple:
        from transformers import get_scheduler

        t = self.job.training
        optimizer = torch.optim.AdamW(optimizer_groups(params, t.weight_decay), lr=t.lr)
        return optimizer, get_scheduler(t.lr_schedule, optimizer, num_training_steps=self.total_steps,
                                        num_warmup_steps=int(t.warmup_ratio * self.total_steps))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = epoch_order(len(self.train_set), self.rank, self.world, self.job.training.seed, epoch)
        return batches_of(order, self.job.micro_batch_size())

    def train_step(self, idx: list[int]) -> float:
        batch = self.batch(idx)
        start, joules_before = time.perf_counter(), self.meter.read_joules()
        with self.activations:
            logits = self.engine(**batch)
            loss = loss_fn(logits, batch["labels"], self.task.is_regression)
        # The mean task loss before the update: if any worker's is not finite, no worker steps (the run diverged).
        mean_loss = mean_over_workers([loss.item()], self.device)[0]
        if math.isfinite(mean_loss):
            for layer in self.moe:   # the routers' auxiliary losses join the task loss in what is minimised
                loss = loss + layer.loss_term()
            self.engine.backward(loss)
            if self.accounted_steps < 2:   # gradients, and from the second step optimizer state, all held at once
                self.account = self._account().largest(self.account)
                self.accounted_steps += 1
            self.engine.step()
            if self.expert_optimizer is not None:
                self.expert_optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_joules += self.meter.read_joules() - joules_before
        self.state.train_seconds += time.perf_counter() - start  # the step ends in DeepSpeed's all-reduce
        return mean_loss

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights, gathered whole (a collective under ZeRO-3, so every worker calls it)."""
        import deepspeed

        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        gather = deepspeed.zero.GatheredParameters([p for _, p in named]) if self.job.deepspeed.zero_stage == 3 \
            else contextlib.nullcontext()
        experts = self.expert_optimizer.gathered_weights() if self.expert_optimizer is not None else {}
        held = {id(p) for p in self.expert_optimizer.params} if experts else set()
        with gather:
            return {**{n: p.detach().float().cpu().clone() for n, p in named if id(p) not in held},
                    **experts} if self.rank == 0 else {}

    def save(self, folder: Path, saved_state: dict) -> None:
        from safetensors.torch import save_file

        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={"train_state": saved_state})
        if self.expert_optimizer is not None:
            self.expert_optimizer.save(folder / f"experts_rank{self.rank}.pt")
        weights = self._trainable_state()
        if self.rank == 0:
            save_file(weights, str(folder / TRAINABLE_FILE))

    def load(self, folder: Path) -> dict:
        _, client_state = self.engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG)
        if self.expert_optimizer is not None:   # after DeepSpeed's load, which puts rank 0's experts everywhere
            self.expert_optimizer.load(folder / f"experts_rank{self.rank}.pt")
        return client_state["train_state"]

    def _account(self) -> TensorAccount:
        return tensor_account(self.engine.module, self.engine.optimizer, self.activations, self.expert_optimizer)

    def memory_account(self) -> dict:
        """The largest of the accounts taken between backward and step (the first two steps of this segment: by
        the second, Adam's state exists) and of the one now (a one-step run has state only after its step)."""
        return asdict(self._account().largest(self.account))
