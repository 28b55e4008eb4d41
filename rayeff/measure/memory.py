"""Memory: an exact account of the tensors training holds, and the device-level peak.

The tensor account splits what one worker holds into parameters, buffers, gradients, optimizer state (DeepSpeed's
float32 master weights included) and the activations autograd saved for backward (counted with saved-tensor hooks
at their peak, the end of the forward pass). Every storage counts once, whatever views point into it.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

import psutil
import torch
from torch import nn


class SavedActivationCounter:
    """Counts the bytes autograd saves for backward inside `with counter:`, each storage once, parameters excluded
    (they are counted as parameters). `peak_bytes` keeps the largest total over all uses. Under ZeRO-3 a weight is
    gathered into a new storage when its module runs: the parameters' storages are looked up again for every new
    storage, so a gathered weight saved for backward is not taken for an activation."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._param_storages = self._parameter_storages()
        self.peak_bytes = 0
        self._seen: dict[int, int] = {}
        self._hooks = None

    def _parameter_storages(self) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in self._model.parameters()}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. meta) hold no memory
            return tensor
        ptr = storage.data_ptr()
        if ptr in self._seen or ptr in self._param_storages:
            return tensor
        self._param_storages = self._parameter_storages()
        if ptr not in self._param_storages:
            self._seen[ptr] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivationCounter:
        self._seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.peak_bytes = max(self.peak_bytes, self.last_bytes)

    @property
    def last_bytes(self) -> int:
        return sum(self._seen.values())


def _innermost_optimizer(optimizer):
    """DeepSpeed wraps the torch optimizer (ZeRO, bf16/fp16); its state lives in the innermost one."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _tensors_in(value, depth: int = 0):
    """The tensors inside lists, tuples, dicts and DeepSpeed's small holder objects (e.g. a reduction bucket)."""
    if torch.is_tensor(value):
        yield value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif depth < 4 and type(value).__module__.startswith("deepspeed") and hasattr(value, "__dict__"):
        for item in vars(value).values():
            yield from _tensors_in(item, depth + 1)


def _held_by_wrappers(optimizer, kind: str):
    """Tensors the DeepSpeed optimizers around the torch one keep under attributes of one kind, by DeepSpeed's
    names. `gradients`: ZeRO's averaged gradient partitions and reduction buckets, the bf16 optimizer's float32
    gradient copies (`averaged_gradients`, `ipg_buckets`, `fp32_groups_gradients_flat`, `grads_in_partition`, ...).
    `masters`: the float32 master weights (`single_partition_of_fp32_groups`, `fp32_partitioned_groups_flat`,
    `fp32_groups_flat_partition`), which ZeRO-3 hands the torch optimizer only while it steps."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        for name, value in vars(optimizer).items():
            name = name.lower()
            gradients = "grad" in name or "ipg" in name
            if (kind == "gradients" and gradients) or (kind == "masters" and "fp32" in name and not gradients):
                yield from _tensors_in(value)
        optimizer = getattr(optimizer, "optimizer", None)


class _Storages:
    """Bytes of distinct storages: a view, a flat buffer and the parameters pointing into it count once."""

    def __init__(self):
        self.seen: set[int] = set()

    def bytes(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total


def optimizer_state_bytes(optimizer) -> int:
    inner = _innermost_optimizer(optimizer)
    return _Storages().bytes(v for state in getattr(inner, "state", {}).values() for v in state.values()
                             if torch.is_tensor(v))


def _logical_numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


@dataclass
class TensorAccount:
    trainable_params: int
    total_params: int
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    peak_activation_bytes: int

    def largest(self, other: TensorAccount | None) -> TensorAccount:
        """Field by field, the larger of two accounts of one worker taken at different moments of a step."""
        if other is None:
            return self
        return TensorAccount(**{k: max(v, getattr(other, k)) for k, v in asdict(self).items()})


def tensor_account(model: nn.Module, optimizer, activations: SavedActivationCounter,
                   expert_optimizer=None) -> TensorAccount:
    """Per-worker bytes of what training holds, each storage counted once, as the engine really holds it:
    parameters (ZeRO-3: this worker's partitions); buffers; gradients (`param.grad`, and DeepSpeed's own gradient
    partitions, reduction buckets and float32 gradient copies); optimizer state (every tensor of the torch
    optimizer's state, and the float32 master copies of the weights that DeepSpeed's ZeRO and bf16 optimizers keep
    as the torch optimizer's parameters); activations saved for backward at their peak. Split experts
    (`expert_optimizer`, rayeff/train/expert_optimizer.py) count with their own gradients and state. Taken after
    a backward and before the optimizer step, the account holds what a step holds at once."""
    params = list(model.parameters())
    counted = _Storages()
    param_bytes = counted.bytes([p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params])
    buffer_bytes = counted.bytes(model.buffers())
    optimizers = [o for o in (optimizer, getattr(expert_optimizer, "optimizer", None)) if o is not None]
    inner = [_innermost_optimizer(o) for o in optimizers]
    masters = [p for o in inner for group in o.param_groups for p in group["params"]] + \
        [t for o in optimizers for t in _held_by_wrappers(o, "masters") if t.is_floating_point()]
    grad_bytes = counted.bytes([p.grad for p in params + masters] +
                               [t for o in optimizers for t in _held_by_wrappers(o, "gradients")])
    optimizer_bytes = counted.bytes(masters + [v for o in inner for state in o.state.values()
                                               for v in state.values() if torch.is_tensor(v)])
    trainable = [p for p in params if p.requires_grad]
    return TensorAccount(
        trainable_params=sum(_logical_numel(p) for p in trainable),
        total_params=sum(_logical_numel(p) for p in params),
        param_bytes=param_bytes, buffer_bytes=buffer_bytes, grad_bytes=grad_bytes,
        optimizer_state_bytes=optimizer_bytes, peak_activation_bytes=activations.peak_bytes,
    )


class DevicePeak:
    """Peak device memory: CUDA's peak allocated bytes, or on a CPU the growth of peak RSS over the process's RSS
    when measuring started (Linux reports ru_maxrss in KiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._earlier_peak = 0   # CUDA: the peak before transient_bytes last reset the counter
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._baseline = psutil.Process().memory_info().rss

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return max(self._earlier_peak, int(torch.cuda.max_memory_allocated(self.device)))
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._baseline)

    def transient_bytes(self, fn) -> int:
        """CUDA: the most memory `fn()` allocates beyond what is allocated when it starts (its peak less the
        baseline), the run's peak so far kept for peak_bytes."""
        if self.device.type != "cuda":
            raise ValueError("transient_bytes measures CUDA allocations only")
        self._earlier_peak = self.peak_bytes()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        fn()
        return int(torch.cuda.max_memory_allocated(self.device)) - start

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss_growth"
