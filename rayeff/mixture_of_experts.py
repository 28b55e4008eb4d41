"""A Mixture-of-Experts feed-forward layer: a learned top-k router, expert capacity with token dropping, and the
router's auxiliary losses.

    layer = MoEFeedForward([copy.deepcopy(ffn) for _ in range(4)], width=384, top_k=1, capacity_factor=1.25)
    y = layer(x)                      # (batch, tokens, width) -> same shape
    loss = task_loss + layer.loss_term()

Routing (Mixtral's normalisation): softmax over the router logits, the k largest probabilities renormalised to sum
to 1, so k identical experts give exactly the dense output. Capacity (Switch/GShard): each expert takes at most
ceil(capacity_factor * tokens * k / experts) assignments, first choices of every token before second choices, in
token order; an assignment past capacity is dropped (the token's other choices still count; a token with none left
contributes zero, so the block's residual carries it through unchanged).

Auxiliary losses: the load-balancing loss of Switch Transformer, E * sum_e f_e * P_e (f_e the fraction of
assignments routed to expert e before dropping, P_e its mean router probability), which is 1 for perfectly balanced
routing and grows as routing concentrates; and ST-MoE's router z-loss, mean(logsumexp(logits)^2), which keeps
logits small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    probs: torch.Tensor      # (tokens, experts): softmax of the router logits
    experts: torch.Tensor    # (tokens, k): chosen experts, best first
    weights: torch.Tensor    # (tokens, k): their probabilities renormalised to sum to 1
    keep: torch.Tensor       # (tokens, k): False where the expert was full


def top_k_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    top, experts = probs.topk(k, dim=-1)
    return probs, experts, top / top.sum(dim=-1, keepdim=True)


def expert_capacity(tokens: int, num_experts: int, k: int, capacity_factor: float | None) -> int:
    """Assignments one expert takes; None means no limit (no token is ever dropped)."""
    if capacity_factor is None:
        return tokens
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def within_capacity(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(tokens, k) mask of the assignments an expert accepts: choice 0 of every token first, then choice 1, ...,
    each in token order."""
    order = experts.t().reshape(-1)                               # choice-major: all first choices first
    one_hot = nn.functional.one_hot(order, num_experts)
    position = (one_hot.cumsum(dim=0) - 1).gather(1, order[:, None]).squeeze(1)
    return (position < capacity).reshape(experts.shape[1], experts.shape[0]).t()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    fraction = torch.bincount(experts.reshape(-1), minlength=num_experts).float() / experts.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoEFeedForward(nn.Module):
    """Experts (modules mapping (n, width) -> (n, width)) behind a top-k router. After each forward it holds the
    step's auxiliary losses; `take_counts` hands over the load counted since it was last called."""

    def __init__(self, experts: list[nn.Module], width: int, top_k: int, capacity_factor: float | None,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k {top_k} must be between 1 and the number of experts ({len(experts)})")
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(width, len(experts), bias=False)
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.aux_loss = self.z_loss = torch.zeros(())
        self.register_buffer("load", torch.zeros(len(experts), dtype=torch.long), persistent=False)
        self.register_buffer("dropped", torch.zeros(2, dtype=torch.long), persistent=False)  # dropped, assigned

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, tokens: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        logits = self.router(tokens)
        probs, experts, weights = top_k_routing(logits, self.top_k)
        capacity = expert_capacity(tokens.shape[0], self.num_experts, self.top_k, self.capacity_factor)
        return Routing(probs, experts, weights, within_capacity(experts, self.num_experts, capacity)), logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        routing, logits = self.route(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            # An expert that gets no token still runs (on none): its gradient is then zeros rather than missing,
            # so data-parallel workers all-reduce the same tensors whatever their batches routed where.
            token, choice = torch.nonzero((routing.experts == e) & routing.keep, as_tuple=True)
            weight = routing.weights[token, choice].to(tokens.dtype)[:, None]
            out.index_add_(0, token, weight * expert(tokens[token]))
        self.aux_loss = load_balancing_loss(routing.probs, routing.experts, self.num_experts)
        self.z_loss = router_z_loss(logits)
        if self.training:   # the load of training batches only; evaluation does not count
            with torch.no_grad():
                self.load += torch.bincount(routing.experts.reshape(-1), minlength=self.num_experts)
                self.dropped += torch.tensor([int((~routing.keep).sum()), routing.keep.numel()],
                                             device=self.dropped.device)
        return out.reshape(hidden.shape)

    def loss_term(self) -> torch.Tensor:
        return self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss

    def take_counts(self) -> tuple[list[int], int, int]:
        """(assignments per expert, dropped, assigned) since the last call, and start counting afresh."""
        load, (dropped, assigned) = self.load.tolist(), self.dropped.tolist()
        self.load.zero_()
        self.dropped.zero_()
        return load, dropped, assigned


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def coefficient_of_variation(counts: list[int]) -> float:
    """Standard deviation over mean of per-expert loads: 0 for perfect balance."""
    t = torch.tensor(counts, dtype=torch.float64)
    return float(t.std(unbiased=False) / t.mean()) if t.sum() > 0 else 0.0


def parameter_figures(model: nn.Module) -> dict:
    """Total parameters, parameters active per token, and forward FLOPs per token of this model and of the dense
    model it was upcycled from. FLOPs are an estimate: 2 x the non-embedding parameters a token passes through
    (a multiply and an add each); attention's sequence-length term is left out of both."""
    total = sum(p.numel() for p in model.parameters())
    tables = {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}   # shared once
    embedding = sum(p.numel() for p in tables.values())
    inactive = dense_extra = 0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        inactive += (layer.num_experts - layer.top_k) * per_expert
        dense_extra += (layer.num_experts - 1) * per_expert + layer.router.weight.numel()
    active, dense = total - inactive, total - dense_extra
    return {"total_params": total, "active_params_per_token": active, "dense_params": dense,
            "flops_per_token": 2 * (active - embedding), "dense_flops_per_token": 2 * (dense - embedding),
            "flops_ratio_to_dense": (active - embedding) / max(dense - embedding, 1),
            "flops_formula": "2 x non-embedding parameters active per token (attention's length term left out)"}
