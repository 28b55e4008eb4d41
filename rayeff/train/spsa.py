"""Zeroth-order (SPSA) estimation: directions from seeds, exact perturb / restore, the update replayed from seeds,
and the adaptive query schedule. No autograd and no direction tensor is ever stored.

For query q with direction z_q ~ N(0, I) over the trainable parameters theta and one minibatch B:

    g_q = (L(theta + eps z_q; B) - L(theta - eps z_q; B)) / (2 eps)          the projected gradient, a scalar
    theta <- theta - lr ((1/Q) sum_q g_q z_q + wd theta)                       no decay on 1-D tensors (biases, norms)

z_q is drawn parameter by parameter from a generator seeded with the query's seed, so it can be regenerated for the
update from (seed, g_q) alone: that pair is all the workers exchange. Perturbations are written in place from a
copy of the step's starting values (theta0 + eps z, theta0 - eps z, then theta0 again), which makes the restore
exact to the bit: adding and subtracting eps z in floating point is not (about half of float32 entries come back
off by an ulp), and replicas that each evaluated different queries would drift apart. The copy costs the trainable
parameters once, which for adapters and LoRA is small.

Sparse-MeZO: with `sparsity` s, only each weight matrix's (1 - s) smallest-magnitude entries are perturbed and
updated; the threshold is recomputed from theta0 at every step and the mask from it wherever z is drawn.
"""

from __future__ import annotations

import math
import torch

MAX_QUERIES = 4096          # queries per step: 12 bits of the seed
MAX_STEPS = 2**28           # steps: 28 bits
MAX_RUN_SEED = 2**23        # run seeds: 23 bits (a 63-bit seed in all)


def derived_beta(alpha: float, q_target: int, k_last: int) -> float:
    """beta with floor(alpha * k_last^beta) = q_target: ln(q_target / alpha) / ln(k_last); 0 when k_last is 1."""
    if k_last <= 1:
        return 0.0
    return max(0.0, math.log(q_target / alpha) / math.log(k_last))


def queries_at(k: int, alpha: float, beta: float, q_max: int) -> int:
    """Q_k = min(max(floor(alpha * k^beta), 1), q_max), k counted from 1. A hair of slack absorbs the rounding
    of k^beta when beta was derived to hit an integer exactly."""
    return min(max(math.floor(alpha * k ** beta + 1e-9), 1), q_max)


class QuerySchedule:
    """Q at each step. A `q_target` is reached at the last epoch (or step). A run of one epoch or less has no second
    epoch for Q to grow in: there the schedule counts steps instead, and `note` says so (result.json carries it).
    A target that even the steps cannot reach (a one-step run) is a ValueError naming q_target."""

    def __init__(self, alpha: float, beta: float | None, q_target: int | None, q_max: int, over: str,
                 total_epochs: int, total_steps: int):
        self.alpha, self.q_max, self.over, self.note = alpha, q_max, over, None
        self.k_last = total_epochs if over == "epochs" else total_steps
        if q_target is not None and self.k_last <= 1 and over == "epochs":
            self.over, self.k_last = "steps", total_steps
            self.note = (f"schedule_over: epochs, but the run spans {total_epochs} epoch, where Q could not grow to "
                         f"q_target {q_target}; the schedule counts steps instead")
        self.beta = beta if beta is not None else derived_beta(alpha, q_target, self.k_last)
        wanted = min(q_target or 0, q_max)
        if queries_at(self.k_last, alpha, self.beta, q_max) < wanted:
            raise ValueError(f"method.q_target: {q_target} queries cannot be reached in a run of "
                             f"{total_steps} step(s) (Q starts at {queries_at(1, alpha, 0.0, q_max)}); "
                             "train for more steps, or set beta instead of q_target")

    def queries(self, epoch: int, step: int) -> int:
        """Queries at this 0-based epoch and step."""
        k = (epoch if self.over == "epochs" else step) + 1
        return queries_at(k, self.alpha, self.beta, self.q_max)


def query_seed(run_seed: int, step: int, query: int) -> int:
    """A seed unique to (run seed, step, query): the three packed into disjoint bits of a 63-bit integer, so no two
    queries of a run, on any worker, ever share one."""
    if not (0 <= run_seed < MAX_RUN_SEED and 0 <= step < MAX_STEPS and 0 <= query < MAX_QUERIES):
        raise ValueError(f"seed fields out of range: run seed {run_seed}, step {step}, query {query}")
    return (run_seed << 40) | (step << 12) | query


