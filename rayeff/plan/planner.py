"""Per-worker memory and communication of a job, per method, from its model's shapes (rayeff/plan/shapes.py).

Memory is split as the tensor account of a run splits it (rayeff/measure/memory.py), for W trainable elements in T
tensors, P elements in all, b bytes per element of the run's precision (4 fp32, 2 bf16/fp16) and N workers:

    first-order (DeepSpeed)  parameters   P b, and P b / N under ZeRO-3
                             gradients    W b at ZeRO-0 and on one worker at ZeRO 1-2; else this worker's
                                          partition and a reduction bucket of min(W, 5e8) elements, W b / N +
                                          min(W, 5e8) b (exact at ZeRO-3 on 1 and 2 workers; an upper bound at ZeRO
                                          1-2, where DeepSpeed held 0.58-1.0 W b at 2 workers, as its buckets met the
                                          parameters: benchmarks/issue-19/plan-vs-run.json)
                             optimizer    AdamW's two float32 moments and a float32 step per tensor, 2 W 4 + 4 T at
                                          ZeRO-0 in fp32; a float32 master copy as well (3 W 4 + 4 T) in bf16/fp16;
                                          ZeRO 1-3 keep flat float32 partitions, 3 W 4 / N + 4 per parameter group
                             activations  what the method's forward saves, per worker's batch (the meta forward)
    zeroth-order             parameters   the frozen matrices in the run's precision, the rest float32
                             snapshot     the float32 copy of the trained parameters a step restores (W 4)

Offloaded optimizer state (and ZeRO-3's offloaded parameters) live in host memory: reported, not in the device
total. Communication is the bytes each worker sends per step with ring collectives: an all-reduce of B bytes sends
2 (N - 1) / N B, a reduce-scatter or an all-gather (N - 1) / N B. ZeRO-3 gathers the weights for the forward and
again for the backward, except for a method whose backward does not run through the backbone (READ).

Work per step is the floating-point operations of one worker's forward and backward, counted by torch's
FlopCounterMode on the meta forward (rayeff/plan/shapes.py); a zeroth-order step runs two forwards of the whole
global batch per query the worker takes (q_max queries by default: an upper bound while the schedule ramps up; each
query's operator calls counted as if it ran alone, an upper bound where queries are batched). Given a calibration of the
machine kind (`rayeff calibrate`, rayeff/plan/calibration.py), `StepTime` turns that work into seconds and joules.
"""

from __future__ import annotations

import copy
import math

import torch
from pydantic import BaseModel, Field

from rayeff.config import JobSpec, validate_job
from rayeff.errors import UserError
from rayeff.methods import METHODS, get_method
from rayeff.plan.calibration import Calibration
from rayeff.plan.shapes import ModelShapes, model_shapes, plan_model_config
from rayeff.train.first_order import BUCKET_ELEMENTS
from rayeff.train.zeroth_order import EXCHANGE_BYTES_PER_QUERY

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARAMETER_GROUPS = 2   # decayed matrices and undecayed vectors (rayeff/train/first_order.py: optimizer_groups)


class WorkerMemory(BaseModel):
    parameters: int = Field(description="bytes of the parameters a worker holds")
    buffers: int = Field(description="bytes of the model's buffers")
    gradients: int = Field(description="bytes of gradients, DeepSpeed's partitions and copies included")
    optimizer_state: int = Field(description="bytes of optimizer state on the device, float32 master copies included")
    activations: int = Field(description="bytes the forward saves for backward, one worker's batch")
    perturbation_snapshot: int = Field(0, description="zeroth-order: the copy of the trained parameters")
    total: int = Field(description="their sum: the device memory the tensors of a step hold")


