"""Tensor-train (TT) linear layers: a weight matrix stored as a chain of small cores, applied without building it.

A (d_in x d_out) matrix W is viewed as a tensor with input modes (m_1..m_p), prod m = d_in, followed by output modes
(n_1..n_q), prod n = d_out. Core k has shape (r_{k-1}, mode_k, r_k) with r_0 = r_{p+q} = 1, so

    W[i_1..i_p, j_1..j_q] = G_1[:, i_1, :] @ ... @ G_p[:, i_p, :] @ G_{p+1}[:, j_1, :] @ ... @ G_{p+q}[:, j_q, :]

`TTLinear.forward` contracts the input with the input cores one mode at a time down to a (batch, r_p) state, then
expands it through the output cores: the dense matrix never exists in the forward pass (`dense_weight` builds it
for tests and inspection only).

    >>> layer = TTLinear(384, 64, rank=5)          # modes chosen automatically: [8, 8, 6] x [4, 4, 4]
    >>> layer.parameter_count(), 384 * 64 + 64
"""

from __future__ import annotations

import math

import torch
from torch import nn


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def factorize(n: int, max_mode: int = 16) -> list[int]:
    """Split n into few, balanced modes no larger than `max_mode` where its primes allow (a prime above it stays one
    mode): 384 -> [8, 8, 6], 768 -> [12, 8, 8], 64 -> [4, 4, 4], 2 -> [2]."""
    if n < 1:
        raise ValueError(f"cannot factorize {n}")
    if n == 1:
        return [1]
    primes = sorted(prime_factors(n), reverse=True)
    count = max(1, math.ceil(math.log(n) / math.log(max_mode)))
    count = max(count, sum(p > max_mode for p in primes))
    modes = [1] * min(count, len(primes))
    for p in primes:  # largest prime first into the currently smallest mode: keeps the modes balanced
        modes[modes.index(min(modes))] *= p
    return sorted(modes, reverse=True)


class TTLinear(nn.Module):
    """y = x @ W + b with W (in_features x out_features) held as tensor-train cores of rank `rank`.

    `zero_last_core=True` starts W at exactly zero (the adapter's up-projection uses it so the adapter starts as the
    identity); otherwise the cores are scaled so that W's entries have variance 1 / in_features, like a dense layer's
    default initialisation."""

    def __init__(self, in_features: int, out_features: int, rank: int = 5, in_modes: list[int] | None = None,
                 out_modes: list[int] | None = None, bias: bool = True, zero_last_core: bool = False):
        super().__init__()
        self.in_modes = list(in_modes) if in_modes else factorize(in_features)
        self.out_modes = list(out_modes) if out_modes else factorize(out_features)
        if math.prod(self.in_modes) != in_features:
            raise ValueError(f"in_modes {self.in_modes} multiply to {math.prod(self.in_modes)}, not {in_features}")
        if math.prod(self.out_modes) != out_features:
            raise ValueError(f"out_modes {self.out_modes} multiply to {math.prod(self.out_modes)}, "
                             f"not {out_features}")
        if rank < 1:
            raise ValueError(f"TT rank must be at least 1, not {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        modes = self.in_modes + self.out_modes
        self.ranks = [1] + [rank] * (len(modes) - 1) + [1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], mode, self.ranks[k + 1])) for k, mode in enumerate(modes))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters(zero_last_core)

    def reset_parameters(self, zero_last_core: bool = False) -> None:
        # W's entries are sums over prod(r_k) paths of products of one entry per core: with core std s, their
        # variance is prod(r_k) * s^(2 * cores); solve for s giving 1 / in_features.
        n_cores = len(self.cores)
        paths = math.prod(self.ranks[1:-1])
        std = (1.0 / (self.in_features * paths)) ** (1.0 / (2 * n_cores))
        for core in self.cores:
            nn.init.normal_(core, std=std)
        if zero_last_core:
            nn.init.zeros_(self.cores[-1])
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_shape = x.shape[:-1]
        p = len(self.in_modes)
        # Contract the input modes left to right. Before core k the state is (N, rest, r_{k-1}, m_k): the modes
        # still to contract, then the (rank, mode) pair that core k's (r_{k-1} * m_k, r_k) matrix consumes.
        x = x.reshape(-1, self.in_features).to(self.cores[0].dtype)
        n = x.shape[0]
        state = x.reshape(n, 1, self.in_modes[0], -1).permute(0, 3, 1, 2)           # (N, rest, r_0 = 1, m_1)
        for k in range(p):
            rest, core = state.shape[1], self.cores[k]                                 # core: (r_{k-1}, m_k, r_k)
            state = state.reshape(n, rest, -1) @ core.reshape(-1, core.shape[-1])      # (N, rest, r_k)
            if k + 1 < p:
                m_next = self.in_modes[k + 1]
                state = state.reshape(n, m_next, rest // m_next, -1).permute(0, 2, 3, 1)  # (N, rest', r_k, m)
        state = state.reshape(n, -1)                                                   # (N, r_p)
        for core in self.cores[p:]:                                            # expand: (N * prod n, r) @ core
            state = (state.reshape(-1, core.shape[0]) @ core.reshape(core.shape[0], -1))
        y = state.reshape(*batch_shape, self.out_features)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (in_features x out_features) matrix (for tests and inspection, never the forward pass)."""
        w = self.cores[0].reshape(self.cores[0].shape[1], -1)
        for core in self.cores[1:]:
            w = (w @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        return w.reshape(self.in_features, self.out_features)

    def parameter_count(self) -> int:
        return sum(c.numel() for c in self.cores) + (self.out_features if self.bias is not None else 0)

    def flops(self, tokens: int = 1) -> int:
        """Multiply-adds x 2 of one forward over `tokens` input rows, as `forward` contracts them."""
        total, rest = 0, self.in_features
        for k, m in enumerate(self.in_modes):
            rest //= m
            total += rest * self.ranks[k] * m * self.ranks[k + 1]
        width = 1
        for k, nmode in enumerate(self.out_modes, start=len(self.in_modes)):
            total += width * self.ranks[k] * nmode * self.ranks[k + 1]
            width *= nmode
        return 2 * tokens * total

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, rank={self.rank}, bias={self.bias is not None}"


def dense_flops(in_features: int, out_features: int, tokens: int = 1) -> int:
    return 2 * tokens * in_features * out_features
