"""What every Ray Train worker does whatever the method: data, model, evaluation, checkpoints, energy, the step loop.

Two training loops step the model (the method's config says which): `first_order.py` (backward + DeepSpeed
optimizer step) and `zeroth_order.py` (SPSA from forward passes only). They subclass `Worker` and supply how a step
runs, which examples it reads, how weights are saved and restored, and what the tensor account holds.

Order of events in a step: train step -> (log | eval | checkpoint | energy-budget check). Progress goes to the
driver's display through a queue; `ray.train.report` (a barrier that waits for Ray Train's controller) is called
only with checkpoints and at the end. Checkpoints carry the weights (and optimizer state where there is one), the
position in the data and every worker's RNG state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rayeff.config import JobSpec
from rayeff.data.glue import get_task
from rayeff.data.metrics import compute_metrics, primary_metric
from rayeff.data.tokenized import Collator, load_train_and_dev
from rayeff.measure.energy import combine, make_meter
from rayeff.measure.memory import DevicePeak
from rayeff.methods import get_method
from rayeff.mixture_of_experts import coefficient_of_variation, moe_layers, parameter_figures
from rayeff.models import ModelSource, build_classifier, load_tokenizer
from rayeff.quiet import quiet_libraries
from rayeff.train.checkpoint_safety import (
    check_checkpoint_files,
    rng_state,
    safe_load,
    set_rng_state,
    weights_only_loads,
)

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "train_state.json"


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
    energy_labels: dict = field(default_factory=dict)  # source, formula, fallback of the run so far (any segment)
    loss_sum: float = 0.0
    losses: list = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # the loop's own counters (e.g. ZO queries so far)


def total_steps(job: JobSpec, steps_per_epoch: int) -> int:
    """The run's length: training.max_steps, else its epochs (1 by default) of `steps_per_epoch`."""
    if job.training.max_steps is not None:
        return job.training.max_steps
    return max(1, math.ceil((job.training.epochs or 1.0) * steps_per_epoch))


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
    """One worker's training run. `run()` is the loop; subclasses supply the step and the state it saves."""

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch

        self.job = JobSpec.model_validate(config["job"])
        self.progress_queue = config.get("progress_queue")
        # In a sweep: the sweep's limits actor (energy budget, time limit) and this trial's key in it.
        self.sweep_limits, self.trial_key = config.get("sweep_limits"), config.get("trial_key")
        self.sweep_remaining_j = None   # rank 0: the sweep's energy left, as its limits actor last said
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
        classifier = build_classifier(source, self.task.num_labels, self.job.model.dropout, self.job.model.pooling,
                                      self.job.model.head)
        self.collate = Collator(tokenizer.pad_token_id, self.job.training.max_seq_length,
                                self.job.training.padding == "max_length", classifier.uses_token_types,
                                self.task.is_regression)
        model = get_method(self.job.method.name).build(classifier, self.job.method)
        self.model = model  # the method's module (`self.module` may be an engine around it)
        self.moe = moe_layers(model)   # Mixture-of-Experts layers, whose routing is reported (rayeff/methods/moe.py)
        self.total_steps = self._total_steps()
        self.setup(model)
        self.meter = make_meter(self.job.energy.meter, self.device, self.job.energy.watts_per_cpu,
                                where=lambda: f"step {self.state.step}" + (f" on worker {self.rank}"
                                                                           if self.world > 1 else ""))
        self.train_joules_by_key: dict[str, float] = {}  # this segment's energy inside training steps, per counter
        self.live = None
        if self.rank == 0:   # the cluster's view of this run: Prometheus metrics and the status board
            from rayeff.cluster.live import LiveRun

            self.live = LiveRun(config["labels"], primary_metric(self.task.name), self.job.energy.budget_j,
                                {"task": self.task.name, "model": self.job.model.name,
                                 "output_dir": self.job.output_dir})

    # -- what a training loop supplies ---------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module) -> None:
        """Take the method's model onto the device and set `self.module`, what a forward pass calls: the model,
        or an engine wrapping it."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The training-set indices this worker reads at each step of `epoch`."""
        raise NotImplementedError

    def train_step(self, idx: list[int]) -> float:
        """One step on these examples; adds its time to `state.train_seconds`; returns the loss (mean over
        workers). A loss that is not finite means training diverged: the weights must then be left as the step
        found them."""
        raise NotImplementedError

    def save(self, folder: Path, saved_state: dict) -> None:
        """Write this worker's part of a checkpoint (every worker calls it; rank 0 writes the weights file)."""
        raise NotImplementedError

    def load(self, folder: Path) -> dict:
        """Restore weights (and optimizer) from a checkpoint folder; return the saved TrainState fields."""
        raise NotImplementedError

    def memory_account(self) -> dict:
        """The exact tensor account of this worker (bytes by kind, see rayeff.measure.memory)."""
        raise NotImplementedError

    def extra_summary(self) -> dict:
        return {}

    def extra_progress(self) -> dict:
        return {}

    # -- shared --------------------------------------------------------------------------------------------------

    def _total_steps(self) -> int:
        self.steps_per_epoch = len(self.epoch_batches(0))
        return total_steps(self.job, self.steps_per_epoch)

    def batch(self, idx: list[int]) -> dict:
        return to_device(self.collate([dict(self.train_set[i], index=i) for i in idx]), self.device)

    def restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            # A checkpoint may sit in a shared bucket: every .pt file in it (ours and DeepSpeed's) must load as
            # tensors and plain data, and the loads themselves are held to weights-only (rayeff/train/
            # checkpoint_safety.py), so that a tampered checkpoint is refused instead of run.
            check_checkpoint_files(folder)
            with weights_only_loads():
                self.state = TrainState(**self.load(Path(folder)))
            rng_file = Path(folder) / f"rng_rank{self.rank}.pt"
            if rng_file.is_file():
                set_rng_state(safe_load(rng_file), self.device)

    def checkpoint_and_report(self, metrics: dict, name: str, energy: dict) -> None:
        """Save a checkpoint on every worker and report it. The saved state carries the energy used so far, so a
        resumed run adds to it (energy drawn after the last checkpoint of a killed run is not counted)."""
        import ray.train

        folder = Path(tempfile.mkdtemp(prefix="rayeff-ckpt-"))
        saved_state = {**asdict(self.state), "energy_joules": energy["joules"],
                       "train_energy_joules": energy["train_joules"]}
        self.save(folder, saved_state)
        torch.save(rng_state(self.device), folder / f"rng_rank{self.rank}.pt")   # tensors and ints: weights-only
        if self.rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(saved_state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=name)
        shutil.rmtree(folder, ignore_errors=True)

    def evaluate(self) -> dict[str, float]:
        """Dev metrics. Every worker runs the same number of forwards (ZeRO-3 gathers weights collectively), on
        its interleaved shard; predictions are gathered by example index so padding duplicates count once."""
        order = epoch_order(len(self.dev_set), self.rank, self.world, 0, 0, shuffle=False)
        predictions = {}
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            for idx in batches_of(order, self.job.micro_batch_size()):
                batch = to_device(self.collate([dict(self.dev_set[i], index=i) for i in idx]), self.device)
                logits = self.module(**batch).float()
                preds = logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)
                predictions.update(zip(idx, preds.cpu().tolist()))
        self.module.train(was_training)
        merged = {}
        for part in all_gather(predictions):
            merged.update(part)
        keys = sorted(merged)
        labels = self.dev_set["label"]
        if self.moe:
            self.record_routing()
        return compute_metrics(self.task.name, [merged[k] for k in keys], [labels[k] for k in keys])

    def record_routing(self) -> None:
        """The MoE layers' training load since the last record, summed over workers: per-expert assignments and
        their coefficient of variation, the fraction dropped for capacity, and the latest auxiliary losses (the
        mean of the workers' terms: the global batch's loss)."""
        counts = all_gather([(*layer.take_counts(), float(layer.aux_loss), float(layer.z_loss))
                             for layer in self.moe])
        layers = []
        for i, layer in enumerate(self.moe):
            load = [sum(worker[i][0][e] for worker in counts) for e in range(layer.num_experts)]
            dropped, assigned, aux, z = (sum(worker[i][j] for worker in counts) for j in (1, 2, 3, 4))
            layers.append({"load": load, "load_cv": coefficient_of_variation(load),
                           "dropped_fraction": dropped / max(assigned, 1), "aux_loss": aux / len(counts),
                           "z_loss": z / len(counts)})
        if sum(sum(x["load"]) for x in layers):
            self.state.extra.setdefault("moe_routing", []).append(
                {"step": self.state.step, "load_cv": float(np.mean([x["load_cv"] for x in layers])),
                 "dropped_fraction": float(np.mean([x["dropped_fraction"] for x in layers])), "layers": layers})

    def route_first_batch(self) -> None:
        """The routing of the untrained router (step 0) on the first training batch: a forward in training mode
        without gradients, with the RNG state put back so the run itself is unchanged."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            self.module.train()
            self.module(**self.batch(self.epoch_batches(0)[0]))
        self.record_routing()

    @property
    def train_joules(self) -> float:
        """This segment's energy inside training steps on this worker. The training loops add to it; each addition
        is kept under the counter read at the time, so that a counter shared by workers is counted once even after
        a meter has fallen back to the next one."""
        return sum(self.train_joules_by_key.values())

    @train_joules.setter
    def train_joules(self, value: float) -> None:
        key = self.meter.key
        self.train_joules_by_key[key] = self.train_joules_by_key.get(key, 0.0) + value - self.train_joules

    def energy(self) -> dict:
        """Energy of the whole run (`joules`) and of its training steps alone (`train_joules`: no start-up,
        evaluation or checkpointing), over all workers, with its source, scope, formula and any meter fallback
        (see rayeff.measure.energy). Earlier segments of a resumed run count as one more reading."""
        gathered = all_gather({"readings": self.meter.readings(), "train": self.train_joules_by_key})
        earlier = {"key": "earlier segments", "joules": self.state.energy_joules, **self.state.energy_labels}
        total = combine([r for g in gathered for r in g["readings"]] + [earlier])
        self.state.energy_labels = {k: total[k] for k in ("source", "formula", "fallback") if k in total}
        train = [{"key": k, "joules": j} for g in gathered for k, j in g["train"].items()]
        total["train_joules"] = combine(train + [{"key": "earlier segments",
                                                  "joules": self.state.train_energy_joules}])["joules"]
        return total

    def progress(self, energy: dict) -> dict:
        window = self.state.losses[-self.job.training.log_every:]
        return {"step": self.state.step, "total_steps": self.total_steps, "epoch": self.state.epoch,
                "loss": float(np.mean(window)) if window else None,
                "samples_per_second": self.state.samples / max(self.state.train_seconds, 1e-9),
                "energy_joules": energy["joules"], "energy_source": energy["source"], "eval": self.state.last_eval,
                **self.extra_progress()}

    def publish(self, progress: dict) -> None:
        """Rank 0 hands progress to the driver's display and to the cluster (metrics, status board)."""
        if self.rank != 0:
            return
        self.live.update(progress, self.sweep_remaining_j)
        if self.progress_queue is not None:
            try:
                self.progress_queue.put_nowait(progress)
            except Exception:  # a full or gone display queue must never stop training
                pass

    def summary(self, metrics: dict, energy: dict, status: str) -> dict:
        per_worker = all_gather({**self.memory_account(), "peak_device_bytes": self.device_peak.peak_bytes()})
        memory = {k: max(w[k] for w in per_worker) for k in per_worker[0]}  # per-worker figures: the largest
        memory["tensor_account_bytes"] = sum(memory[k] for k in memory if k.endswith("_bytes")
                                             and k != "peak_device_bytes")
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
                     "seconds_per_step": s.train_seconds / max(s.step, 1),
                     "seconds_per_sample": s.train_seconds / max(s.samples, 1)},
            "workers": self.world, "zero_stage": self.job.deepspeed.zero_stage,
            "device": self.device.type, "total_steps": self.total_steps, **self.extra_summary(),
            **({"moe": {**parameter_figures(self.model), "routing": s.extra.get("moe_routing", [])}}
               if self.moe else {}),
            **({"method_figures": self.model.figures()} if hasattr(self.model, "figures") else {}),
        }

    def run(self) -> None:
        self.restore()
        if self.moe and self.state.step == 0:
            self.route_first_batch()
        self.meter.start()
        t, s = self.job.training, self.state
        status = "finished"
        while s.step < self.total_steps and status == "finished":
            for idx in self.epoch_batches(s.epoch)[s.batch_in_epoch:]:
                loss = self.train_step(idx)
                if not math.isfinite(loss):
                    status = "diverged"
                    break
                s.step, s.batch_in_epoch, s.samples = s.step + 1, s.batch_in_epoch + 1, s.samples + t.batch_size
                s.losses.append(loss)
                s.loss_sum += loss
                last = s.step >= self.total_steps
                if s.step % t.log_every == 0 or last:
                    energy = self.energy()
                    sweep_stop = self.sweep_stop_reason(energy)
                    self.publish(self.progress(energy))
                    if self.job.energy.budget_j is not None and energy["joules"] >= self.job.energy.budget_j:
                        status = "stopped: energy budget"
                    elif sweep_stop is not None:
                        status = f"stopped: {sweep_stop}"
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
        # A diverged run holds the weights from before its bad step: its final checkpoint is new, the earlier kept.
        name = f"step_{s.step:08d}" + ("-diverged" if status == "diverged" else "")
        self.checkpoint_and_report(self.summary(metrics, energy, status), name, energy)
        if self.live is not None:
            self.live.end(status, energy["joules"])

    def sweep_stop_reason(self, energy: dict) -> str | None:
        """Rank 0 tells the sweep's limits actor this trial's energy so far and hears back whether the sweep must
        stop (`sweep energy budget`, `time limit`) and the sweep's energy left; every rank gets rank 0's answer, so
        all stop together."""
        if self.sweep_limits is None:
            return None
        import ray

        answer = None
        if self.rank == 0:
            answer, self.sweep_remaining_j = ray.get(self.sweep_limits.update.remote(self.trial_key, energy["joules"]))
        return all_gather(answer)[0]

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
    job = config["job"]
    if job["scaling"]["gpus_per_worker"] == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say so, rather than let DeepSpeed probe and warn
    if job["scaling"].get("threads_per_worker"):
        torch.set_num_threads(job["scaling"]["threads_per_worker"])
    import deepspeed  # noqa: F401  (imported before the memory baseline is taken)

    from rayeff.train.first_order import FirstOrderWorker
    from rayeff.train.zeroth_order import ZerothOrderWorker

    quiet_libraries()
    _quiet_ray_train_reports()
    loop = JobSpec.model_validate(job).method.training_loop
    {"first_order": FirstOrderWorker, "zeroth_order": ZerothOrderWorker}[loop](config).run()
