"""Memory: an exact account of the tensors training holds, and the device-level peak.

The tensor account splits what one worker holds into parameters, gradients, optimizer state and the activations
autograd saved for backward (counted with saved-tensor hooks at their peak, the end of the forward pass).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import psutil
import torch
from torch import nn


class SavedActivationCounter:
    """Counts the bytes autograd saves for backward inside `with counter:`, each storage once, parameters excluded
    (they are counted as parameters). `peak_bytes` keeps the largest total over all uses."""

    def __init__(self, model: nn.Module):
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.peak_bytes = 0
        self._seen: dict[int, int] = {}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. meta) hold no memory
            return tensor
        ptr = storage.data_ptr()
        if ptr not in self._param_storages and ptr not in self._seen:
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
    """DeepSpeed wraps the torch optimizer (ZeRO, fp16); its state lives in the innermost one."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(optimizer) -> int:
    inner = _innermost_optimizer(optimizer)
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def _local_numel(p: torch.Tensor) -> int:
    """Elements this worker holds: ZeRO-3 keeps only a partition (`ds_tensor`) of each parameter."""
    return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()


def _logical_numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


@dataclass
class TensorAccount:
    trainable_params: int
    total_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    peak_activation_bytes: int


def tensor_account(model: nn.Module, optimizer, activations: SavedActivationCounter, zero_stage: int,
                   world_size: int, expert_optimizer=None) -> TensorAccount:
    """Per-worker bytes. Gradients: one per trainable element in the parameter's dtype, partitioned over the workers
    under ZeRO 2 and 3 (DeepSpeed's layout); optimizer state: every tensor the optimizer holds, counted. Split
    experts (`expert_optimizer`, rayeff/train/expert_optimizer.py) keep whole gradients and their own state."""
    params = list(model.parameters())
    apart = {id(p) for p in expert_optimizer.params} if expert_optimizer is not None else set()
    trainable = [p for p in params if p.requires_grad]
    grad_elems = sum(_logical_numel(p) * p.element_size() for p in trainable if id(p) not in apart)
    if zero_stage >= 2:
        grad_elems = -(-grad_elems // world_size)
    grad_elems += sum(p.numel() * p.element_size() for p in trainable if id(p) in apart)
    optimizer_bytes = optimizer_state_bytes(optimizer) if optimizer is not None else 0
    if expert_optimizer is not None:
        optimizer_bytes += optimizer_state_bytes(expert_optimizer.optimizer)
    return TensorAccount(
        trainable_params=sum(_logical_numel(p) for p in trainable),
        total_params=sum(_logical_numel(p) for p in params),
        param_bytes=sum(_local_numel(p) * p.element_size() for p in params),
        grad_bytes=grad_elems,
        optimizer_state_bytes=optimizer_bytes,
        peak_activation_bytes=activations.peak_bytes,
    )


class DevicePeak:
    """Peak device memory: CUDA's peak allocated bytes, or on a CPU the growth of peak RSS over the process's RSS
    when measuring started (Linux reports ru_maxrss in KiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._baseline = psutil.Process().memory_info().rss

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._baseline)

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss_growth"