class StepTime(BaseModel):
    """A step's seconds from the work it does and a calibration's rates for that work (rayeff/plan/calibration.py),
    and its joules from the calibration's power per worker. Terms: forward and backward (their operations over the
    rates at the model's hidden size, plus their operator calls at the calibration's overhead per call), update
    (gradient clip and AdamW over the elements and tensors this worker updates), perturbations (zeroth-order:
    theta0 + eps z set over the trained elements twice per query this worker runs and once per query of the step for
    the update, a restoring copy per query and one per step) and communication (bytes sent over the all-reduce
    rate). Not counted: the loop's fixed costs per step (data, meters, DeepSpeed's bookkeeping), which set the time of
    models as small as the tiny test ones."""

    seconds: dict[str, float | None] = Field(description="seconds per step by term; communication None where the "
                                                         "calibration has no all-reduce rate (then not in the sum)")
    seconds_per_step: float
    joules_per_step: float = Field(description="every worker: seconds_per_step x the calibration's watts x workers "
                                               "(as if each worker drew the calibration's power alone; RAPL's figure "
                                               "holds its CPU package's idle draw, counted once per worker)")
    steps: int | None = Field(description="training.max_steps; None when the job counts epochs (its data decides)")
    seconds_total: float | None
    joules_total: float | None
    energy_source: str = Field(description="the calibration's meter: nvml, rapl, or estimate (see energy_formula)")
    energy_formula: str | None = None
    queries_per_step: float | None = Field(None, description="zeroth-order: the queries each step was timed at")
    calibration_device: str
    calibration_threads: int


class MethodPlan(BaseModel):
    method: str
    loop: str
    trainable_params: int
    total_params: int
    memory_per_worker_bytes: WorkerMemory
    host_bytes_per_worker: int = Field(description="offloaded optimizer state and parameters, in host memory")
    fits: bool | None = Field(description="total within --gpu-memory (the tensors alone: no CUDA context, "
                                           "allocator slack or unsaved temporaries); None when none was given")
    comm_bytes_per_step: int = Field(description="bytes each worker sends per step (ring collectives)")
    comm_kind: str
    flops_per_step: int = Field(description="floating-point operations one worker runs per step (a multiply-add is "
                                            "2): forward and backward, or a zeroth-order step's forwards")
    time: StepTime | None = Field(None, description="with a calibration (`rayeff plan --calibration`)")


class Plan(BaseModel):
    model: str
    task: str
    workers: int
    batch_per_worker: int
    max_seq_length: int
    zero_stage: int
    precision: str
    gpu_memory_bytes: int | None
    methods: dict[str, MethodPlan]
    refused: dict[str, str] = Field({}, description="methods that cannot run this job, with the reason")


def ring(kind: str, payload: float, workers: int) -> float:
    share = (workers - 1) / workers
    return 2 * share * payload if kind == "all-reduce" else share * payload


def first_order_plan(job: JobSpec, shapes: ModelShapes) -> tuple[WorkerMemory, int, int, str]:
    ds, n = job.deepspeed, job.scaling.num_workers
    b, w, stage = BYTES[ds.precision], shapes.trainable_params, ds.zero_stage
    params = shapes.total_params * b // (n if stage == 3 else 1)
    bucket = min(w, BUCKET_ELEMENTS) * b
    gradients = w * b if stage == 0 or (n == 1 and stage < 3) else w * b // n + bucket
    copies = 2 if ds.precision == "fp32" else 3   # Adam's moments, and a float32 master copy under bf16/fp16
    optimizer = copies * w * 4 + 4 * shapes.trainable_tensors if stage == 0 else \
        3 * w * 4 // n + 4 * PARAMETER_GROUPS
    host = 0
    if ds.offload_optimizer:
        optimizer, host = 0, optimizer
    if ds.offload_params:
        params, host = 0, host + params
    memory = WorkerMemory(parameters=params, buffers=shapes.buffer_bytes, gradients=gradients,
                          optimizer_state=optimizer, activations=shapes.saved_activation_bytes,
                          total=params + shapes.buffer_bytes + gradients + optimizer + shapes.saved_activation_bytes)
    if n == 1:
        return memory, host, 0, "none (one worker)"
    if stage == 3:
        passes = 2 if get_method(job.method.name).backward_through_backbone else 1
        sent = passes * ring("all-gather", shapes.total_params * b, n) + ring("reduce-scatter", w * b, n)
        kind = "all-gather of the weights (forward" + (" and backward" if passes == 2 else " only") + \
            "), reduce-scatter of gradients"
        return memory, host, round(sent), kind
    if stage in (1, 2):
        sent = ring("reduce-scatter", w * b, n) + ring("all-gather", w * b, n)
        return memory, host, round(sent), "reduce-scatter of gradients, all-gather of the updated weights"
    return memory, host, round(ring("all-reduce", w * b, n)), "all-reduce of gradients"


