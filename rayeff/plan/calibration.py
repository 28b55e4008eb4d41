"""`rayeff calibrate`: what one worker of this machine kind does per second, measured, so that `rayeff plan` can
turn a job's work per step into seconds and joules.

    rayeff calibrate --output calibration.json [--device cpu|cuda] [--threads N] [--hidden-sizes 64,256,768]

Measured, each on the device a worker would use:
  operator overhead   seconds per operator call: a forward and backward of a stack of hidden size 8 (its arithmetic
                      is negligible) over the operators it dispatches
  matrix throughput   floating-point operations per second of a transformer stack (two encoder layers, 4x feed-
                      forward, batch 8 x 128 tokens) at each hidden size: its forward with autograd recording, its
                      backward, and its forward without autograd (what zeroth-order queries and READ's backbone run),
                      each pass's operator overhead taken out; operations counted by torch's FlopCounterMode on the
                      same stack, so the plan's counts and the rates use one convention (a multiply-add is 2)
  optimizer update    seconds per trainable element, and per trainable tensor, of a gradient-norm clip and an
                      AdamW step (torch's default implementation for the device, as a run's)
  perturbation        seconds per element of setting theta0 + eps z (a copy, a normal draw and an add) and of a
                      copy alone: a zeroth-order query's passes
  all-reduce          bytes each of 2 processes sends per second in a ring all-reduce (gloo on a CPU, NCCL on two
                      GPUs), on this machine; absent on a one-GPU machine
  power               the energy meter's joules over the throughput runs, per second, with its source (nvml, rapl,
                      or estimate and its formula)
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from pydantic import BaseModel, Field

from rayeff.errors import UserError

TOKENS = (8, 128)   # batch x sequence of the throughput stack
LAYERS = 2
DEFAULT_HIDDEN = {"cpu": [64, 256, 768], "cuda": [512, 2048, 4096]}


class Throughput(BaseModel):
    hidden_size: int
    forward_flops_per_s: float = Field(description="forward with autograd recording")
    backward_flops_per_s: float
    inference_flops_per_s: float = Field(description="forward under torch.no_grad")


class Calibration(BaseModel):
    device: str = Field(description="cpu, or the GPU's name")
    threads: int = Field(description="torch's intra-op threads during the measurement (a CPU worker's threads)")
    op_seconds: float = Field(description="overhead of one operator call, whatever its size")
    throughput: list[Throughput] = Field(description="arithmetic alone (operator overhead taken out), by hidden size, "
                                                     "ascending")
    update_seconds_per_element: float = Field(description="a gradient-norm clip and AdamW step, per trainable element")
    update_seconds_per_tensor: float = Field(description="... and per trainable tensor")
    perturb_seconds_per_element: float = Field(description="copy, draw a normal direction and add it, per element")
    copy_seconds_per_element: float = Field(description="copy, per element (a zeroth-order restore)")
    allreduce_bytes_per_s: float | None = Field(description="bytes each of 2 processes sends per second in a ring "
                                                            "all-reduce; None where it could not be measured")
    watts: float = Field(description="the energy meter's joules per second over the throughput runs")
    energy_source: str
    energy_formula: str | None = None
    torch_version: str
    host: str
    measured_at: str

    def at(self, hidden_size: int) -> Throughput:
        """The rates at `hidden_size`: interpolated log-log between the measured sizes, the nearest outside them."""
        points = self.throughput
        if hidden_size <= points[0].hidden_size or len(points) == 1:
            return points[0]
        if hidden_size >= points[-1].hidden_size:
            return points[-1]
        low, high = next((a, b) for a, b in zip(points, points[1:]) if a.hidden_size <= hidden_size <= b.hidden_size)
        w = math.log(hidden_size / low.hidden_size) / math.log(high.hidden_size / low.hidden_size)
        rates = {f: math.exp((1 - w) * math.log(getattr(low, f)) + w * math.log(getattr(high, f)))
                 for f in ("forward_flops_per_s", "backward_flops_per_s", "inference_flops_per_s")}
        return Throughput(hidden_size=hidden_size, **rates)


def load_calibration(path: str) -> Calibration:
    from pydantic import ValidationError

    try:
        with open(path) as f:
            return Calibration.model_validate_json(f.read())
    except OSError as err:
        raise UserError(f"--calibration: {path} cannot be read ({err.strerror}); write one with `rayeff calibrate "
                        "--output FILE`") from None
    except ValidationError as err:
        raise UserError(f"--calibration: {path} is not a calibration ({err.error_count()} fields wrong, e.g. "
                        f"{'.'.join(map(str, err.errors()[0]['loc'])) or 'the file'}); write one with `rayeff "
                        "calibrate --output FILE`") from None


@dataclass
class Work:
    """What the code inside `count_work()` dispatched: floating-point operations and operator calls."""

    flops: int = 0
    ops: int = 0


@contextlib.contextmanager
def count_work() -> Iterator[Work]:
    """Counts with torch's FlopCounterMode, which also counts the CPU's fused attention op here (torch 2.13 registers
    the other fused attention ops but not this one, which a CPU run and the planner's forward both call), and
    counts every operator dispatched (each costs a call's overhead, whatever its size)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    work = Work()

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            work.ops += 1
            return func(*args, **(kwargs or {}))

    aten = torch.ops.aten
    flops = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})
    with flops, Calls():
        yield work
    work.flops = flops.get_total_flops()


