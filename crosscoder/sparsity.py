"""Sparsity functions: from the shared pre-activation [batch, F] to the codes that fire, with their penalty.

Every method gives its codes as entries (token, feature, value), so that the model can decode them
densely or sparsely (``crosscoder.sparse_codes``). JumpReLU (paper 1) gates every snapshot
separately, by the feature's decoder norm at that snapshot, so its entries also name a snapshot;
the other methods give one code shared by all snapshots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from crosscoder.sparse_codes import add_by_feature, cells_at, flat_memory, nonzero_pairs


class CodeEntries(NamedTuple):
    """The codes of a batch that fire (and, for JumpReLU, zero codes whose gradient the threshold needs)."""

    values: torch.Tensor
    """[nnz] the codes, differentiable."""
    tokens: torch.Tensor
    """[nnz] their token in the batch."""
    features: torch.Tensor
    """[nnz] their feature."""
    snapshots: torch.Tensor | None
    """[nnz] the snapshot each code is for (JumpReLU), or None when one code serves all snapshots."""
    cells: torch.Tensor
    """[pairs] where the (token, feature) pairs that fire (at some snapshot) lie in the pre-activation's
    memory (``flat_memory``), each pair once: the only cells of the pre-activation the codes' gradient reaches."""


class GateBlock(NamedTuple):
    """The (token, feature) pairs a JumpReLU gate looks at, with [pairs, S] blocks of each one's snapshots."""

    tokens: torch.Tensor
    """[pairs] the pair's token."""
    features: torch.Tensor
    """[pairs] the pair's feature."""
    positions: torch.Tensor
    """[pairs] the pair's place in the pre-activation's memory (``flat_memory``)."""
    values: torch.Tensor
    """[pairs] the pre-activation."""
    norms: torch.Tensor
    """[pairs, S] the feature's decoder norms, in at least float32."""
    scaled: torch.Tensor
    """[pairs, S] the gated quantity pre * n."""
    active: torch.Tensor
    """[pairs, S] bool: the code fires."""
    in_window: torch.Tensor
    """[pairs, S] bool: the gated quantity is inside the threshold's window (all False without a window)."""