class Perturber:
    """SPSA on a fixed list of parameters. Typical step:

        perturber.begin_step()                      # copy theta0, thresholds for sparsity
        perturber.set(seed, +1, eps); L+ = loss(); perturber.set(seed, -1, eps); L- = loss(); perturber.restore()
        ...
        perturber.update([(seed, g), ...], lr, weight_decay)

    The parameters are re-pointed into one flat buffer (each keeps its shape as a view of it), so a perturbation is
    a few kernels over the buffer rather than a few per parameter: with hundreds of small TT cores, per-parameter
    launches dominated the step on a GPU. z is drawn over the buffer in chunks of `chunk` elements from one
    generator, so the transient direction never exceeds a chunk however large the model (MeZO on every weight).
    """

    def __init__(self, params: list[torch.nn.Parameter], sparsity: float | None = None, chunk: int = 1 << 24):
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("the trained parameters must share one dtype and device")
        self.params, self.sparsity, self.chunk = params, sparsity, chunk
        self.sizes = [p.numel() for p in params]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(params))]
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        for p, o, n in zip(params, self.offsets, self.sizes):
            p.data = self.flat[o:o + n].view_as(p)
        self.start = torch.empty_like(self.flat)               # theta0 of the current step
        self.thresholds: torch.Tensor | None = None           # per parameter; +inf: always perturbed
        self.decays = [p.ndim >= 2 for p in params]           # biases and norm weights are 1-D: no decay

    @property
    def snapshot_bytes(self) -> int:
        return self.start.numel() * self.start.element_size()

    def begin_step(self) -> None:
        self.start.copy_(self.flat)
        if self.sparsity:
            self.thresholds = torch.tensor([self._threshold(self.start[o:o + n]) if p.ndim >= 2 else math.inf
                                            for p, o, n in zip(self.params, self.offsets, self.sizes)],
                                           device=self.flat.device, dtype=self.flat.dtype)

    def _threshold(self, values: torch.Tensor) -> float:
        """The magnitude at or below which an entry is perturbed: the (1 - sparsity) quantile of |theta0|."""
        flat = values.abs().float()
        k = max(1, math.ceil((1.0 - self.sparsity) * flat.numel()))
        return float(flat.kthvalue(k).values)

    def _chunks(self, seed: int):
        """(slice of the buffer, z over it) in order, regenerated from `seed`; masked under sparsity."""
        gen = torch.Generator(device=self.flat.device).manual_seed(seed)
        total = self.flat.numel()
        for lo in range(0, total, self.chunk):
            hi = min(lo + self.chunk, total)
            z = torch.randn(hi - lo, generator=gen, device=self.flat.device, dtype=self.flat.dtype)
            if self.thresholds is not None:
                z.mul_(self.start[lo:hi].abs() <= self._element_thresholds(lo, hi))
            yield slice(lo, hi), z

    def _element_thresholds(self, lo: int, hi: int) -> torch.Tensor:
        """Each element's parameter threshold over buffer positions [lo, hi)."""
        counts = [max(0, min(o + n, hi) - max(o, lo)) for o, n in zip(self.offsets, self.sizes)]
        repeats = torch.tensor(counts, device=self.flat.device)
        return torch.repeat_interleave(self.thresholds, repeats, output_size=hi - lo)

    def direction(self, seed: int) -> torch.Tensor:
        """The whole z for `seed` as one tensor over the buffer (for inspection and tests; training never holds
        it)."""
        return torch.cat([z for _, z in self._chunks(seed)])

    @torch.no_grad()
    def set(self, seed: int, sign: int, eps: float) -> None:
        """theta <- theta0 + sign * eps * z(seed), in place."""
        for part, z in self._chunks(seed):
            self.flat[part].copy_(self.start[part]).add_(z, alpha=sign * eps)

    @torch.no_grad()
    def perturbed_rows(self, seeds: list[int], eps: float) -> torch.Tensor:
        """(2 len(seeds), parameters): theta0 + eps z and theta0 - eps z for each seed in turn, each row computed as
        `set` computes the buffer, so a batched query sees bit for bit the parameters the sequential one does."""
        rows = self.start.repeat(2 * len(seeds), 1)
        for i, seed in enumerate(seeds):
            for part, z in self._chunks(seed):
                rows[2 * i, part].add_(z, alpha=eps)
                rows[2 * i + 1, part].add_(z, alpha=-eps)
        return rows

    @torch.no_grad()
    def restore(self) -> None:
        self.flat.copy_(self.start)

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.flat).all())

    @torch.no_grad()
    def update(self, seeds_and_grads: list[tuple[int, float]], lr: float, weight_decay: float) -> None:
        """theta <- theta - lr (mean_q g_q z_q + wd theta), from theta0, replaying the queries in the given order
        (the same on every worker, so every replica ends bitwise equal)."""
        self.restore()
        if weight_decay:
            for p, decay in zip(self.params, self.decays):
                if decay:
                    p.mul_(1.0 - lr * weight_decay)
        scale = -lr / len(seeds_and_grads)
        for seed, g in seeds_and_grads:
            for part, z in self._chunks(seed):
                self.flat[part].add_(z, alpha=scale * g)
