"""Sparsity functions: from the shared pre-activation [batch, F] to feature activations, with their penalty.

JumpReLU (paper 1) gates every snapshot separately, by the feature's decoder norm at that snapshot,
so its codes are [S, batch, F]; the other methods give one code [batch, F] shared by all snapshots.
"""

from __future__ import annotations

import torch


class JumpReLU(torch.autograd.Function):
    """f[s,b,i] = pre[b,i] * 1[pre[b,i] * n[s,i] > theta_i], and p_i = mean_{s,b} tanh(c f[s,b,i] n[s,i]).

    The threshold theta = exp(log_threshold) gets a straight-through gradient through a rectangle
    window of width ``bandwidth`` around the jump. Only (token, feature) pairs that fire at some
    snapshot, or sit in the window, carry any gradient, and once the code is sparse they are few:
    one comparison of pre with each feature's lowest cutoff theta_i / n[s,i] over snapshots finds
    them, and all arithmetic then runs on that compact [pairs, S] block. Backward recomputes the
    gate, so nothing of size [S, B, F] is kept for it.
    """

    @staticmethod
    def forward(ctx, pre, decoder_norms, log_threshold, bandwidth: float, tanh_scale: float):
        # pre [B, F]; decoder_norms [S, F]; log_threshold [F]
        threshold = log_threshold.exp()
        cutoff = threshold / decoder_norms  # pre > cutoff <=> pre * n > theta (n > 0); inf where n = 0
        tokens, features = (pre > cutoff.min(0).values).nonzero(as_tuple=True)
        values = pre[tokens, features]
        active = values[:, None] > cutoff[:, features].T  # [pairs, S]
        pair, snapshot = active.nonzero(as_tuple=True)
        codes = pre.new_zeros((decoder_norms.shape[0], *pre.shape))
        codes[snapshot, tokens[pair], features[pair]] = values[pair]
        # Sums over the batch are kept in at least float32, also under bfloat16 autocast.
        accumulate = torch.promote_types(pre.dtype, torch.float32)
        saturation = torch.zeros_like(threshold, dtype=accumulate)
        scaled = values[:, None].to(accumulate) * decoder_norms[:, features].T
        saturation.index_add_(0, features, torch.where(active, torch.tanh(tanh_scale * scaled), 0.0).sum(1))
        ctx.save_for_backward(pre, decoder_norms, log_threshold)
        ctx.bandwidth, ctx.tanh_scale = bandwidth, tanh_scale
        frequency = saturation / (decoder_norms.shape[0] * pre.shape[0])
        return codes, frequency

    @staticmethod
    def backward(ctx, grad_codes, grad_frequency):
        pre, decoder_norms, log_threshold = ctx.saved_tensors
        bandwidth, c = ctx.bandwidth, ctx.tanh_scale
        threshold = log_threshold.exp()
        n_snapshots, batch = decoder_norms.shape[0], pre.shape[0]
        accumulate = torch.promote_types(pre.dtype, torch.float32)
        per_element = (grad_frequency / (n_snapshots * batch)).to(accumulate)
        cutoff = threshold / decoder_norms  # the forward's gate, recomputed bit for bit
        window_cutoff = (threshold - bandwidth / 2) / decoder_norms
        tokens, features = (pre > window_cutoff.min(0).values).nonzero(as_tuple=True)
        values = pre[tokens, features]
        active = values[:, None] > cutoff[:, features].T  # [pairs, S]
        wide_values = values.to(accumulate)[:, None]
        norms = decoder_norms[:, features].T.to(accumulate)
        scaled = wide_values * norms
        theta = threshold[features].to(accumulate)[:, None]
        # tanh'(c f n) where the feature fires; where it does not, f = 0 and tanh' = 1.
        slope = torch.where(active, 1 - torch.tanh(c * scaled).square(), 1.0)
        penalty_weight = slope * (c * per_element[features])[:, None]
        grad_f = penalty_weight * norms
        if grad_codes is not None:
            grad_f = grad_f + grad_codes[:, tokens, features].T.to(accumulate)
        grad_pre = torch.zeros(pre.shape, dtype=accumulate, device=pre.device)
        grad_pre[tokens, features] = torch.where(active, grad_f, 0.0).sum(1)
        grad_norms = torch.zeros(decoder_norms.shape[::-1], dtype=accumulate, device=pre.device)
        grad_norms.index_add_(0, features, torch.where(active, penalty_weight * wide_values, 0.0))
        in_window = (scaled - theta).abs() < bandwidth / 2
        grad_threshold = torch.zeros_like(threshold, dtype=accumulate)
        grad_threshold.index_add_(0, features, torch.where(in_window, grad_f * wide_values, 0.0).sum(1))
        grad_log_threshold = -grad_threshold / bandwidth * threshold
        return (
            grad_pre.to(pre.dtype),
            grad_norms.T.to(decoder_norms.dtype),
            grad_log_threshold.to(log_threshold.dtype),
            None,
            None,
        )


class DecoderNorms(torch.autograd.Function):
    """||W_D^{s,i}|| over d_model, [S, F]; backward in one pass (autograd's generic norm backward takes several)."""

    @staticmethod
    def forward(ctx, decoder_weight):
        norms = torch.linalg.vector_norm(decoder_weight, dim=-1)
        ctx.save_for_backward(decoder_weight, norms)
        return norms

    @staticmethod
    def backward(ctx, grad_norms):
        decoder_weight, norms = ctx.saved_tensors
        return decoder_weight * (grad_norms / norms.clamp_min(1e-12)).unsqueeze(-1)


def decoder_norms(decoder_weight: torch.Tensor) -> torch.Tensor:
    """Norms over the last axis (d_model) of a decoder, differentiable."""
    return DecoderNorms.apply(decoder_weight)


def jumprelu(
    pre: torch.Tensor, decoder_norms: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float, tanh_scale: float
):
    """Per-snapshot codes [S, B, F] and the tanh frequency p [F] (see ``JumpReLU``)."""
    return JumpReLU.apply(pre, decoder_norms, log_threshold, bandwidth, tanh_scale)


def frequency_penalty(frequency: torch.Tensor, frequency_scale: float) -> torch.Tensor:
    """Paper 1's sum_i p_i (1 + p_i / s_f): linear for rare features, quadratic for frequent ones."""
    return (frequency * (1 + frequency / frequency_scale)).sum()


def relu_l1(pre: torch.Tensor, decoder_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper 2: codes relu(pre) [B, F]; penalty mean_b sum_i f_i mean_s ||W_D^{s,i}||.

    Paper 2 sums both its reconstruction error and the decoder norms over snapshots; here both are
    averaged over snapshots (the reconstruction loss is a mean over snapshots), so that one coefficient
    means the same sparsity at any snapshot count. A sum of norms against a mean error would make the
    effective coefficient grow with S.
    """
    codes = torch.relu(pre)
    return codes, (codes @ decoder_norms.mean(0).to(codes.dtype)).mean()


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each token's k largest positive pre-activations."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k x batch largest positive pre-activations of the whole batch (k per token on average)."""
    cutoff = pre.flatten().topk(k * pre.shape[0], sorted=False).values.min()
    return torch.where(pre >= cutoff, torch.relu(pre), 0.0)
