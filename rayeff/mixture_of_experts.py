"""A Mixture-of-Experts feed-forward layer: a learned top-k router, expert capacity with token dropping, and the
router's auxiliary losses.

    layer = MoEFeedForward([copy.deepcopy(ffn) for _ in range(4)], width=384, top_k=1, capacity_factor=1.25)
    y = layer(x)                      # (batch, tokens, width) -> same shape
    loss = task_loss + layer.loss_term()

Routing: softmax over the router logits. With k >= 2 (Mixtral's normalisation) the k largest probabilities are
renormalised to sum to 1, so k identical experts give exactly the dense output. With k = 1 renormalising would make
the gate always 1 and give the router no gradient from the task loss, so the top-1 gate is either the raw
probability p (`top1_gate: probability`, Switch Transformer's: the output is p E(x)) or p / stop_grad(p)
(`straight_through`: the value is 1, so identical experts still give the dense output, and the gradient is p's,
divided by p). Capacity (Switch/GShard): each expert takes at most
ceil(capacity_factor * tokens * k / experts) assignments, first choices of every token before second choices, in
token order; across data-parallel workers, of the global batch's tokens in its global order, so that N workers drop
what one would (`within_global_capacity`); an assignment past capacity is dropped (the token's other choices still
count; a token with none left contributes zero, so the block's residual carries it through unchanged).

Auxiliary losses: the load-balancing loss of Switch Transformer, E * sum_e f_e * P_e (f_e the fraction of
assignments routed to expert e before dropping, P_e its mean router probability), which is 1 for perfectly balanced
routing and grows as routing concentrates; and ST-MoE's router z-loss, mean(logsumexp(logits)^2), which keeps
logits small. Padding tokens are not routed: the method hands each layer the batch's attention mask (`token_mask`).

Across data-parallel workers (`distribute`), both losses are those of the global batch (counts and token numbers
are all-reduced), and with `expert_parallel` each worker holds E / W of the experts: every worker routes its own
tokens, an all-to-all sends each assignment to the worker holding its expert, and a second all-to-all brings the
results back (GShard's expert parallelism). The backward pass sends the gradients back the same way, so an expert's
gradient sums the contributions of every worker's tokens.

A Hugging Face MoE model's own routers (Mixtral, Qwen2-MoE, Switch, ...) are watched by `NativeRouter`, which keeps
the same losses and load figures; the training loop reads both kinds through `RouterStatistics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Routing:
    probs: torch.Tensor      # (tokens, experts): softmax of the router logits
    experts: torch.Tensor    # (tokens, k): chosen experts, best first
    weights: torch.Tensor    # (tokens, k): the gates (see top_k_routing)
    keep: torch.Tensor       # (tokens, k): False where the expert was full


TOP1_GATES = ("probability", "straight_through")


def top_k_routing(logits: torch.Tensor, k: int, top1_gate: str = "probability"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, chosen experts best first, their gates). Gates: for k >= 2 the chosen probabilities
    renormalised to sum to 1; for k = 1 the probability itself, or with `straight_through` p / stop_grad(p),
    whose value is 1 and whose gradient is p's (either way the router learns from the task loss)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, experts = probs.topk(k, dim=-1)
    if k > 1:
        return probs, experts, top / top.sum(dim=-1, keepdim=True)
    if top1_gate == "straight_through":
        return probs, experts, top / top.detach()
    return probs, experts, top


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


def within_global_capacity(experts: torch.Tensor, rows: torch.Tensor, batch_rows: int, num_experts: int,
                           capacity_factor: float, group) -> torch.Tensor:
    """within_capacity over the global batch of which these tokens are one worker's share, so that W workers drop
    exactly the assignments one worker would drop: capacity from the global token count, and each expert's queue in
    the global order, choice 0 of every token first, then by global row, then token. Worker r's row j is global row
    j * W + r (DistributedSampler's interleaving, as the loops read the data). `rows`: each token's row in this
    worker's batch of `batch_rows` rows. One all-gather of a (k, rows, experts) count table."""
    tokens, k = experts.shape
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([batch_rows], device=experts.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    rows_max = int(size)
    counts = torch.zeros(k, rows_max, num_experts, dtype=torch.long, device=experts.device)
    choice = torch.arange(k, device=experts.device).repeat(tokens)
    counts.index_put_((choice, rows.repeat_interleave(k), experts.reshape(-1)),
                      torch.ones(tokens * k, dtype=torch.long, device=experts.device), accumulate=True)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=group)
    everyone = torch.stack(gathered, dim=2).reshape(k, rows_max * world, num_experts)   # global row j * W + r
    per_choice = everyone.sum(1)                                                         # (k, experts)
    capacity = expert_capacity(int(per_choice.sum()) // k, num_experts, k, capacity_factor)
    earlier_choices = per_choice.cumsum(0) - per_choice
    earlier_rows = everyone.cumsum(1) - everyone
    my_earlier_rows = counts.cumsum(1) - counts
    chosen = experts.t()                                                                 # (k, tokens)
    mine_so_far = (nn.functional.one_hot(chosen, num_experts).cumsum(1) - 1).gather(2, chosen[..., None])[..., 0]
    c, j = torch.arange(k, device=experts.device)[:, None], rows[None, :]
    position = earlier_choices[c, chosen] + earlier_rows[c, j * world + rank, chosen] + \
        mine_so_far - my_earlier_rows[c, j, chosen]
    return (position < capacity).t()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int,
                        batch: GlobalBatch | None = None) -> torch.Tensor:
    """Switch's E * sum_e f_e * P_e. With `batch`, f and P are those of the global batch of which these tokens are
    one worker's share: averaged over the workers, their loss terms (and gradients) are the global batch's."""
    if batch is None:
        batch = GlobalBatch.local(assignment_counts(experts, num_experts), experts.shape[0])
    fraction = batch.assignments / (batch.tokens * experts.shape[1])
    return num_experts * batch.workers * (fraction * probs.sum(dim=0) / batch.tokens).sum()


def assignment_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert of a (tokens, k) choice."""
    return torch.bincount(experts.reshape(-1), minlength=num_experts)


def router_z_loss(logits: torch.Tensor, batch: GlobalBatch | None = None) -> torch.Tensor:
    tokens, workers = (logits.shape[0], 1) if batch is None else (batch.tokens, batch.workers)
    return torch.logsumexp(logits.float(), dim=-1).pow(2).sum() * workers / max(tokens, 1)


@dataclass
class GlobalBatch:
    """What the auxiliary losses need from the whole step's batch: assignments per expert and routed tokens."""
    assignments: torch.Tensor   # (experts,) float
    tokens: float
    workers: int

    @staticmethod
    def local(counts: torch.Tensor, tokens: int) -> GlobalBatch:
        return GlobalBatch(counts.float(), max(tokens, 1), 1)

    @staticmethod
    def over(group, counts: torch.Tensor, tokens: int) -> GlobalBatch:
        """Summed over the workers of `group` (one all-reduce, outside autograd: counts have no gradient)."""
        totals = torch.cat([counts, torch.tensor([tokens], device=counts.device)]).double()
        dist.all_reduce(totals, group=group)
        return GlobalBatch(totals[:-1].float(), max(float(totals[-1]), 1.0), dist.get_world_size(group))


class _AllToAll(torch.autograd.Function):
    """Rows of `x` in `send` consecutive blocks, one per worker; returns the blocks every worker sent here. The
    backward pass sends each row's gradient back to where the row came from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


class RouterStatistics(nn.Module):
    """What the training loop reads from every router, ours or a Hugging Face model's own: the step's auxiliary
    losses (`loss_term`), and the load counted in training mode (`take_counts`). Subclasses call `observe` with
    each forward's routing."""

    def __init__(self, num_experts: int, top_k: int, aux_loss_coef: float, z_loss_coef: float):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.aux_loss = self.z_loss = torch.zeros(())
        self.distributed, self.group = False, None    # see distribute()
        self.expert_parallel = False                  # split the experts over the workers (MoEFeedForward)
        self.token_mask: torch.Tensor | None = None   # (batch, tokens), 1 for a real token: set before each forward
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped", torch.zeros(2, dtype=torch.long), persistent=False)  # dropped, assigned

    def distribute(self, group) -> None:
        """Compute the auxiliary losses over the data-parallel `group` (None: all workers)."""
        self.distributed, self.group = True, group

    def real_rows(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """Which of `rows` flattened (batch, tokens) positions are not padding; None when every row counts (no
        mask, or a mask of other positions, as for T5's decoder)."""
        mask = self.token_mask
        if mask is None or mask.numel() != rows:
            return None
        return torch.nonzero(mask.reshape(-1).to(device), as_tuple=True)[0]

    def observe(self, probs: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor) -> None:
        counts = assignment_counts(experts, self.num_experts)
        batch = GlobalBatch.over(self.group, counts, experts.shape[0]) if self.distributed else \
            GlobalBatch.local(counts, experts.shape[0])
        self.aux_loss = load_balancing_loss(probs, experts, self.num_experts, batch)
        self.z_loss = router_z_loss(logits, batch)
        if self.training:   # the load of training batches only; evaluation does not count
            with torch.no_grad():
                self.load += counts
                self.dropped += torch.tensor([int((~keep).sum()), keep.numel()], device=self.dropped.device)

    def loss_term(self) -> torch.Tensor:
        return self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss

    def take_counts(self) -> tuple[list[int], int, int]:
        """(assignments per expert, dropped, assigned) since the last call, and start counting afresh."""
        load, (dropped, assigned) = self.load.tolist(), self.dropped.tolist()
        self.load.zero_()
        self.dropped.zero_()
        return load, dropped, assigned


class MoEFeedForward(RouterStatistics):
    """Experts (modules mapping (n, width) -> (n, width)) behind a top-k router. After each forward it holds the
    step's auxiliary losses; `take_counts` hands over the load counted since it was last called."""

    def __init__(self, experts: list[nn.Module], width: int, top_k: int, capacity_factor: float | None,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, top1_gate: str = "probability"):
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k {top_k} must be between 1 and the number of experts ({len(experts)})")
        if top1_gate not in TOP1_GATES:
            raise ValueError(f"top1_gate {top1_gate!r} must be one of {TOP1_GATES}")
        super().__init__(len(experts), top_k, aux_loss_coef, z_loss_coef)
        self.experts = nn.ModuleList(experts)   # the experts this worker holds: first_expert, first_expert + 1, ...
        self.first_expert, self.split = 0, False
        self.router = nn.Linear(width, len(experts), bias=False)
        self.capacity_factor = capacity_factor
        self.top1_gate = top1_gate

    def distribute(self, group) -> None:
        """As RouterStatistics; with `expert_parallel`, keep only this worker's E / W experts (the others are deleted
        here) and exchange tokens with the other workers."""
        super().distribute(group)
        self.split = self.expert_parallel
        if self.split:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            if self.num_experts % world:
                raise ValueError(f"{self.num_experts} experts cannot be split evenly over {world} workers")
            per_worker = self.num_experts // world
            self.first_expert = rank * per_worker
            self.experts = nn.ModuleList(list(self.experts)[self.first_expert:self.first_expert + per_worker])

    def expert_size(self) -> int:
        return sum(p.numel() for p in self.experts[0].parameters())

    def router_size(self) -> int:
        return self.router.weight.numel()

    def held_experts(self) -> int:
        return len(self.experts)

    def route(self, tokens: torch.Tensor, rows: torch.Tensor, batch_rows: int) -> tuple[Routing, torch.Tensor]:
        """Route `tokens` (rows of the batch `rows`). Across workers, capacity is the global batch's."""
        logits = self.router(tokens)
        probs, experts, weights = top_k_routing(logits, self.top_k, self.top1_gate)
        if self.distributed and self.capacity_factor is not None:
            keep = within_global_capacity(experts, rows, batch_rows, self.num_experts, self.capacity_factor,
                                          self.group)
        else:
            capacity = expert_capacity(tokens.shape[0], self.num_experts, self.top_k, self.capacity_factor)
            keep = within_capacity(experts, self.num_experts, capacity)
        return Routing(probs, experts, weights, keep), logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        real = self.real_rows(flat.shape[0], hidden.device)
        tokens = flat if real is None else flat[real]
        positions = torch.arange(flat.shape[0], device=hidden.device) if real is None else real
        per_row = hidden.shape[1] if hidden.dim() == 3 else flat.shape[0]
        routing, logits = self.route(tokens, positions // per_row, flat.shape[0] // per_row)
        mixed = self._mix_split(tokens, routing) if self.split else self._mix_local(tokens, routing)
        self.observe(routing.probs, routing.experts, routing.keep, logits)
        out = mixed if real is None else torch.zeros_like(flat).index_copy(0, real, mixed)
        return out.reshape(hidden.shape)

    def _mix_local(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            # An expert that gets no token still runs (on none): its gradient is then zeros rather than missing,
            # so data-parallel workers all-reduce the same tensors whatever their batches routed where.
            token, choice = torch.nonzero((routing.experts == e) & routing.keep, as_tuple=True)
            weight = routing.weights[token, choice].to(tokens.dtype)[:, None]
            out.index_add_(0, token, weight * expert(tokens[token]))
        return out

    def _mix_split(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Experts split over the workers: each kept assignment travels to its expert's worker and back."""
        world, held = dist.get_world_size(self.group), len(self.experts)
        token, choice = torch.nonzero(routing.keep, as_tuple=True)
        expert = routing.experts[token, choice]
        order = torch.argsort(expert, stable=True)            # grouped by worker, then by expert
        token, choice, expert = token[order], choice[order], expert[order]
        sending = torch.bincount(expert, minlength=self.num_experts)
        receiving = torch.empty_like(sending)                  # (source worker, my expert) counts
        dist.all_to_all_single(receiving, sending, group=self.group)
        send = sending.view(world, held).sum(1).tolist()
        receive = receiving.view(world, held).sum(1).tolist()
        inbox = _AllToAll.apply(tokens[token], send, receive, self.group)
        which = torch.arange(held, device=tokens.device).repeat(world).repeat_interleave(receiving)
        outbox = torch.zeros_like(inbox)
        for j, expert_module in enumerate(self.experts):      # every held expert runs, on no rows if need be
            rows = torch.nonzero(which == j, as_tuple=True)[0]
            outbox.index_add_(0, rows, expert_module(inbox[rows]))
        returned = _AllToAll.apply(outbox, receive, send, self.group)
        weight = routing.weights[token, choice].to(tokens.dtype)[:, None]
        return torch.zeros_like(tokens).index_add_(0, token, weight * returned)


class NativeRouter(RouterStatistics):
    """The router of a Hugging Face MoE block (Mixtral, Qwen2-MoE, OLMoE, Switch Transformers, ...), watched by a
    forward hook: from the logits the router returns, the same auxiliary losses and load as MoEFeedForward keeps.
    The block computes as before; only what it routes is observed. Construct with the router module, the block's
    experts module (all E experts) and the index of the logits in the router's output (Hugging Face's own
    `_can_record_outputs["router_logits"]` says which)."""

    def __init__(self, router: nn.Module, experts: nn.Module, logits_index: int, aux_loss_coef: float,
                 z_loss_coef: float):
        super().__init__(router.num_experts, getattr(router, "top_k", 1), aux_loss_coef, z_loss_coef)
        self.logits_index = logits_index
        self.all_expert_params = sum(p.numel() for p in experts.parameters())
        self.router_params = sum(p.numel() for p in router.parameters())
        # Switch's router applies expert capacity itself: its first output is the dispatch mask after dropping.
        self.dispatch_mask = hasattr(router, "expert_capacity")
        router.register_forward_hook(self._watch)
        if any(True for child in experts.children() for _ in child.parameters()):   # one module per expert
            experts.register_forward_hook(_every_expert_runs)

    def _watch(self, _router, _args, output) -> None:
        logits = output[self.logits_index].reshape(-1, self.num_experts)
        probs = torch.softmax(logits.float(), dim=-1)
        experts = probs.topk(self.top_k, dim=-1).indices
        if self.dispatch_mask:
            keep = output[0].reshape(-1, self.num_experts).sum(-1, keepdim=True) > 0
        else:
            keep = torch.ones_like(experts, dtype=torch.bool)
        real = self.real_rows(logits.shape[0], logits.device)
        if real is not None:
            probs, experts, keep, logits = probs[real], experts[real], keep[real], logits[real]
        self.observe(probs, experts, keep, logits)

    def expert_size(self) -> int:
        return self.all_expert_params // self.num_experts

    def router_size(self) -> int:
        return self.router_params

    def held_experts(self) -> int:
        return self.num_experts


def _every_expert_runs(experts: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Hugging Face's blocks run only the experts some token chose, so a worker whose batch chose none of one expert
    would hold no gradient for it, and data-parallel workers must reduce the same gradients. Running each expert
    on no tokens adds nothing to the output and gives the unchosen ones a zero gradient, as in MoEFeedForward."""
    if not torch.is_grad_enabled():
        return output
    nothing = args[0][:0]
    return output + sum(expert(nothing).sum() for expert in experts.children())


def moe_layers(model: nn.Module) -> list[RouterStatistics]:
    """Every router of the model whose losses train and whose load is reported: upcycled layers or native ones."""
    return [m for m in model.modules() if isinstance(m, RouterStatistics)]


def coefficient_of_variation(counts: list[int]) -> float:
    """Standard deviation over mean of per-expert loads: 0 for perfect balance."""
    t = torch.tensor(counts, dtype=torch.float64)
    return float(t.std(unbiased=False) / t.mean()) if t.sum() > 0 else 0.0


def parameter_figures(model: nn.Module) -> dict:
    """Total parameters, parameters active per token, and forward FLOPs per token of this model and of its dense
    counterpart (one expert per MoE block, no router: the model upcycling started from). FLOPs are an estimate:
    2 x the non-embedding parameters a token passes through (a multiply and an add each); attention's
    sequence-length term is left out of both."""
    layers = moe_layers(model)
    held_elsewhere = sum((layer.num_experts - layer.held_experts()) * layer.expert_size() for layer in layers)
    total = sum(p.numel() for p in model.parameters()) + held_elsewhere
    tables = {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}   # shared once
    embedding = sum(p.numel() for p in tables.values())
    inactive = dense_extra = 0
    for layer in layers:
        per_expert = layer.expert_size()
        inactive += (layer.num_experts - layer.top_k) * per_expert
        dense_extra += (layer.num_experts - 1) * per_expert + layer.router_size()
    active, dense = total - inactive, total - dense_extra
    return {"total_params": total, "active_params_per_token": active, "dense_params": dense,
            "flops_per_token": 2 * (active - embedding), "dense_flops_per_token": 2 * (dense - embedding),
            "flops_ratio_to_dense": (active - embedding) / max(dense - embedding, 1),
            "flops_formula": "2 x non-embedding parameters active per token (attention's length term left out)"}