def zeroth_order_plan(job: JobSpec, shapes: ModelShapes) -> tuple[WorkerMemory, int, int, str]:
    b, n = BYTES[job.deepspeed.precision], job.scaling.num_workers
    rest = shapes.total_params - shapes.frozen_matrix_params
    params = shapes.frozen_matrix_params * b + rest * 4
    snapshot = shapes.trainable_params * 4
    memory = WorkerMemory(parameters=params, buffers=shapes.buffer_bytes, gradients=0, optimizer_state=0,
                          activations=0, perturbation_snapshot=snapshot, total=params + shapes.buffer_bytes + snapshot)
    if n == 1:
        return memory, 0, 0, "none (one worker)"
    queries = job.method.q_max   # the schedule's most queries in a step
    sent = ring("all-reduce", EXCHANGE_BYTES_PER_QUERY * queries, n)
    return memory, 0, round(sent), f"all-reduce of {EXCHANGE_BYTES_PER_QUERY} bytes per query (at most {queries})"


def queries_per_worker(queries: float, workers: int) -> float:
    return math.ceil(queries / workers) if float(queries).is_integer() else queries / workers


def step_seconds(job: JobSpec, shapes: ModelShapes, sent: int, calibration: Calibration, hidden_size: int,
                 queries: float | None) -> dict[str, float | None]:
    rates, n, w = calibration.at(hidden_size), job.scaling.num_workers, shapes.trainable_params
    seconds: dict[str, float | None] = {}
    op = calibration.op_seconds
    if queries is None:   # first-order
        seconds["forward"] = shapes.forward_flops / rates.forward_flops_per_s + shapes.forward_ops * op
        seconds["backward"] = shapes.backward_flops / rates.backward_flops_per_s + shapes.backward_ops * op
        updated = w if job.deepspeed.zero_stage == 0 else math.ceil(w / n)   # ZeRO 1-3: this worker's partition
        seconds["update"] = updated * calibration.update_seconds_per_element + \
            shapes.trainable_tensors * calibration.update_seconds_per_tensor
    else:
        own = queries_per_worker(queries, n)
        seconds["forward"] = 2 * own * (shapes.forward_flops / rates.inference_flops_per_s + shapes.forward_ops * op)
        # per query run here: theta0 +- eps z set, then restored; per query of the step: the update's z; per step:
        # the copy of theta0 (rayeff/train/spsa.py)
        seconds["perturbations"] = w * ((2 * own + queries) * calibration.perturb_seconds_per_element +
                                        (own + 1) * calibration.copy_seconds_per_element)
    rate = calibration.allreduce_bytes_per_s
    seconds["communication"] = 0.0 if sent == 0 else (None if rate is None else sent / rate)
    return seconds


def step_time(job: JobSpec, shapes: ModelShapes, sent: int, calibration: Calibration, hidden_size: int,
              queries: float | None) -> StepTime:
    seconds = step_seconds(job, shapes, sent, calibration, hidden_size, queries)
    per_step = sum(v for v in seconds.values() if v is not None)
    joules = per_step * calibration.watts * job.scaling.num_workers
    steps = job.training.max_steps
    return StepTime(seconds=seconds, seconds_per_step=per_step, joules_per_step=joules, steps=steps,
                    seconds_total=None if steps is None else per_step * steps,
                    joules_total=None if steps is None else joules * steps,
                    energy_source=calibration.energy_source, energy_formula=calibration.energy_formula,
                    queries_per_step=queries, calibration_device=calibration.device,
                    calibration_threads=calibration.threads)


def hidden_size_of(config) -> int:
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise UserError(f"model.name: its config names no hidden size ({type(config).__name__}); the plan's time needs "
                    "one to pick the calibration's rates")


