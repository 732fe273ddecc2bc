"""Residual-stream activations of the same tokens at every snapshot, computed directly in this process.

A notebook-sized helper with no Ray and no cache (``study.extraction`` is the scalable path).
``layer`` 0 is the embedding output, ``l`` the residual stream after block ``l`` (see ``study.residual``).
"""

from __future__ import annotations

import torch

from study.residual import residual_stream
from study.trajectory import Trajectory, load_model


@torch.no_grad()
def direct_activations(trajectory: Trajectory, contexts: torch.Tensor, layer: int, batch_size: int = 64) -> torch.Tensor:
    """[tokens, S, d_model] for ``contexts`` [n, length]; each context's first position is left out
    (it attends to nothing but itself and carries outsized norms), so tokens = n * (length - 1)."""
    per_snapshot = []
    for snapshot in trajectory.snapshots:
        model = load_model(snapshot)
        states = [
            residual_stream(model, contexts[start : start + batch_size], [layer])[layer][:, 1:]
            for start in range(0, len(contexts), batch_size)
        ]
        per_snapshot.append(torch.cat(states).flatten(0, 1))
    return torch.stack(per_snapshot, dim=1)
