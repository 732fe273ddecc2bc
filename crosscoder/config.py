"""Configuration of a crosscoder and its training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from crosscoder.methods import METHODS, SparsityName


class InputError(ValueError):
    """Bad configuration or data, found before training starts; the message says how to fix it."""


class TrainingError(RuntimeError):
    """Training cannot go on (a loss that is not finite); the message names the step and the last checkpoint."""


@dataclass(frozen=True)
class CrossCoderConfig:
    """One crosscoder over S snapshots and how it is trained. Shapes come from the data."""

    expansion_ratio: float = 8
    """Features per residual dimension: n_features = expansion_ratio x d_model."""

    sparsity: SparsityName = "jumprelu"
    """jumprelu (paper 1), l1 (paper 2's ReLU + decoder-norm-weighted L1), topk or batchtopk."""

    sparsity_coefficient: float | None = None
    """lambda of the sparsity penalty; None takes the method's default (unused by topk / batchtopk)."""

    k: int = 32
    """Active features per token for topk and batchtopk (batchtopk: k x batch over the batch). Choose it near the
    data's own L0 (an l1 crosscoder's): far above it features split into partial copies at a high EV. Set from
    target_l0 where that is set."""

    target_l0: float | None = None
    """Active features per token (a feature counts once, active at any snapshot) to train to: topk and batchtopk
    fire k = round(target_l0); jumprelu and l1 adapt their coefficient during training, starting from
    sparsity_coefficient (``crosscoder.sparsity_control``). None: k and the coefficient stay as set."""

    jumprelu_bandwidth: float = 0.5
    """Width eps of the threshold's straight-through window, as a fraction of the median initial threshold."""

    jumprelu_initial_firing: float = 0.05
    """Share of tokens each feature fires on at initialisation; sets each feature's initial threshold."""

    tanh_scale: float = 4.0
    """c in the penalty tanh(c * f * ||W_D|| / sqrt(d_model)): how fast a feature's contribution saturates,
    with f * ||W_D|| read in units of the normalised input's mean norm, sqrt(d_model)."""

    frequency_scale: float = 0.01
    """s_f in the penalty p (1 + p / s_f): above this activation frequency the quadratic term dominates."""

    threshold_lr_multiplier: float = 1.0
    """The threshold learns at this fraction of the learning rate (paper 1: 0.1, which leaves L0 where
    initialisation put it on the planted sets)."""

    learning_rate: float = 1e-3
    """Peak Adam learning rate."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates."""

    lr_warmup_fraction: float = 0.02
    """Share of steps over which the learning rate rises linearly from zero."""

    lr_cooldown_fraction: float = 0.2
    """Share of final steps over which the learning rate falls linearly to zero."""

    sparsity_warmup_fraction: float = 0.05
    """Share of steps over which the sparsity coefficient rises linearly from zero."""

    grad_clip_norm: float | None = None
    """Clip the global gradient norm to this value (paper 2: 1.0); None leaves gradients alone."""

    encoder_init_factor: float = 1.0
    """W_E^s starts as (W_D^s)^T x factor / S, so that the summed pre-activation keeps the decoder's scale."""

    batch_size: int = 1024
    """Tokens per optimizer step."""

    n_steps: int = 1000
    """Optimizer steps."""

    seed: int = 0
    """Seed of the initial weights and of the data order."""

    sparse_step_max_density: float | None = None
    """Training decodes from the non-zero codes alone while at most this share of codes fire (0: always dense;
    None: the device's measured crossover for the method's codes, ``crosscoder.methods.SPARSE_STEP_MAX_DENSITY``)."""

    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""

    autocast_bf16: bool = False
    """Run the matmuls under bfloat16 autocast (weights and optimizer stay float32)."""

    normalisation_tokens: int = 16384
    """Tokens used to estimate each snapshot's mean norm for the dataset-wise normalisation."""
    initialization_tokens: int = 4096
    """Tokens (of those) on which the initial decoder norm and the JumpReLU thresholds are chosen."""

    resample_dead_every: int | None = 250
    """Steps between resamplings: features that fired on none of the last this-many steps' tokens get the
    error of a badly reconstructed token as their new direction (crosscoder.resampling); none in the cool-down
    or the last two fifths of the steps (the last half for jumprelu with a target_l0). None never resamples."""

    dead_window_tokens: int = 1_000_000
    """A feature that has not fired over this many training tokens counts as dead."""

    log_every: int = 50
    """Steps between entries of the training history; each entry's losses are means over those steps."""

    checkpoint_every: int | None = None
    """Steps between safetensors checkpoints in checkpoint_dir; None writes none."""

    checkpoint_dir: str | None = None
    """Folder of the periodic checkpoints; training resumes from the newest one found there."""

    def __post_init__(self) -> None:
        if self.sparsity not in METHODS:
            raise InputError(f"sparsity '{self.sparsity}' is unknown; choose one of {', '.join(METHODS)}")
        if not self.expansion_ratio > 0:
            raise InputError(f"expansion_ratio must be > 0, got {self.expansion_ratio}")
        for name in ("batch_size", "n_steps", "k", "log_every", "normalisation_tokens", "initialization_tokens"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.checkpoint_every is not None and (self.checkpoint_every <= 0 or not self.checkpoint_dir):
            raise InputError("checkpoint_every needs a positive value and a checkpoint_dir to write to")
        if self.jumprelu_bandwidth <= 0:
            raise InputError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        if not 0 < self.jumprelu_initial_firing < 1:
            raise InputError(f"jumprelu_initial_firing must lie in (0, 1), got {self.jumprelu_initial_firing}")
        if self.sparse_step_max_density is not None and not 0 <= self.sparse_step_max_density <= 1:
            raise InputError(f"sparse_step_max_density must lie in [0, 1], got {self.sparse_step_max_density}")
        if self.resample_dead_every is not None and self.resample_dead_every <= 0:
            raise InputError(f"resample_dead_every must be a positive integer or None, got {self.resample_dead_every}")
        if self.sparsity_coefficient is not None and self.sparsity_coefficient < 0:
            raise InputError(f"sparsity_coefficient must be >= 0, got {self.sparsity_coefficient}")
        if self.target_l0 is not None:
            if not self.target_l0 >= 1:
                raise InputError(f"target_l0 must be at least 1 active feature per token, got {self.target_l0}")
            if METHODS[self.sparsity].uses_k:
                object.__setattr__(self, "k", round(self.target_l0))  # frozen: set once, here
            elif not self.lambda_ > 0:
                raise InputError(
                    "target_l0 adapts the sparsity coefficient from its start: set sparsity_coefficient > 0"
                )

    @property
    def controls_l0(self) -> bool:
        """Whether training adapts the coefficient toward target_l0 (a penalised method with a target)."""
        return self.target_l0 is not None and not METHODS[self.sparsity].uses_k

    @property
    def lambda_(self) -> float:
        """The sparsity coefficient in force: the configured one or the method's default."""
        if self.sparsity_coefficient is not None:
            return self.sparsity_coefficient
        return METHODS[self.sparsity].default_coefficient

    def n_features(self, d_model: int) -> int:
        return max(1, round(self.expansion_ratio * d_model))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CrossCoderConfig:
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        return cls(**values)
