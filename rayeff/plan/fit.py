"""Whether a job's workers can hold its tensors, asked before a run starts (`rayeff run`, rayeff/cli.py) and before
a sweep starts a trial (`constraints.memory_per_worker_gb`, rayeff/tune/searcher.py): the planner's per-worker
total (rayeff/plan/planner.py) against the memory a worker has.

The plan counts tensors only (no CUDA context, allocator slack or unsaved temporaries). Its parameters and
optimizer state are exact, its ZeRO 1-2 gradients and its activations (full-length sequences) upper bounds: a job
over the limit is expected not to fit, and one under it may still run out of memory by the margins left out.
"""

from __future__ import annotations

from rayeff.config import JobSpec
from rayeff.errors import UserError

GB = 1e9


def local_gpu_memory_bytes() -> int | None:
    """The memory of this machine's smallest GPU, from NVML (which makes no CUDA context), or None without one."""
    try:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001  (no library, no driver, no GPU: nothing to check against)
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        return min((pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total
                    for i in range(count)), default=None)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def worker_memory_limit(job: JobSpec, memory_per_worker_gb: float | None, address: str | None
                        ) -> tuple[int, str] | None:
    """The bytes a worker of `job` has, and where that figure comes from: `--memory-per-worker`, else for a GPU job
    on this machine's own Ray its smallest GPU; None when neither applies (a CPU job, or a cluster's GPUs, which
    only the flag can describe)."""
    if memory_per_worker_gb is not None:
        if not 0 < memory_per_worker_gb < 1e6:
            raise UserError(f"--memory-per-worker: {memory_per_worker_gb}; give one worker's memory in GB (1e9 "
                            "bytes), e.g. 80")
        return round(memory_per_worker_gb * GB), f"--memory-per-worker {memory_per_worker_gb:g}"
    if job.scaling.gpus_per_worker > 0 and not address:
        local = local_gpu_memory_bytes()
        if local is not None:   # a worker given a fraction of a GPU shares it with others
            share = min(job.scaling.gpus_per_worker, 1.0)
            return round(local * share), f"this machine's smallest GPU ({local / GB:.1f} GB)" + (
                f" times the worker's {share:g} of it" if share < 1 else "")
    return None


def check_run_fits(job: JobSpec, memory_per_worker_gb: float | None, address: str | None,
                   strict: bool) -> str | None:
    """The warning to print when the plan puts more tensors on a worker than it has (None when they fit, or when
    there is no limit to check against); with `strict`, a UserError instead. A job the planner cannot plan is
    not checked (with `strict`, the returned line says so)."""
    from rayeff.plan.planner import worker_bytes

    limit = worker_memory_limit(job, memory_per_worker_gb, address)
    if limit is None:
        return None
    limit_bytes, source = limit
    try:
        planned = worker_bytes(job)
    except Exception as err:  # noqa: BLE001  (a check that cannot be made must not stop the run)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"rayeff: --strict: memory not checked, the job cannot be planned ({first})" if strict else None
    if planned <= limit_bytes:
        return None
    what = (f"the plan puts {planned / GB:.3f} GB of tensors on each worker ({job.method.name}, ZeRO-"
            f"{job.deepspeed.zero_stage}, {job.deepspeed.precision}, batch {job.micro_batch_size()} x "
            f"{job.training.max_seq_length}), over the {limit_bytes / GB:.3f} GB of {source}")
    if strict:
        raise UserError(f"--strict: {what}; lower training.batch_size or training.max_seq_length, raise "
                        "deepspeed.zero_stage, or choose a lighter method (`rayeff plan JOB --methods all` compares "
                        "them)")
    return f"rayeff: warning: {what}; expect it to run out of memory (--strict refuses such a run)"
