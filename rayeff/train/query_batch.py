"""Batched SPSA queries: B of a step's queries evaluated in one forward on one device.

Each query needs L(theta0 + eps z_q) and L(theta0 - eps z_q) on the same minibatch. Instead of 2B forwards, one
forward of the model runs under torch.func.vmap over 2B sets of the trained parameters (the rows of
Perturber.perturbed_rows, drawn from the queries' seeds as the sequential path draws them), the frozen backbone and
the minibatch shared: only what the trained parameters touch is computed 2B times, the backbone's matrices are read
once per layer for all copies, and everything before the first trained parameter (the embeddings, for adapters) is
computed once. The copies never exist as modules: torch.func.functional_call swaps the stacked parameters in.

A step's queries are cut into groups of B in query order (0..B-1, B..2B-1, ...) and the groups dealt round-robin
to the workers, so a group is evaluated the same way on whatever worker holds it: with a given B, N workers end
bitwise equal to one. Against the sequential path (B = 1) each loss differs by the rounding of a differently shaped
matrix product: within 2 float32 ulps of the loss, so g_q within 4 ulps / eps (tests/test_zeroth_order.py asserts
it); the weights then drift apart only at that level.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.func import functional_call, vmap

AUTO_MEMORY_FRACTION = 0.8   # of the device's free memory that "auto" lets a batch of copies take
AUTO_MOST = 64               # queries per forward "auto" picks at most


def query_groups(queries: int, batch: int, rank: int, world: int) -> list[list[int]]:
    """The query groups worker `rank` of `world` evaluates at a step of `queries` queries: groups of `batch`
    consecutive queries, dealt round-robin. With batch 1 this is queries rank, rank + N, rank + 2N, ..."""
    groups = [list(range(lo, min(lo + batch, queries))) for lo in range(0, queries, batch)]
    return groups[rank::world]


def busiest_worker_queries(queries: int, batch: int, world: int) -> int:
    """Queries of the worker holding the most at a step: the step takes as long as that worker."""
    return max(sum(len(g) for g in query_groups(queries, batch, rank, world)) for rank in range(world))


def auto_query_batch(device: torch.device, free_bytes: int, forward_bytes: int, trained_bytes: int, q_max: int,
                     world: int) -> int:
    """B for `query_batch: auto`. On a GPU: as many queries as fit their 2B copies of one forward's transient memory
    (`forward_bytes`, measured) and of the trained parameters in AUTO_MEMORY_FRACTION of the free memory, and no
    more than one worker's share of q_max (more would idle the other workers). On a CPU 1: a forward there is
    already bound by its matrix products, and `rayeff bench zo` measured batching no faster."""
    if device.type != "cuda":
        return 1
    per_query = 2 * (forward_bytes + trained_bytes)
    fits = int(AUTO_MEMORY_FRACTION * free_bytes // max(per_query, 1))
    return max(1, min(fits, math.ceil(q_max / world), AUTO_MOST))


class BatchedLosses:
    """The loss of the model at each of many sets of its trained parameters, in one vmapped forward.

    `trained` are (name, parameter) pairs in the Perturber's order; `loss_of(outputs, batch)` is the task's loss
    of one forward's outputs (a 0-d tensor)."""

    def __init__(self, module: torch.nn.Module, trained: list[tuple[str, torch.nn.Parameter]], loss_of):
        names = {id(p): n for n, p in module.named_parameters()}
        self.module, self.loss_of = module, loss_of
        self.names = [names[id(p)] for _, p in trained]   # as `module` names them (AutocastForward prefixes)
        self.shapes = [p.shape for _, p in trained]
        self.sizes = [p.numel() for _, p in trained]

    def __call__(self, rows: torch.Tensor, batch: dict) -> torch.Tensor:
        """(copies,) losses, one per row of `rows` (copies x trained parameters, flattened in order)."""
        params, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            params[name] = rows[:, offset:offset + size].view(rows.shape[0], *shape)
            offset += size

        def loss_at(one: dict) -> torch.Tensor:
            return self.loss_of(functional_call(self.module, one, (), batch), batch)

        with torch.no_grad(), warnings.catch_warnings():
            # Ops without a vmap batching rule (CPU flash attention among them) run once per copy, as the
            # sequential path runs them anyway; torch's warning says only that.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            return vmap(loss_at)(params)