def _seconds_per_call(fn, device: torch.device, min_seconds: float) -> float:
    """Mean wall seconds of `fn()` over as many calls as fill `min_seconds`, after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def _stack(hidden: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(hidden, max(1, hidden // 64), 4 * hidden, dropout=0.0,
                                             batch_first=True)
    return torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).to(device).train()


def _step_work(stack: torch.nn.Module, x: torch.Tensor) -> tuple[Work, Work]:
    with count_work() as forward:
        out = stack(x)
    with count_work() as backward:
        out.sum().backward()
    return forward, backward


def measure_op_seconds(device: torch.device, min_seconds: float) -> float:
    """Seconds per operator call: a forward and backward of a stack too small for its arithmetic to matter, over
    the operators it calls."""
    stack, x = _stack(8, device), torch.randn(1, 4, 8, device=device)
    forward, backward = _step_work(stack, x)
    return _seconds_per_call(lambda: stack(x).sum().backward(), device, min_seconds) / (forward.ops + backward.ops)


def measure_throughput(hidden: int, device: torch.device, min_seconds: float, op_seconds: float) -> Throughput:
    """Operations per second of arithmetic: each pass's time less its operator calls' overhead."""
    stack, x = _stack(hidden, device), torch.randn(*TOKENS, hidden, device=device)
    forward, backward = _step_work(stack, x)

    def rate(work: Work, seconds: float) -> float:
        return work.flops / max(seconds - work.ops * op_seconds, 0.05 * seconds)

    forward_s = _seconds_per_call(lambda: stack(x), device, min_seconds)
    both_s = _seconds_per_call(lambda: stack(x).sum().backward(), device, min_seconds)
    with torch.no_grad():
        inference_s = _seconds_per_call(lambda: stack(x), device, min_seconds)
    return Throughput(hidden_size=hidden, forward_flops_per_s=rate(forward, forward_s),
                      backward_flops_per_s=rate(backward, both_s - forward_s),
                      inference_flops_per_s=rate(forward, inference_s))


def _update_seconds(tensors: int, elements: int, device: torch.device, min_seconds: float) -> float:
    params = [torch.nn.Parameter(torch.zeros(elements, device=device)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(elements, device=device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)   # torch's choice of implementation, as a run's AdamW makes

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return _seconds_per_call(step, device, min_seconds)


def measure_update(device: torch.device, min_seconds: float, elements: int = 4_000_000) -> tuple[float, float]:
    """(seconds per element, seconds per tensor) of a gradient-norm clip and an AdamW step: one large tensor, and
    64 tiny ones (whose time is the per-tensor overhead)."""
    per_tensor = _update_seconds(64, 16, device, min_seconds) / 64
    per_element = (_update_seconds(1, elements, device, min_seconds) - per_tensor) / elements
    return max(per_element, 0.0), per_tensor


def measure_perturb(device: torch.device, min_seconds: float, elements: int = 4_000_000) -> tuple[float, float]:
    """(seconds per element of setting theta0 + eps z, seconds per element of a copy), as rayeff/train/spsa.py
    sets and restores parameters."""
    start, flat = torch.zeros(elements, device=device), torch.zeros(elements, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def perturb():
        flat.copy_(start).add_(torch.randn(elements, device=device, generator=generator), alpha=1e-3)

    return (_seconds_per_call(perturb, device, min_seconds) / elements,
            _seconds_per_call(lambda: flat.copy_(start), device, min_seconds) / elements)


def _allreduce_worker(rank: int, world: int, store: str, backend: str, payload: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    tensor = torch.ones(payload // 4, device=device)
    dist.all_reduce(tensor)   # warm-up: connections set up
    rounds, start = 5, time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(tensor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / rounds
    if rank == 0:
        queue.put(2 * (world - 1) / world * payload / seconds)   # ring all-reduce: what each process sends
    dist.destroy_process_group()


def measure_allreduce(device: torch.device, payload: int = 32 * 2**20) -> float | None:
    """Bytes each of 2 processes sends per second in an all-reduce of `payload` bytes; None on one GPU, or where
    the two processes could not run one (said on stderr: the rest of the calibration stands without it)."""
    import sys

    import torch.multiprocessing as mp

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        queue = mp.get_context("spawn").SimpleQueue()
        try:
            mp.start_processes(_allreduce_worker, args=(2, os.path.join(folder, "store"), backend, payload, queue),
                               nprocs=2, join=True, start_method="spawn")
        except Exception as err:   # e.g. no loopback interface for gloo
            why = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            print(f"rayeff: the all-reduce was not measured ({why[-1][:200]}); plans will leave communication out "
                  "of their time", file=sys.stderr)
            return None
        return queue.get()


def calibrate(device_kind: str, threads: int | None, hidden_sizes: list[int] | None,
              min_seconds: float = 1.0, allreduce: bool = True) -> Calibration:
    from rayeff.config import EnergySpec
    from rayeff.measure.energy import make_meter

    if device_kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda, but torch sees no GPU here; calibrate on the machine kind the jobs use")
    device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
    sizes = sorted(set(hidden_sizes or DEFAULT_HIDDEN[device.type]))
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    meter = make_meter("auto", device, EnergySpec().watts_per_cpu)   # the estimate a run makes by default
    op_seconds = measure_op_seconds(device, min_seconds)
    meter.start()
    start = time.perf_counter()
    points = [measure_throughput(h, device, min_seconds, op_seconds) for h in sizes]
    seconds = time.perf_counter() - start
    joules = meter.read_joules()
    update, perturb = measure_update(device, min_seconds), measure_perturb(device, min_seconds)
    return Calibration(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), op_seconds=op_seconds, throughput=points,
        update_seconds_per_element=update[0], update_seconds_per_tensor=update[1],
        perturb_seconds_per_element=perturb[0], copy_seconds_per_element=perturb[1],
        allreduce_bytes_per_s=measure_allreduce(device) if allreduce else None,
        watts=joules / seconds, energy_source=meter.source, energy_formula=meter.formula,
        torch_version=torch.__version__, host=platform.node(),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
