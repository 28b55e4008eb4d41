"""Tensor-train (TT) linear layers: a weight matrix stored as a chain of small cores, applied without building it.

A (d_in x d_out) matrix W is viewed as a tensor with input modes (m_1..m_p), prod m = d_in, followed by output modes
(n_1..n_q), prod n = d_out. Core k has shape (r_{k-1}, mode_k, r_k) with r_0 = r_{p+q} = 1, so

    W[i_1..i_p, j_1..j_q] = G_1[:, i_1, :] @ ... @ G_p[:, i_p, :] @ G_{p+1}[:, j_1, :] @ ... @ G_{p+q}[:, j_q, :]

In this layout the only bond between the input half (cores 1..p) and the output half (cores p+1..p+q) has rank r_p,
so W = A B with A (d_in x r_p) the input cores contracted over their bonds and B (r_p x d_out) the output cores.
`TTLinear.forward` merges the cores into A and B (cost independent of the batch) and computes (x A) B: two GEMMs
over the batch, r_p (d_in + d_out) multiply-adds per row, and the dense matrix never exists (`dense_weight` builds
it for tests and inspection only). Contracting x mode by mode instead costs as many small kernels as there are
cores plus the permutes between them, which on a GPU took longer than the backbone layer the adapter sits on.

    >>> layer = TTLinear(384, 64, rank=5)          # modes chosen automatically: [8, 8, 6] x [8, 8]
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
    mode): 384 -> [8, 8, 6], 768 -> [12, 8, 8], 4096 -> [16, 16, 16], 64 -> [8, 8], 2 -> [2]."""
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

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T (r_p x in_features) and B (r_p x out_features) with W = A @ B, A^T contiguous for F.linear."""
        return tt_halves(list(self.cores), len(self.in_modes), self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tt_apply(x, *self.halves(), self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (in_features x out_features) matrix (for tests and inspection, never the forward pass)."""
        a_t, b = self.halves()
        return a_t.t() @ b

    def parameter_count(self) -> int:
        return sum(c.numel() for c in self.cores) + (self.out_features if self.bias is not None else 0)

    def flops(self, tokens: int = 1) -> int:
        """2 x multiply-adds of one forward over `tokens` rows: merging the cores (once per forward, whatever the
        batch) plus r_p (d_in + d_out) per row."""
        p = len(self.in_modes)
        shapes = [tuple(c.shape) for c in self.cores]
        merge = chain_macs(shapes[:p]) + chain_macs(shapes[p:])
        return 2 * (merge + tokens * self.ranks[p] * (self.in_features + self.out_features))

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, rank={self.rank}, bias={self.bias is not None}"


def dense_flops(in_features: int, out_features: int, tokens: int = 1) -> int:
    return 2 * tokens * in_features * out_features


def chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """Consecutive cores, each (..., r_prev, mode, r_next) with the same leading dimensions, contracted over their
    shared bonds: (..., r_first * prod(modes), r_last). The leading dimensions batch many layers (or perturbations)
    into one matmul per core."""
    merged = cores[0].flatten(-3, -2)
    for core in cores[1:]:
        merged = (merged @ core.flatten(-2, -1)).unflatten(-1, core.shape[-2:]).flatten(-3, -2)
    return merged


def chain_macs(shapes: list[tuple[int, int, int]]) -> int:
    """Multiply-adds `chain` spends on cores of these (r_prev, mode, r_next) shapes."""
    rows, macs = shapes[0][0] * shapes[0][1], 0
    for r, mode, r_next in shapes[1:]:
        macs += rows * r * mode * r_next
        rows *= mode
    return macs


def tt_halves(cores: list[torch.Tensor], in_count: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^T, B) of the TT matrix whose first `in_count` cores hold the input modes: A^T (..., r_p, d_in) contiguous,
    the layout F.linear wants (x @ A with A as stored is several times slower on CPU for a rank this small),
    and B (..., r_p, d_out)."""
    a = chain(cores[:in_count])                                   # (..., d_in, r_p)
    b = chain(cores[in_count:])                                   # (..., r_p * d_out, 1)
    return a.transpose(-1, -2).contiguous(), b.reshape(*b.shape[:-2], a.shape[-1], out_features)


def tt_apply(x: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x A) B + bias over x's last dimension: two skinny GEMMs, the bias folded into the second."""
    low = torch.nn.functional.linear(x.to(a_t.dtype), a_t)
    flat = low.reshape(-1, low.shape[-1])
    y = torch.addmm(bias, flat, b) if bias is not None else flat @ b
    return y.view(*low.shape[:-1], b.shape[-1])
