"""Residual-stream activations of the same tokens at every snapshot, computed directly in this process.

A notebook-sized helper with no Ray and no cache (``study.activations.extraction`` is the scalable path).
``layer`` 0 is the embedding output, ``l`` the residual stream after block ``l`` (see ``study.activations.residual``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from study.activations.residual import residual_stream
from study.lm.trajectory import Snapshot, Trajectory, load_model


@torch.no_grad()
def direct_activations(
    trajectory: Trajectory | Sequence[Snapshot],
    contexts: torch.Tensor,
    layer: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """[tokens, S, d_model] float32 on the CPU for ``contexts`` [n, length]; each context's first
    position is left out (it attends to nothing but itself and carries outsized norms), so
    tokens = n * (length - 1), context by context."""
    snapshots = trajectory.snapshots if isinstance(trajectory, Trajectory) else trajectory
    per_snapshot = []
    for snapshot in snapshots:
        model = load_model(snapshot, device=device)
        states = [
            residual_stream(model, contexts[start : start + batch_size].to(device), [layer])[layer][:, 1:].float().cpu()
            for start in range(0, len(contexts), batch_size)
        ]
        per_snapshot.append(torch.cat(states).flatten(0, 1))
    return torch.stack(per_snapshot, dim=1)
