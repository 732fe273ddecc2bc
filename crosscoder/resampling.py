"""Dead features re-aimed at what the crosscoder misses (Bricken et al. 2023's resampling, per snapshot).

A feature that stops firing early gets no gradient again, so a rare feature of the data that no live
feature covered by then is never learned: on the hard planted set, JumpReLU's misses were such
features (firing on about 1 % of tokens, present at only some snapshots). Resampling gives each dead
feature the reconstruction error of a token the crosscoder explains worst, drawn with probability
proportional to the squared error: its decoder takes that error's profile over snapshots (so a
feature the data holds at some snapshots only starts out that way), its encoder the same direction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from crosscoder.model import CrossCoder
from crosscoder.sharded import all_counts, total, whole_reconstruction

ENCODER_SCALE = 0.2
"""New encoder rows are this fraction of the mean live encoder row's norm, so a new feature joins
without taking over the reconstruction of the tokens it was aimed at."""


@torch.no_grad()
def resample_dead(
    model: CrossCoder, optimizer: torch.optim.Adam, batch: torch.Tensor, dead: torch.Tensor, generator: torch.Generator
) -> int:
    """Re-initialise the ``dead`` features [F] bool from ``batch`` [B, S, d]; returns how many were.

    Adam's moments of every re-initialised row are cleared, so the new weights start their own. For a
    shard (``crosscoder.sharded``) every rank passes its own features' ``dead`` and the same
    ``generator``: the tokens are drawn once for the whole crosscoder and handed out in feature order,
    so the shards are re-initialised as one process would."""
    group = model.process_group
    dead_features = dead.nonzero().flatten()
    live = ~dead
    dead_counts = all_counts(len(dead_features), group)
    total_dead = sum(dead_counts)
    total_live = model.total_features - total_dead
    if total_dead == 0 or total_live == 0:
        return 0
    normalised = model.normalise(batch)
    error = normalised - whole_reconstruction(model, model(batch).reconstruction.float())  # [B, S, d]
    loss = error.square().sum((1, 2))
    count = min(total_dead, int((loss > 0).sum()))
    if count == 0:
        return 0
    tokens = torch.multinomial(loss.square().cpu(), count, replacement=False, generator=generator).to(batch.device)
    first = sum(dead_counts[: dist.get_rank(group) if group is not None else 0])
    dead_features = dead_features[: max(0, count - first)]
    own_tokens = tokens[first : first + len(dead_features)]
    chosen = error[own_tokens]  # [n, S, d]

    decoder_size = total(model.decoder_weight[live].norm(dim=-1).amax(-1).sum(), group) / total_live
    snapshot_norms = chosen.norm(dim=-1, keepdim=True)  # [n, S, 1]
    model.decoder_weight[dead_features] = chosen / snapshot_norms.amax(1, keepdim=True) * decoder_size
    direction = chosen.flatten(1) / chosen.flatten(1).norm(dim=-1, keepdim=True)
    encoder_size = total(model.encoder_weight[live].norm(dim=-1).sum(), group) / total_live
    model.encoder_weight[dead_features] = direction * (ENCODER_SCALE * encoder_size)
    model.encoder_bias[dead_features] = 0.0
    if model.log_threshold is not None:
        # Fire on the chosen token at the snapshot it is strongest: gate half its gated pre-activation there.
        pre = (normalised[own_tokens].flatten(1) * model.encoder_weight[dead_features]).sum(-1)
        gated = pre * model.decoder_weight[dead_features].norm(dim=-1).amax(-1)
        model.log_threshold[dead_features] = (gated.clamp_min(1e-6) / 2).log()

    for parameter in (model.encoder_weight, model.encoder_bias, model.decoder_weight, model.log_threshold):
        state = optimizer.state.get(parameter) if parameter is not None else None
        if state:
            state["exp_avg"][dead_features] = 0.0
            state["exp_avg_sq"][dead_features] = 0.0
    return count