def plan_method(job: JobSpec, config, gpu_memory_bytes: int | None, calibration: Calibration | None = None,
                queries_per_step: float | None = None) -> MethodPlan:
    """`queries_per_step`: the zeroth-order queries a step is timed at (default the schedule's most, q_max)."""
    method = get_method(job.method.name)
    first_order = method.loop == "first_order"
    dtype = DTYPES[job.deepspeed.precision] if first_order else torch.float32
    # a zeroth-order worker forwards the whole global batch for each of its queries
    batch = job.micro_batch_size() if first_order else job.training.batch_size
    shapes = model_shapes(job, config, batch, dtype)
    plan = first_order_plan if first_order else zeroth_order_plan
    memory, host, sent, kind = plan(job, shapes)
    queries = None if first_order else (queries_per_step or job.method.q_max)
    flops = shapes.forward_flops + shapes.backward_flops if first_order else \
        round(2 * queries_per_worker(queries, job.scaling.num_workers) * shapes.forward_flops)
    time = None if calibration is None else step_time(job, shapes, sent, calibration, hidden_size_of(config), queries)
    return MethodPlan(method=method.name, loop=method.loop, trainable_params=shapes.trainable_params,
                      total_params=shapes.total_params, memory_per_worker_bytes=memory, host_bytes_per_worker=host,
                      fits=None if gpu_memory_bytes is None else memory.total <= gpu_memory_bytes,
                      comm_bytes_per_step=sent, comm_kind=kind, flops_per_step=flops, time=time)


def worker_bytes(job: JobSpec, config=None) -> int:
    """The bytes of tensors one worker of `job` holds at a step, as planned for the job's own method (the plan's
    total: no CUDA context, allocator slack or unsaved temporaries; see the module docstring for which terms are
    exact and which upper bounds). Raises where the job cannot be planned (`plan_job` lists what it refuses)."""
    config = plan_model_config(job.model.name) if config is None else config
    return plan_method(job, config, None).memory_per_worker_bytes.total


def job_for_method(job: JobSpec, name: str) -> JobSpec:
    """The job with another method in its default settings (its own method keeps the job's settings); raises
    UserError when that method cannot run the job."""
    if name == job.method.name:
        return job
    raw = copy.deepcopy(job.model_dump(mode="json"))
    raw["method"] = {"name": name}
    if get_method(name).loop == "zeroth_order":   # no DeepSpeed: nothing to partition or offload
        raw["deepspeed"].update(zero_stage=0, offload_optimizer=False, offload_params=False)
    return validate_job(raw, f"method {name}")


def plan_job(job: JobSpec, config, methods: list[str], gpu_memory_bytes: int | None,
             calibration: Calibration | None = None) -> Plan:
    plans, refused = {}, {}
    for name in methods:
        try:
            plans[name] = plan_method(job_for_method(job, name), config, gpu_memory_bytes, calibration)
        except UserError as err:
            refused[name] = str(err)
        except (NotImplementedError, RuntimeError) as err:   # an op whose output size depends on the data
            refused[name] = f"its forward cannot run on shapes alone ({str(err).splitlines()[0][:160]})"
        except ValueError as err:   # the method's library refuses the model as configured (e.g. PEFT's targets)
            refused[name] = f"it cannot be built on this model as set ({str(err).splitlines()[0][:160]})"
    return Plan(model=job.model.name, task=job.data.display_name, workers=job.scaling.num_workers,
                batch_per_worker=job.micro_batch_size(), max_seq_length=job.training.max_seq_length,
                zero_stage=job.deepspeed.zero_stage, precision=job.deepspeed.precision,
                gpu_memory_bytes=gpu_memory_bytes, methods=plans, refused=refused)


def method_names(job: JobSpec, which: str | None) -> list[str]:
    """`--methods`: None for the job's own, `all` for every registered method that trains the job's task type,
    or a comma-separated list."""
    if which is None:
        return [job.method.name]
    if which == "all":
        return sorted(name for name, m in METHODS.items() if job.data.task_type in m.task_types)
    names = [n.strip() for n in which.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        named = ", ".join(unknown) if unknown else repr(which)
        raise UserError(f"--methods: {named} is not a method; choose from all, " + ", ".join(sorted(METHODS)))
    return names
