"""The first-order training loop, run by every Ray Train worker: forward, `engine.backward(loss)`, `engine.step()`.

Every first-order method (full, lora, read) trains through one DeepSpeed engine, whose ZeRO stage comes from the job.
The batch size in the job is global: each of the N workers takes batch_size / N examples of the same shuffled
order (DistributedSampler's interleaving), so 1 worker and N workers see the same global batch at every step.

Order of events in a step: forward under a saved-tensor counter -> backward -> optimizer step -> mean loss over
workers -> (log | eval | checkpoint | energy-budget check). Progress goes to the driver's display through a queue;
`ray.train.report` (a barrier that waits for Ray Train's controller) is called only with checkpoints and at the end.
Checkpoints carry the engine (weights, optimizer, LR schedule), the position in the data and every worker's RNG
state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rayeff.config import JobSpec
from rayeff.data.glue import get_task
from rayeff.data.metrics import compute_metrics
from rayeff.data.tokenized import Collator, load_train_and_dev
from rayeff.measure.energy import combine, make_meter
from rayeff.measure.memory import DevicePeak, SavedActivationCounter, tensor_account
from rayeff.methods import get_method
from rayeff.models import ModelSource, build_classifier, load_tokenizer
from rayeff.quiet import quiet_libraries

CHECKPOINT_TAG = "deepspeed"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    energy_joules: float = 0.0        # energy of earlier segments of this run (before a resume)
    train_energy_joules: float = 0.0  # ... of which drawn inside training steps
    loss_sum: float = 0.0
    losses: list = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)


def deepspeed_config(job: JobSpec) -> dict:
    ds = job.deepspeed
    zero: dict = {"stage": ds.zero_stage}
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


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def epoch_order(n: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """This worker's indices for one epoch: a seeded permutation, padded to a multiple of `world` by wrapping
    around, then interleaved (rank r takes positions r, r+world, ...), as DistributedSampler does."""
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    padded = order + order[: (-n) % world]
    return padded[rank::world]


def batches_of(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i: i + size] for i in range(0, len(indices), size)]


def total_steps(job: JobSpec, n_train: int) -> int:
    per_worker = math.ceil(n_train / job.scaling.num_workers)
    steps_per_epoch = math.ceil(per_worker / job.micro_batch_size())
    if job.training.max_steps is not None:
        return job.training.max_steps
    return max(1, math.ceil((job.training.epochs or 1.0) * steps_per_epoch))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def all_gather(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    """Means across workers, in one all-reduce however many values."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


