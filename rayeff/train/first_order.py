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
from dataclasses import asdict
from pathlib import Path

import torch

from rayeff.config import JobSpec
from rayeff.measure.memory import SavedActivationCounter, TensorAccount, tensor_account
from rayeff.train.checkpointer import TRAINABLE_FILE, Checkpointer
from rayeff.train.collectives import mean_over_workers
from rayeff.train.context import TrainContext
from rayeff.train.evaluation import evaluate
from rayeff.train.expert_optimizer import ExpertOptimizer, expert_parameters
from rayeff.train.reporter import Reporter
from rayeff.train.routing import record_routing, record_untrained_routing
from rayeff.train.run_setup import RunSetup
from rayeff.train.state import INTERRUPTED, batches_from, batches_of, due, epoch_order, total_steps
from rayeff.train.step_meter import StepMeter
from rayeff.train.summary import memory_figures, run_summary

CHECKPOINT_TAG = "deepspeed"
ACCOUNTED_STEPS = 2   # the tensor account is taken between backward and step of a segment's first two steps


def train_loop(ctx: TrainContext, run: RunSetup, reporter: Reporter) -> None:
    """Train `run` on this worker to its end (or a stop), then evaluate, checkpoint and report the summary."""
    job, t, device = run.job, run.job.training, ctx.device

    def epoch_batches(epoch: int) -> list[list[int]]:   # this worker's share of each global batch
        order = epoch_order(len(run.train_set), ctx.rank, ctx.world_size, t.seed, epoch)
        return batches_of(order, job.micro_batch_size())

    total = total_steps(t, len(epoch_batches(0)))
    engine, experts = build_engine(run, ctx, total)
    # Dropout on, as the model configures it: transformers' from_pretrained hands a pretrained backbone over in eval
    # mode (a tiny one built from its config comes in train mode). READ's train() keeps its frozen backbone in eval.
    engine.module.train()
    activations = SavedActivationCounter(engine.module)
    checkpointer = Checkpointer(ctx)
    state = checkpointer.restore(lambda folder: read_checkpoint(engine, experts, ctx, folder))
    if run.routing_layers and state.step == 0:
        record_untrained_routing(run.routing_layers, engine, run.batch(epoch_batches(0)[0], device), device, state)
    meter = StepMeter.for_job(job.energy, device, ctx.rank, ctx.world_size, state)
    meter.start()

    def write(folder: Path, saved_state: dict) -> None:
        write_checkpoint(engine, experts, ctx, job.deepspeed.zero_stage, folder, saved_state)

    account: TensorAccount | None = None
    accounted, status = 0, "finished"
    for idx in batches_from(state, epoch_batches, total):
        batch = run.batch(idx, device)
        with meter.step(state):
            with activations:
                loss = run.loss(engine(**batch), batch["labels"])
            # The mean task loss before the update: if any worker's is not finite, no worker steps (it diverged).
            # With it, whether any worker heard the driver's stop request: all then stop after this step.
            mean_loss, stop = mean_over_workers([loss.item(), reporter.stop_flag()], device)
            if math.isfinite(mean_loss):
                for layer in run.routing_layers:   # the routers' auxiliary losses join the task loss
                    loss = loss + layer.loss_term()
                engine.backward(loss)
                if accounted < ACCOUNTED_STEPS:   # gradients and (from the second step) Adam's state, held at once
                    account, accounted = engine_account(engine, activations, experts).largest(account), accounted + 1
                engine.step()
                if experts is not None:
                    experts.step()
        if not math.isfinite(mean_loss):
            status = "diverged"
            break
        state.advance(mean_loss, t.batch_size)
        last = state.step >= total
        if stop > 0 and not last:
            status = INTERRUPTED
        if due(state.step, t.log_every) or last:
            energy = meter.energy(state)
            state.logged(energy)
            status = reporter.log(reporter.progress(state, total, energy), energy) or status
        if due(state.step, t.eval_every) and not last and status == "finished":   # (a stop evaluates below)
            state.evaluated(evaluate(engine, run, ctx), meter.energy(state))
            record_routing(run.routing_layers, state)
        if due(state.step, t.checkpoint_every) and not last and status == "finished":
            energy = meter.energy(state)
            checkpointer.save(state, energy, {"progress": reporter.progress(state, total, energy)}, write)
        if last or status != "finished":
            break

    metrics = evaluate(engine, run, ctx)
    record_routing(run.routing_layers, state)
    energy = meter.energy(state)
    # The largest account: of those taken between backward and step, and of the one now (a one-step run has
    # optimizer state only after its step).
    account = engine_account(engine, activations, experts).largest(account)
    summary = run_summary(run, ctx, state, status, metrics, energy, memory_figures(asdict(account), run.device_peak),
                          total)
    # A diverged run holds the weights from before its bad step: its final checkpoint is new, the earlier kept.
    checkpointer.save(state, energy, summary, write, diverged=status == "diverged")
    reporter.end(status, energy, summary)


