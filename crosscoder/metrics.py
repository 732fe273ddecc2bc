"""Quality of a trained crosscoder, measured on any activations (held-out ones, preferably)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from crosscoder.data import Activations, as_tensor
from crosscoder.model import CrossCoder


class CrossCoderMetrics(NamedTuple):
    """Reconstruction and sparsity measured over ``n_tokens`` tokens, in normalised units."""

    explained_variance: float
    """1 - squared error / variance, pooled over snapshots."""
    explained_variance_per_snapshot: list[float]
    """The same for each snapshot, in snapshot order."""
    mse: float
    """Mean over tokens and snapshots of the squared error summed over d_model, divided by d_model."""
    l0: float
    """Mean number of features active per token (active at any snapshot)."""
    l0_per_snapshot: list[float]
    """Mean number of features active per token at each snapshot (equal for shared-code methods)."""
    dead_fraction: float
    """Share of features that fired on none of the tokens."""
    activation_frequency: torch.Tensor
    """[n_features] share of tokens on which each feature fired."""
    decoder_norms: torch.Tensor
    """[n_features, S] decoder norm of each feature at each snapshot."""
    n_tokens: int
    """Tokens evaluated."""

    def summary(self) -> dict[str, float]:
        """The scalar metrics, for logging."""
        summary = {
            "explained_variance": self.explained_variance,
            "mse": self.mse,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
        }
        summary.update(
            {f"explained_variance_snapshot_{s}": value for s, value in enumerate(self.explained_variance_per_snapshot)}
        )
        return summary


@torch.no_grad()
def evaluate(model: CrossCoder, activations: Activations, batch_size: int = 4096) -> CrossCoderMetrics:
    """Metrics of ``model`` on ``activations`` [tokens, S, d_model], in batches."""
    tensor = as_tensor(activations)
    if tuple(tensor.shape[1:]) != (model.n_snapshots, model.d_model):
        raise ValueError(
            f"activations are [*, {tensor.shape[1]}, {tensor.shape[2]}], the crosscoder expects [*, {model.n_snapshots}, {model.d_model}]"
        )
    device = model.decoder_weight.device
    n_snapshots = model.n_snapshots
    squared_error = torch.zeros(n_snapshots, dtype=torch.float64)
    sum_of_squares = torch.zeros(n_snapshots, dtype=torch.float64)
    sums = torch.zeros(n_snapshots, model.d_model, dtype=torch.float64)
    fired = torch.zeros(model.n_features, dtype=torch.float64)
    active_per_snapshot = torch.zeros(n_snapshots, dtype=torch.float64)
    active_any = 0.0
    for start in range(0, tensor.shape[0], batch_size):
        batch = tensor[start : start + batch_size].to(device).float()
        output = model(batch)
        normalised = model.normalise(batch)
        squared_error += (output.reconstruction - normalised).square().sum((0, 2)).double().cpu()
        sum_of_squares += normalised.square().sum((0, 2)).double().cpu()
        sums += normalised.sum(0).double().cpu()
        active = output.active
        fired += active.sum(0).double().cpu()
        active_any += active.sum().item()
        if output.codes.dim() == 3:
            active_per_snapshot += (output.codes != 0).sum((1, 2)).double().cpu()
        else:
            active_per_snapshot += active.sum().item()
    n_tokens = tensor.shape[0]
    variance = sum_of_squares - sums.square().sum(-1) / n_tokens
    frequency = (fired / n_tokens).float()
    return CrossCoderMetrics(
        explained_variance=float(1 - squared_error.sum() / variance.sum()),
        explained_variance_per_snapshot=(1 - squared_error / variance).tolist(),
        mse=float(squared_error.sum() / (n_tokens * n_snapshots * model.d_model)),
        l0=active_any / n_tokens,
        l0_per_snapshot=(active_per_snapshot / n_tokens).tolist(),
        dead_fraction=float((fired == 0).double().mean()),
        activation_frequency=frequency,
        decoder_norms=model.decoder_norms().detach().float().cpu(),
        n_tokens=n_tokens,
    )
