"""The experts a worker holds under expert parallelism, stepped by their own optimizer beside DeepSpeed's.

DeepSpeed (ZeRO 1-2) averages the gradients of the parameters in its optimizer over all workers. Split experts must
stay out of that: worker 0's expert slot 0 is a different expert from worker 1's. Their gradients are already whole
(the all-to-all's backward brought every worker's contribution to the worker holding the expert), so this optimizer
divides them by the number of workers (data parallelism averages the workers' losses), clips them by their norm
over all workers, and steps AdamW with the same learning-rate schedule as the rest of the model. Checkpoints hold one
file per worker with its experts under their global names.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rayeff.mixture_of_experts import MoEFeedForward
from rayeff.train.checkpoint_safety import safe_load
from rayeff.train.collectives import all_gather


def expert_parameters(layers: list[MoEFeedForward]) -> list[nn.Parameter]:
    return [p for layer in layers for p in layer.experts.parameters() if p.requires_grad]


class ExpertOptimizer:
    def __init__(self, model: nn.Module, layers: list[MoEFeedForward], optimizer: torch.optim.Optimizer,
                 scheduler, max_norm: float):
        """`optimizer` and `scheduler` step `expert_parameters(layers)` (built like DeepSpeed's, by the loop)."""
        self.model, self.layers = model, layers
        self.params = expert_parameters(layers)
        self.optimizer, self.scheduler, self.max_norm = optimizer, scheduler, max_norm
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        for g in grads:
            g.div_(self.world)
        if self.max_norm > 0 and grads:
            squares = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
            if self.world > 1:
                dist.all_reduce(squares)
            scale = self.max_norm / (float(squares.sqrt()) + 1e-6)
            if scale < 1.0:
                for g in grads:
                    g.mul_(scale)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _named(self) -> dict[str, nn.Parameter]:
        """This worker's trained expert weights, under the names they have in the unsplit model."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return {f"{names[id(layer)]}.experts.{layer.first_expert + j}.{name}": p
                for layer in self.layers for j, expert in enumerate(layer.experts)
                for name, p in expert.named_parameters() if p.requires_grad}

    def global_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in self._named().items()}

    def gathered_weights(self) -> dict[str, torch.Tensor]:
        """Every worker's experts (a collective: every worker calls it; all of them get the whole set)."""
        return {k: v for part in all_gather(self.global_weights()) for k, v in part.items()}

    def save(self, path: Path) -> None:
        torch.save({"weights": self.global_weights(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "workers": self.world}, path)

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise RuntimeError(f"{path.name} is missing from the checkpoint: it was written by a run with another "
                               "number of workers; resume expert-parallel runs with the same scaling.num_workers")
        saved = safe_load(path)   # weights-only: tensors and plain data (rayeff/train/checkpoint_safety.py)
        if set(saved["weights"]) != set(self._named()):
            raise RuntimeError(f"{path.name} holds other experts than this worker's; resume with the same "
                               f"scaling.num_workers as the checkpointed run ({saved['workers']})")
        with torch.no_grad():
            for name, p in self._named().items():
                p.copy_(saved["weights"][name].to(p.dtype))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
