"""Negative binomial log-likelihood with a hand-written backward (torch).

The reconstruction term of counts likelihoods, computed from the decoder's log-space output:
after the dense layers it is the largest part of a training step, so it does not go through
autograd's generic graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Counts up to this value take their gamma-function terms from a per-gene table (the
# median non-zero count of single-cell data is 1 or 2); larger or non-integer counts are
# evaluated exactly.
_GAMMA_TABLE_MAX_COUNT = 32


def _table_positions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each count of ``x`` ``(B, G)`` sits in a flattened ``(G, K + 1)`` count table.

    Returns ``(position (B·G,) long, outside (N,) long)``: ``position`` indexes
    ``table.reshape(-1)`` at ``[gene, min(count, K)]``; ``outside`` lists the entries of
    ``x.reshape(-1)`` that are not integers in ``0..K`` (their table value is a placeholder).
    """
    width = _GAMMA_TABLE_MAX_COUNT + 1
    column = x.clamp(0, _GAMMA_TABLE_MAX_COUNT).long()
    # Non-zero exactly where x was clamped or truncated (negative counts are left to the
    # exact path, whose lgamma makes them visible as NaN instead of a wrong table entry).
    outside = torch.nonzero((x - column.to(x.dtype)).reshape(-1)).squeeze(-1)
    row_start = torch.arange(0, x.shape[-1] * width, width, device=x.device)
    return (column + row_start).reshape(-1), outside


def _look_up(table: torch.Tensor, position: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Table values at flat ``position``, reshaped to ``shape``."""
    return table.reshape(-1).index_select(0, position).view(shape)


class _NegativeBinomialLogLikelihood(torch.autograd.Function):
    """Per-cell NB log-likelihood with a hand-written backward (see
    :func:`negative_binomial_log_likelihood`).
    """

    @staticmethod
    def forward(ctx, x, log_rate, log_theta):
        theta = log_theta.exp()
        log_ratio = log_rate - log_theta  # log(mu / theta)
        softplus_ratio = F.softplus(log_ratio)  # log(1 + mu / theta)
        x_plus_theta = x + theta
        # x log(mu / (mu + theta)) + theta log(theta / (mu + theta)), rewritten in log_ratio.
        dense = (x * log_ratio - x_plus_theta * softplus_ratio).sum(-1)
        # For an integer count c, lgamma(c + theta) - lgamma(theta) = sum_{i<c} log(theta + i):
        # a (G, K + 1) table of cumulative sums replaces lgamma on every entry (the slowest
        # part of the likelihood, and not vectorised by torch on CPU).
        steps = theta.unsqueeze(-1) + torch.arange(
            _GAMMA_TABLE_MAX_COUNT, dtype=theta.dtype, device=theta.device
        )
        counts_range = torch.arange(
            _GAMMA_TABLE_MAX_COUNT + 1, dtype=theta.dtype, device=theta.device
        )
        lgamma_table = F.pad(steps.log().cumsum(-1), (1, 0)) - torch.lgamma(counts_range + 1)
        position, outside = _table_positions(x)
        gamma = _look_up(lgamma_table, position, x.shape).sum(-1)
        outside_counts = None
        if outside.numel():
            cell, gene = outside // x.shape[-1], outside % x.shape[-1]
            outside_counts = x.reshape(-1)[outside]
            exact = (
                torch.lgamma(outside_counts + theta[gene])
                - torch.lgamma(theta[gene])
                - torch.lgamma(outside_counts + 1)
            )
            placeholder = lgamma_table.reshape(-1)[position[outside]]
            gamma = gamma.index_add(0, cell, exact - placeholder)
        ctx.save_for_backward(
            x,
            log_ratio,
            softplus_ratio,
            x_plus_theta,
            theta,
            steps,
            position,
            outside,
            outside_counts,
        )
        return dense + gamma

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (
            x,
            log_ratio,
            softplus_ratio,
            x_plus_theta,
            theta,
            steps,
            position,
            outside,
            outside_counts,
        ) = ctx.saved_tensors
        weight = grad.unsqueeze(-1)
        grad_log_rate = (x - x_plus_theta * torch.sigmoid(log_ratio)) * weight
        # digamma(c + theta) - digamma(theta) = sum_{i<c} 1 / (theta + i), same table layout.
        digamma_table = F.pad(steps.reciprocal().cumsum(-1), (1, 0))
        digamma_sum = (_look_up(digamma_table, position, x.shape) * weight).sum(0)
        if outside_counts is not None:
            cell, gene = outside // x.shape[-1], outside % x.shape[-1]
            exact = torch.digamma(outside_counts + theta[gene]) - torch.digamma(theta[gene])
            placeholder = digamma_table.reshape(-1)[position[outside]]
            digamma_sum = digamma_sum.index_add(0, gene, (exact - placeholder) * grad[cell])
        # d/d log(theta) = theta * d/d theta; the log_ratio terms give -grad_log_rate.
        grad_log_theta = theta * (
            digamma_sum - (softplus_ratio * weight).sum(0)
        ) - grad_log_rate.sum(0)
        return None, grad_log_rate, grad_log_theta


def negative_binomial_log_likelihood(
    x: torch.Tensor, log_rate: torch.Tensor, log_theta: torch.Tensor
) -> torch.Tensor:
    """NB log-likelihood of each cell's counts, summed over genes: shape ``(B,)``.

    Same value as ``scvi.distributions.NegativeBinomial(mu, theta).log_prob(x).sum(-1)``,
    computed from the decoder's log-space output. It is the largest part of a training step
    after the dense layers, so the forward and backward passes are written by hand. The
    gamma-function terms of integer counts up to 32 (nearly all entries of single-cell data)
    are looked up in per-gene tables of ``lgamma(c + theta) - lgamma(theta)`` and of the
    matching digamma difference, built by cumulative sums over ``c``; larger or non-integer
    counts are evaluated with ``lgamma`` / ``digamma``. No intermediate of autograd's generic
    graph is kept.

    Parameters
    ----------
    x
        ``(B, G)`` counts (non-negative; integers for a proper likelihood).
    log_rate
        ``(B, G)`` log of the NB means.
    log_theta
        ``(G,)`` log of the gene-wise inverse dispersions.

    Returns
    -------
    ``(B,)`` log-likelihoods (nats). Differentiable in ``log_rate`` and ``log_theta`` once
    (not twice).
    """
    return _NegativeBinomialLogLikelihood.apply(x, log_rate, log_theta)