class JumpReLU(torch.autograd.Function):
    """f[s,b,i] = pre[b,i] * 1[pre[b,i] * n[i,s] > theta_i], and p_i = mean_{s,b} tanh(c f[s,b,i] n[i,s]).

    The codes come out as entries (values, tokens, features, snapshots), in the order of (token,
    feature) pairs and then snapshots: every cell that fires, and every cell inside the threshold's
    window with code 0.

    The threshold theta = exp(log_threshold) gets a straight-through gradient through a rectangle
    window of width ``bandwidth`` around the jump. Only (token, feature) pairs that fire at some
    snapshot, or sit in the window, carry any gradient, and once the code is sparse they are few:
    one comparison of pre with each feature's lowest cutoff theta_i / n[i,s] over snapshots finds
    them, and all arithmetic then runs on that compact [pairs, S] block, read from the feature-major
    norms [F, S] row by row. Backward recomputes that block at the pairs the forward found, so nothing of
    size [S, B, F] is kept for it.
    """

    @staticmethod
    def forward(ctx, pre, decoder_norms, log_threshold, bandwidth: float, tanh_scale: float, with_window: bool):
        # pre [B, F]; decoder_norms [F, S]; log_threshold [F]
        gate = JumpReLU.gate(pre, decoder_norms, log_threshold, bandwidth, with_window)
        # Sums over the batch are kept in at least float32, also under bfloat16 autocast.
        saturation = torch.zeros(log_threshold.shape, dtype=gate.scaled.dtype, device=pre.device)
        add_by_feature(
            saturation, gate.features, torch.where(gate.active, torch.tanh(tanh_scale * gate.scaled), 0.0).sum(1)
        )
        ctx.save_for_backward(pre, decoder_norms, log_threshold, gate.positions)
        ctx.bandwidth, ctx.tanh_scale = bandwidth, tanh_scale
        frequency = saturation / (decoder_norms.shape[1] * pre.shape[0])
        # Cells inside the window that do not fire are entries too, with code 0: the threshold's
        # straight-through gradient needs the loss's gradient there.
        entries = gate.active | gate.in_window
        pair, snapshot = entries.nonzero(as_tuple=True)
        entry_tokens, entry_features = gate.tokens.index_select(0, pair), gate.features.index_select(0, pair)
        fired_cells = gate.positions[gate.active.any(1)]
        ctx.mark_non_differentiable(entry_tokens, entry_features, snapshot, fired_cells)
        entry_values = torch.where(gate.active, gate.values[:, None], 0.0).masked_select(entries)
        return entry_values, frequency, entry_tokens, entry_features, snapshot, fired_cells

    @staticmethod
    def gate(
        pre, decoder_norms, log_threshold, bandwidth: float, with_window: bool = True, positions=None
    ) -> GateBlock:
        """The (token, feature) pairs that fire at some snapshot or (``with_window``) sit in the window at
        some snapshot (no window: no gradient will be asked for); ``positions``: those an earlier call with
        the same arguments found, not searched for again."""
        threshold = log_threshold.exp()
        cutoff = threshold[:, None] / decoder_norms  # pre > cutoff <=> pre * n > theta (n > 0); inf where n = 0
        if positions is None:
            lowest = (threshold - bandwidth / 2)[:, None] / decoder_norms if with_window else cutoff
            positions, tokens, features = nonzero_pairs(pre > lowest.amin(1), pre)
        else:
            tokens, features = cells_at(positions, pre)
        values = flat_memory(pre)[0].index_select(0, positions)
        active = values[:, None] > cutoff.index_select(0, features)
        norms = decoder_norms.index_select(0, features).to(torch.promote_types(pre.dtype, torch.float32))
        scaled = values[:, None].to(norms.dtype) * norms
        in_window = (scaled - threshold.index_select(0, features)[:, None]).abs() < bandwidth / 2
        return GateBlock(tokens, features, positions, values, norms, scaled, active, in_window & with_window)

    @staticmethod
    def backward(ctx, grad_values, grad_frequency, *_):
        pre, decoder_norms, log_threshold, positions = ctx.saved_tensors
        bandwidth, c = ctx.bandwidth, ctx.tanh_scale
        threshold = log_threshold.exp()
        n_snapshots, batch = decoder_norms.shape[1], pre.shape[0]
        # The forward's gate, recomputed bit for bit at the pairs it found: searching the [B, F] pre-activation
        # again cost 12 ms of a 370 ms step at (2, 768, 24,576) on a 2-core CPU.
        gate = JumpReLU.gate(pre, decoder_norms, log_threshold, bandwidth, positions=positions)
        accumulate = gate.scaled.dtype
        per_element = (grad_frequency / (n_snapshots * batch)).to(accumulate)
        wide_values = gate.values.to(accumulate)[:, None]
        # tanh'(c f n) where the feature fires; where it does not, f = 0 and tanh' = 1.
        slope = torch.where(gate.active, 1 - torch.tanh(c * gate.scaled).square(), 1.0)
        penalty_weight = slope * (c * per_element.index_select(0, gate.features))[:, None]
        grad_f = penalty_weight * gate.norms
        if grad_values is not None:
            # The forward's entries are the cells of this block that fire or sit in the window, read row by row.
            grad_codes = torch.zeros(gate.active.shape, dtype=accumulate, device=pre.device)
            grad_codes.masked_scatter_(gate.active | gate.in_window, grad_values.to(accumulate))
            grad_f = grad_f + grad_codes
        grad_pre = torch.zeros_like(pre, dtype=accumulate)  # in the layout of pre, as gate.positions are
        flat_memory(grad_pre)[0][gate.positions] = torch.where(gate.active, grad_f, 0.0).sum(1)
        grad_norms = torch.zeros(decoder_norms.shape, dtype=accumulate, device=pre.device)
        add_by_feature(grad_norms, gate.features, torch.where(gate.active, penalty_weight * wide_values, 0.0))
        grad_threshold = torch.zeros_like(threshold, dtype=accumulate)
        add_by_feature(grad_threshold, gate.features, torch.where(gate.in_window, grad_f * wide_values, 0.0).sum(1))
        grad_log_threshold = -grad_threshold / bandwidth * threshold
        return (
            grad_pre.to(pre.dtype),
            grad_norms.to(decoder_norms.dtype),
            grad_log_threshold.to(log_threshold.dtype),
            None,
            None,
            None,
        )


