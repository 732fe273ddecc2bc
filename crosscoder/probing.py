"""Decoder norm as a proxy for a feature's presence (paper 1): linear probes on each snapshot's activations."""

from __future__ import annotations

from typing import NamedTuple

import torch

from crosscoder.feature_statistics import Interval, bootstrap, pearson


class NormProxy(NamedTuple):
    """Probe errors against decoder norms for a sample of features."""

    probe_error: torch.Tensor
    """[K, S] held-out balanced error of a linear probe telling from snapshot s alone whether the feature fires (0.5: chance)."""
    relative_decoder_norm: torch.Tensor
    """[K, S] decoder norm divided by the feature's largest over snapshots."""
    correlation: float
    """Pearson r over all (feature, snapshot) pairs, as paper 1 reports it (about -0.87): a time trend both share
    (errors falling while norms grow, in every feature alike) makes it large with no association between them."""
    within_snapshot: Interval
    """Pearson r after each snapshot's mean over features is taken out of both, with its bootstrap interval over
    features: whether, at one snapshot, the features with larger norms are the ones a probe finds."""


def probe_errors(activations: torch.Tensor, active: torch.Tensor, seed: int = 0, ridge: float = 1e-2) -> torch.Tensor:
    """[K, S]: for each feature (column of ``active`` [N, K] bool) and each snapshot's activations
    ([N, S, d]), a least-squares linear classifier (ridge, labels ±1, decision at 0) on a balanced
    set: every token where the feature fires and as many where it does not, half to fit, half to
    score. The error is the held-out balanced error rate, the mean of the two classes' error rates."""
    generator = torch.Generator().manual_seed(seed)
    n_rows, n_snapshots, d_model = activations.shape
    errors = torch.full((active.shape[1], n_snapshots), float("nan"))
    # One scale per snapshot, so that the ridge strength means the same at every snapshot.
    scales = activations.float().norm(dim=-1).mean(0).clamp_min(1e-12)
    for feature in range(active.shape[1]):
        positives = active[:, feature].nonzero().squeeze(1)
        negatives = (~active[:, feature]).nonzero().squeeze(1)
        count = min(len(positives), len(negatives))
        if count < 4:
            continue
        positives = positives[torch.randperm(len(positives), generator=generator)[:count]]
        negatives = negatives[torch.randperm(len(negatives), generator=generator)[:count]]
        half = count // 2
        train = torch.cat([positives[:half], negatives[:half]])
        test_positive, test_negative = positives[half:], negatives[half:]
        labels = torch.cat([torch.ones(half), -torch.ones(half)]).double()
        for snapshot in range(n_snapshots):
            inputs = activations[:, snapshot].double() / scales[snapshot]
            fitted = inputs[train]
            mean = fitted.mean(0)
            centred = fitted - mean
            gram = centred.T @ centred + ridge * len(train) * torch.eye(d_model, dtype=torch.float64)
            weights = torch.linalg.solve(gram, centred.T @ labels)

            def says_active(rows: torch.Tensor) -> torch.Tensor:
                return (inputs[rows] - mean) @ weights > 0  # noqa: B023 (called within the iteration)

            missed = 1 - says_active(test_positive).double().mean()
            false_alarms = says_active(test_negative).double().mean()
            errors[feature, snapshot] = float((missed + false_alarms) / 2)
    return errors


def norm_proxy(
    activations: torch.Tensor, active: torch.Tensor, decoder_norms: torch.Tensor, seed: int = 0
) -> NormProxy:
    """Probe where each feature fires ([N, K] bool) from each snapshot's activations ([N, S, d]) and
    correlate the probe errors with the features' relative decoder norms ([K, S])."""
    errors = probe_errors(activations, active, seed)
    relative = decoder_norms.float() / decoder_norms.float().max(1, keepdim=True).values.clamp_min(1e-12)
    probed = ~errors.isnan()
    correlation = pearson(errors[probed], relative[probed]) if probed.sum() >= 3 else float("nan")
    within = bootstrap(lambda rows: within_snapshot_correlation(errors[rows], relative[rows]), len(errors), seed)
    return NormProxy(errors, relative, correlation, within)


def within_snapshot_correlation(errors: torch.Tensor, relative: torch.Tensor) -> float:
    """Pearson r of [K, S] probe errors and relative norms, each snapshot's mean over the probed features removed
    (the time-partialled correlation); nan with fewer than 3 probed pairs."""
    probed = ~errors.isnan()
    if probed.sum() < 3:
        return float("nan")
    counts = probed.sum(0).clamp_min(1)

    def centred(values: torch.Tensor) -> torch.Tensor:
        values = torch.where(probed, values.double(), 0.0)
        return values - values.sum(0) / counts

    return pearson(centred(errors)[probed], centred(relative)[probed])