class Worker:
    """One worker's training run. `run()` is the loop; the rest are the steps it takes, in call order."""

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch

        self.job = JobSpec.model_validate(config["job"])
        self.progress_queue = config.get("progress_queue")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.device_peak = DevicePeak(self.device)
        self.task = get_task(self.job.data.task)
        self.state = TrainState()

        torch.manual_seed(self.job.training.seed)  # the same initial weights on every worker
        source = ModelSource(**config["model_source"])
        tokenizer = load_tokenizer(source)
        self.train_set, self.dev_set = load_train_and_dev(self.job.data, tokenizer, self.job.training.max_seq_length)
        classifier = build_classifier(source, self.task.num_labels, self.job.model.dropout, self.job.model.pooling)
        self.collate = Collator(tokenizer.pad_token_id, self.job.training.max_seq_length,
                                self.job.training.padding == "max_length", classifier.uses_token_types,
                                self.task.is_regression)
        model = get_method(self.job.method.name).build(classifier, self.job.method)
        self.total_steps = total_steps(self.job, len(self.train_set))
        self.engine = self._deepspeed_engine(model)
        self.activations = SavedActivationCounter(self.engine.module)
        self.meter = make_meter(self.job.energy.meter, self.device, self.job.energy.watts_per_cpu)
        self.train_joules = 0.0  # this segment's energy inside training steps, on this worker's counter

    def _deepspeed_engine(self, model):
        import deepspeed
        from transformers import get_scheduler

        t = self.job.training
        optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.lr)
        scheduler = get_scheduler(t.lr_schedule, optimizer, num_warmup_steps=int(t.warmup_ratio * self.total_steps),
                                  num_training_steps=self.total_steps)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(self.job))
        return engine

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            _, client_state = self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
            self.state = TrainState(**client_state["train_state"])
            rng_file = Path(folder) / f"rng_rank{self.rank}.pt"
            if rng_file.is_file():
                rng = torch.load(rng_file, weights_only=False)
                torch.set_rng_state(rng["torch"])
                np.random.set_state(rng["numpy"])
                random.setstate(rng["python"])
                if rng.get("cuda") is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights, gathered whole (a collective under ZeRO-3, so every worker calls it)."""
        import deepspeed

        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        gather = deepspeed.zero.GatheredParameters([p for _, p in named]) if self.job.deepspeed.zero_stage == 3 \
            else contextlib.nullcontext()
        with gather:
            return {n: p.detach().float().cpu().clone() for n, p in named} if self.rank == 0 else {}

    def checkpoint_and_report(self, metrics: dict, name: str, energy: dict) -> None:
        """Save a checkpoint on every worker and report it. The saved state carries the energy used so far, so a
        resumed run adds to it (energy drawn after the last checkpoint of a killed run is not counted)."""
        import ray.train
        from safetensors.torch import save_file

        folder = tempfile.mkdtemp(prefix="rayeff-ckpt-")
        saved_state = {**asdict(self.state), "energy_joules": energy["joules"],
                       "train_energy_joules": energy["train_joules"]}
        self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"train_state": saved_state})
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        torch.save(rng, Path(folder) / f"rng_rank{self.rank}.pt")
        weights = self._trainable_state()
        if self.rank == 0:
            save_file(weights, str(Path(folder) / TRAINABLE_FILE))
            (Path(folder) / "train_state.json").write_text(json.dumps(saved_state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        shutil.rmtree(folder, ignore_errors=True)

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Dev metrics. Every worker runs the same number of forwards (ZeRO-3 gathers weights collectively), on
        its interleaved shard; predictions are gathered by example index so padding duplicates count once."""
        self.engine.eval()
        order = epoch_order(len(self.dev_set), self.rank, self.world, 0, 0, shuffle=False)
        predictions = {}
        with torch.no_grad():
            for idx in batches_of(order, self.job.micro_batch_size()):
                batch = to_device(self.collate([dict(self.dev_set[i], index=i) for i in idx]), self.device)
                logits = self.engine(**batch).float()
                preds = logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)
                predictions.update(zip(idx, preds.cpu().tolist()))
        self.engine.train()
        merged = {}
        for part in all_gather(predictions):
            merged.update(part)
        keys = sorted(merged)
        labels = self.dev_set["label"]
        return compute_metrics(self.task.name, [merged[k] for k in keys], [labels[k] for k in keys])

    # -- reporting -----------------------------------------------------------------------------------------------

    def energy(self) -> dict:
        """Energy of the whole run (`joules`) and of its training steps alone (`train_joules`: no start-up,
        evaluation or checkpointing), over all workers."""
        reading = {"key": self.meter.key, "joules": self.meter.read_joules(), "source": self.meter.source,
                   "formula": self.meter.formula, "train_joules": self.train_joules}
        readings = all_gather(reading)
        total = combine(readings)
        total["joules"] += self.state.energy_joules
        total["train_joules"] = combine([{**r, "joules": r["train_joules"]} for r in readings])["joules"] + \
            self.state.train_energy_joules
        return total

    def progress(self, energy: dict) -> dict:
        window = self.state.losses[-self.job.training.log_every:]
        return {"step": self.state.step, "total_steps": self.total_steps, "epoch": self.state.epoch,
                "loss": float(np.mean(window)) if window else None,
                "samples_per_second": self.state.samples / max(self.state.train_seconds, 1e-9),
                "energy_joules": energy["joules"], "eval": self.state.last_eval}

    def publish(self, progress: dict) -> None:
        if self.rank == 0 and self.progress_queue is not None:
            try:
                self.progress_queue.put_nowait(progress)
            except Exception:  # a full or gone display queue must never stop training
                pass

    def summary(self, metrics: dict, energy: dict, status: str) -> dict:
        account = tensor_account(self.engine.module, self.engine.optimizer, self.activations,
                                 self.job.deepspeed.zero_stage, self.world)
        per_worker = all_gather({**asdict(account), "peak_device_bytes": self.device_peak.peak_bytes()})
        memory = {k: max(w[k] for w in per_worker) for k in per_worker[0]}  # per-worker figures: the largest
        memory["tensor_account_bytes"] = sum(memory[k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes",
                                                                 "peak_activation_bytes"))
        memory["peak_device_kind"] = self.device_peak.kind
        memory["per"] = "worker (largest over workers)"
        s = self.state
        return {
            "status": status, "method": self.job.method.name, "model": self.job.model.name,
            "task": self.task.name, "metrics": metrics,
            "train_loss": s.loss_sum / max(s.step, 1), "loss_history": s.losses,
            "energy": energy, "memory": memory,
            "time": {"train_seconds": s.train_seconds, "steps": s.step, "samples": s.samples,
                     "samples_per_second": s.samples / max(s.train_seconds, 1e-9),
                     "seconds_per_sample": s.train_seconds / max(s.samples, 1)},
            "workers": self.world, "zero_stage": self.job.deepspeed.zero_stage,
            "device": self.device.type, "total_steps": self.total_steps,
        }

    # -- the loop ------------------------------------------------------------------------------------------------

    def train_step(self, idx: list[int]) -> float:
        batch = to_device(self.collate([dict(self.train_set[i], index=i) for i in idx]), self.device)
        start, joules_before = time.perf_counter(), self.meter.read_joules()
        with self.activations:
            logits = self.engine(**batch)
            loss = loss_fn(logits, batch["labels"], self.task.is_regression)
        self.engine.backward(loss)
        self.engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_joules += self.meter.read_joules() - joules_before
        seconds, mean_loss = mean_over_workers([time.perf_counter() - start, loss.item()], self.device)
        self.state.train_seconds += seconds
        return mean_loss

    def run(self) -> None:
        self.restore()
        self.meter.start()
        t, s = self.job.training, self.state
        status = "finished"
        while s.step < self.total_steps and status == "finished":
            order = epoch_order(len(self.train_set), self.rank, self.world, t.seed, s.epoch)
            for idx in batches_of(order, self.job.micro_batch_size())[s.batch_in_epoch:]:
                loss = self.train_step(idx)
                s.step, s.batch_in_epoch, s.samples = s.step + 1, s.batch_in_epoch + 1, s.samples + t.batch_size
                s.losses.append(loss)
                s.loss_sum += loss
                last = s.step >= self.total_steps
                if s.step % t.log_every == 0 or last:
                    energy = self.energy()
                    progress = self.progress(energy)
                    self.publish(progress)
                    if self.job.energy.budget_j is not None and energy["joules"] >= self.job.energy.budget_j:
                        status = "stopped: energy budget"
                if t.eval_every and s.step % t.eval_every == 0 and not last:
                    s.last_eval = self.evaluate()
                if self._checkpoint_due() and not last and status == "finished":
                    energy = self.energy()
                    self.checkpoint_and_report({"progress": self.progress(energy)}, f"step_{s.step:08d}", energy)
                if last or status != "finished":
                    break
            else:
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        metrics = self.evaluate()
        energy = self.energy()
        self.checkpoint_and_report(self.summary(metrics, energy, status), f"step_{s.step:08d}", energy)

    def _checkpoint_due(self) -> bool:
        every = self.job.training.checkpoint_every
        return bool(every) and self.state.step % every == 0


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every report at INFO under a logger named by its file path, which its LoggingConfig
    does not reach; our own progress line says the same."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker: config = {"job": JobSpec dump, "model_source": ..., ...}."""
    if config["job"]["scaling"]["gpus_per_worker"] == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say so, rather than let DeepSpeed probe and warn
    import deepspeed  # noqa: F401  (imported before the memory baseline is taken)

    quiet_libraries()
    _quiet_ray_train_reports()
    Worker(config).run()