class DecoderAndNorms(torch.autograd.Function):
    """The decoder [F, S, d] passed through, with its norms over d_model [F, S].

    Both gradients meet in one backward: the norms' share is added to the decoder's in one pass over the
    weights. Taken apart, autograd writes the norms' share as a tensor of its own and then adds the two:
    two more passes over the largest tensor of the step."""

    @staticmethod
    def forward(ctx, decoder_weight):
        norms = torch.linalg.vector_norm(decoder_weight, dim=-1)
        ctx.save_for_backward(decoder_weight, norms)
        ctx.set_materialize_grads(False)  # a missing gradient stays None, not a tensor of zeros to add
        return decoder_weight.view_as(decoder_weight), norms

    @staticmethod
    def backward(ctx, grad_decoder, grad_norms):
        decoder_weight, norms = ctx.saved_tensors
        if grad_norms is None:
            return grad_decoder
        scale = (grad_norms / norms.clamp_min(1e-12)).unsqueeze(-1)
        if grad_decoder is None:
            return decoder_weight * scale
        return torch.addcmul(grad_decoder, decoder_weight, scale)


def decoder_and_norms(decoder_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder to decode with and its norms over the last axis (d_model), both differentiable."""
    return DecoderAndNorms.apply(decoder_weight)


def jumprelu(
    pre: torch.Tensor, decoder_norms: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float, tanh_scale: float
) -> tuple[CodeEntries, torch.Tensor]:
    """Per-snapshot code entries and the tanh frequency p [F] (see ``JumpReLU``); ``decoder_norms`` is [F, S]."""
    # Without a gradient to come (evaluation, initialisation), the window's zero codes are left out.
    with_window = torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (pre, decoder_norms, log_threshold)
    )
    values, frequency, tokens, features, snapshots, cells = JumpReLU.apply(
        pre, decoder_norms, log_threshold, bandwidth, tanh_scale, with_window
    )
    return CodeEntries(values, tokens, features, snapshots, cells), frequency


def frequency_penalty(frequency: torch.Tensor, frequency_scale: float) -> torch.Tensor:
    """Paper 1's sum_i p_i (1 + p_i / s_f): linear for rare features, quadratic for frequent ones."""
    return (frequency * (1 + frequency / frequency_scale)).sum()


def shared_entries(pre: torch.Tensor, fires: torch.Tensor) -> CodeEntries:
    """The codes pre[b, i] where ``fires`` [B, F], shared by all snapshots, in the order of pre's memory."""
    positions, tokens, features = nonzero_pairs(fires, pre)
    return CodeEntries(flat_memory(pre)[0].index_select(0, positions), tokens, features, None, positions)


def l1_penalty(codes: CodeEntries, decoder_norms: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Paper 2: mean_b sum_i f_i mean_s ||W_D^{s,i}|| for relu codes, with ``decoder_norms`` [F, S].

    Paper 2 sums both its reconstruction error and the decoder norms over snapshots; here both are
    averaged over snapshots (the reconstruction loss is a mean over snapshots), so that one coefficient
    means the same sparsity at any snapshot count. A sum of norms against a mean error would make the
    effective coefficient grow with S.
    """
    mean_norms = decoder_norms.mean(1).to(codes.values.dtype)  # [F, S] -> [F]
    return (codes.values * mean_norms[codes.features]).sum() / batch_size


def topk_fires(pre: torch.Tensor, k: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[B, F] bool: each token's k largest pre-activations, where positive. With a process group, ``pre``
    is this rank's share of the features and the k are the largest over all ranks'."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    if group is None:
        return torch.zeros_like(pre, dtype=torch.bool).scatter(-1, indices, values > 0)
    # The global k largest are among the ranks' own k largest.
    cutoff = gather(values, group, dim=1).topk(k, dim=-1, sorted=False).values.min(-1, keepdim=True).values
    return (pre >= cutoff) & (pre > 0)


def batch_topk_fires(pre: torch.Tensor, k: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[B, F] bool: the k x batch largest pre-activations of the whole batch (k per token on average), where
    positive; with a process group, over the features of all ranks."""
    values = pre.flatten().topk(k * pre.shape[0], sorted=False).values
    if group is not None:
        values = gather(values, group, dim=0).topk(k * pre.shape[0], sorted=False).values
    return (pre >= values.min()) & (pre > 0)


def gather(tensor: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes), concatenated along ``dim``."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim)