# -- the engine ---------------------------------------------------------------------------------------------------

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


def make_optimizer(params: list, training, total: int) -> tuple:
    """AdamW and the job's learning-rate schedule over `total` steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(optimizer_groups(params, training.weight_decay), lr=training.lr)
    return optimizer, get_scheduler(training.lr_schedule, optimizer, num_training_steps=total,
                                    num_warmup_steps=int(training.warmup_ratio * total))


TORCH_LINEAR = torch._C._nn.linear   # torch.nn.functional.linear as torch defines it, whatever replaced it since


def initialize_deepspeed(**arguments):
    """`deepspeed.initialize(**arguments)`'s engine, without DeepSpeed's shared-memory all-reduce op.

    On a CPU machine DeepSpeed's communication backend JIT-compiles that op with g++ the first time it starts (about a
    minute and 1.5 GB of RAM per compiler process). It serves `inference_all_reduce` only (tensor-parallel inference);
    training reduces through torch.distributed whatever it says. Adapter written against DeepSpeed 0.19.8: the op's
    builder is consulted through `deepspeed.ops.__compatible_ops__`, a dict probed once per process and kept, so an
    entry set to False there makes the backend skip the build.
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # A ZeRO-3 engine replaces torch.nn.functional.linear with DeepSpeed's own for the rest of the process (its
    # words: "This will persist unless manually reset"), which saves every layer's input for backward, frozen
    # layers' too. An engine built later in the same process (run_in_process, tests) starts from torch's own, so
    # what it saves does not depend on what ran before; a ZeRO-3 engine replaces it again.
    torch.nn.functional.linear = TORCH_LINEAR
    return deepspeed.initialize(**arguments)[0]


def build_engine(run: RunSetup, ctx: TrainContext, total: int) -> tuple:
    """The DeepSpeed engine around the method's model, and the ExpertOptimizer of experts split over the workers
    (None without)."""
    job, model = run.job, run.model
    split_layers = [layer for layer in run.routing_layers if layer.expert_parallel]
    apart = {id(p) for p in expert_parameters(split_layers)}
    optimizer, scheduler = make_optimizer([p for p in model.parameters() if id(p) not in apart], job.training, total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = initialize_deepspeed(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                  config=deepspeed_config(job, trainable))
    if run.routing_layers and ctx.world_size > 1:   # after DeepSpeed's initial broadcast, which sends every expert
        for layer in run.routing_layers:
            layer.distribute(None)
    experts = None
    if split_layers:
        experts = ExpertOptimizer(model, split_layers, *make_optimizer(expert_parameters(split_layers),
                                                                       job.training, total),
                                  job.training.max_grad_norm or 0.0)
    return engine, experts


def engine_account(engine, activations: SavedActivationCounter, experts: ExpertOptimizer | None) -> TensorAccount:
    return tensor_account(engine.module, engine.optimizer, activations, experts)


# -- checkpoints ----------------------------------------------------------------------------------------------------

def trained_weights(engine, experts: ExpertOptimizer | None, rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """The trained weights, gathered whole on rank 0 (a collective under ZeRO-3 and for split experts, so every
    worker calls it)."""
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    gather = deepspeed.zero.GatheredParameters([p for _, p in named]) if zero_stage == 3 \
        else contextlib.nullcontext()
    held_apart = experts.gathered_weights() if experts is not None else {}
    apart = {id(p) for p in experts.params} if experts is not None else set()
    with gather:
        return {**{n: p.detach().float().cpu().clone() for n, p in named if id(p) not in apart},
                **held_apart} if rank == 0 else {}


def write_checkpoint(engine, experts: ExpertOptimizer | None, ctx: TrainContext, zero_stage: int, folder: Path,
                     saved_state: dict) -> None:
    from safetensors.torch import save_file

    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={"train_state": saved_state})
    if experts is not None:
        experts.save(folder / f"experts_rank{ctx.rank}.pt")
    weights = trained_weights(engine, experts, ctx.rank, zero_stage)
    if ctx.rank == 0:
        save_file(weights, str(folder / TRAINABLE_FILE))


def read_checkpoint(engine, experts: ExpertOptimizer | None, ctx: TrainContext, folder: Path) -> dict:
    """Weights, optimizer and schedule back from `folder`; returns the saved TrainState fields."""
    _, client_state = engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG)
    if experts is not None:   # after DeepSpeed's load, which puts rank 0's experts everywhere
        experts.load(folder / f"experts_rank{ctx.rank}.pt")
    return client_state["train_state"]
