"""Crosscoders across pre-training snapshots, in plain PyTorch (no Ray, no MLflow).

from crosscoder import CrossCoderConfig, fit
result = fit(activations, CrossCoderConfig(expansion_ratio=8, sparsity="jumprelu"))
result.metrics.explained_variance, result.model.decoder_norms()
"""

from crosscoder.config import CrossCoderConfig, InputError, TrainingError
from crosscoder.metrics import CrossCoderMetrics, evaluate
from crosscoder.model import CrossCoder, CrossCoderOutput, SnapshotTerms
from crosscoder.trainer import TrainResult, fit, loss_drop_last_fifth

__all__ = [
    "CrossCoder",
    "CrossCoderConfig",
    "CrossCoderMetrics",
    "CrossCoderOutput",
    "InputError",
    "SnapshotTerms",
    "TrainResult",
    "TrainingError",
    "evaluate",
    "fit",
    "loss_drop_last_fifth",
]
