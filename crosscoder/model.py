"""The crosscoder: per-snapshot encoders and decoders around one shared sparse code.

Over 300 lines on purpose: one nn.Module, its forward (dense and sparse decoding) and its initialisation.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from crosscoder.config import CrossCoderConfig, InputError
from crosscoder.methods import METHODS, SPARSE_STEP_MAX_DENSITY, CodeInputs, jumprelu_tanh_scale
from crosscoder.sparse_codes import EncoderGradient, SparseCodes, encode, is_feature_major, sparse_decode
from crosscoder.sparsity import CodeEntries, decoder_and_norms
from crosscoder.sparsity_control import initial_control


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 on AMX tiles (oneDNN uses them under autocast); it also marks the kind
    of CPU whose float32 products are fast enough to move the crossover (``SPARSE_STEP_MAX_DENSITY``)."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def matmul_kind(device_type: str) -> str:
    """The key of ``SPARSE_STEP_MAX_DENSITY`` for dense products on this device type, as autocast stands now."""
    if device_type != "cpu":
        return device_type
    bf16_autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    kind = "cpu-amx" if cpu_has_amx_bf16() else "cpu"
    return f"{kind}-bf16" if bf16_autocast else kind


class CrossCoderOutput(NamedTuple):
    """What one forward pass gives, all in normalised units."""

    reconstruction: torch.Tensor
    """[B, S, d_model] the crosscoder's estimate of the normalised input."""
    codes: torch.Tensor
    """Feature activations: [S, B, F] for jumprelu (gated per snapshot), else [B, F] shared by all snapshots;
    a torch sparse tensor when a training step decoded sparsely."""
    active: torch.Tensor
    """[B, F] bool: the feature fired at any snapshot."""
    sparsity_penalty: torch.Tensor
    """The method's penalty before the coefficient lambda (zero for topk / batchtopk)."""


class SnapshotTerms(NamedTuple):
    """Each snapshot's input written as the crosscoder sees it, in raw units:
    x_s = codes[s] @ decoder[s] + bias[s] + error[:, s]."""

    codes: torch.Tensor
    """[S, B, F] feature activations (the shared code repeated per snapshot where codes are shared)."""
    decoder: torch.Tensor
    """[S, F, d] each feature's direction and size at each snapshot, in raw units."""
    bias: torch.Tensor
    """[S, d] decoder bias in raw units."""
    error: torch.Tensor
    """[B, S, d] what the features do not reconstruct."""


def dense_codes(values: torch.Tensor, indices: tuple[torch.Tensor, ...], shape: tuple[int, ...], feature_major: bool):
    """A zero tensor of ``shape`` [..., B, F] with ``values`` at ``indices`` (..., tokens, features), held in
    [..., F, B] memory where ``feature_major``, as the entries of a feature-major pre-activation come."""
    if not feature_major:
        return values.new_zeros(shape).index_put(indices, values)
    *leading, tokens, features = indices
    transposed = values.new_zeros((*shape[:-2], shape[-1], shape[-2]))
    return transposed.index_put((*leading, features, tokens), values).transpose(-1, -2)


class FeatureMajorProduct(torch.autograd.Function):
    """codes [..., B, F] @ decoder [..., F, width] for codes held in [..., F, B] memory, whose gradient comes
    back in that same layout.

    A feature-major pre-activation's entries come feature by feature. Written into token-major codes, and
    their gradient (autograd's matmul gives it token-major) read back the same way, they made a JumpReLU step
    that fell back to dense 0.8x the dense step (5 % firing, (8, 128, 1,024), 2-core CPU)."""

    @staticmethod
    def forward(ctx, codes, decoder):
        ctx.save_for_backward(codes, decoder)
        return codes @ decoder

    @staticmethod
    def backward(ctx, grad_output):
        codes, decoder = ctx.saved_tensors
        grad_codes = (decoder @ grad_output.transpose(-1, -2)).transpose(-1, -2) if ctx.needs_input_grad[0] else None
        grad_decoder = codes.transpose(-1, -2) @ grad_output if ctx.needs_input_grad[1] else None
        return grad_codes, grad_decoder


def feature_major_product(codes: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """``FeatureMajorProduct``, in the dtype autocast would multiply in: a custom backward runs outside autocast."""
    device_type = codes.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        codes, decoder = codes.to(dtype), decoder.to(dtype)
    return FeatureMajorProduct.apply(codes, decoder)


def fired_share(entries: CodeEntries, n_pairs: int, n_snapshots: int) -> float:
    """The share of a batch's codes that fire, over its n_pairs (token, feature) pairs and their snapshots.

    JumpReLU's zero codes in the threshold's window are entries but not counted: they cost only their own
    gradient, and counted they kept the step dense at 5 % firing, where the sparse one is 1.2-1.6x faster
    in float32 on CPU (bench/crosscoder_throughput.py)."""
    if entries.snapshots is None:  # one code per pair, shared by the snapshots, every entry non-zero
        return len(entries.values) / n_pairs
    return int(torch.count_nonzero(entries.values.detach())) / (n_pairs * n_snapshots)


class CrossCoder(nn.Module):
    """x_s -> pre = sum_s x_s W_E^s + b_E -> sparse f -> x_hat_s = f W_D^s + b_D^s, for S snapshots.

    Parameters are laid out for speed: the encoder is one [F, S*d] matrix, so the sum over
    snapshots is a single matmul; the decoder is stored feature-major, [F, S, d], so that a code
    shared by all snapshots decodes in one [B, F] x [F, S*d] matmul with no copy, while
    ``decoder_weight.transpose(0, 1)`` is the papers' [S, F, d] for per-snapshot codes. Both are
    feature-major so that a sparse step's weight gradients are written row by row, one row per feature
    that fired.
    """

    input_scale: torch.Tensor
    jumprelu_window: torch.Tensor
    log_threshold: nn.Parameter | None

    def __init__(self, n_snapshots: int, d_model: int, config: CrossCoderConfig, features: range | None = None):
        """``features``: the range of features this instance holds when it is one shard of a crosscoder
        split over ranks (``crosscoder.sharded``); None holds them all."""
        super().__init__()
        total_features = config.n_features(d_model)
        if METHODS[config.sparsity].uses_k and config.k >= total_features:
            raise InputError(
                f"k = {config.k} must be below n_features = {total_features}; lower k or raise expansion_ratio"
            )
        features = features if features is not None else range(total_features)
        self.config = config
        self.n_snapshots, self.d_model = n_snapshots, d_model
        self.n_features, self.total_features = len(features), total_features
        # Set by crosscoder.sharded.shard_of: the ranks the other features live on.
        self.process_group: torch.distributed.ProcessGroup | None = None
        self.encoder_weight = nn.Parameter(torch.zeros(self.n_features, n_snapshots * d_model))
        self.encoder_bias = nn.Parameter(torch.zeros(self.n_features))
        self.decoder_weight = nn.Parameter(torch.zeros(self.n_features, n_snapshots, d_model))
        self.decoder_bias = nn.Parameter(torch.zeros(n_snapshots, d_model))
        learns_threshold = METHODS[config.sparsity].layout == "per_snapshot"
        self.log_threshold = nn.Parameter(torch.zeros(self.n_features)) if learns_threshold else None
        # sqrt(d_model) / E||x_s||: the dataset-wise normalisation, estimated from data and saved with the model.
        self.register_buffer("input_scale", torch.ones(n_snapshots))
        # JumpReLU's straight-through window in units of the gated quantity, fixed at initialisation.
        self.register_buffer("jumprelu_window", torch.ones(()))
        # The coefficient controller's state where it holds a target L0 (crosscoder.sparsity_control): saved with
        # the weights, so a checkpoint resumes it and the saved crosscoder says which coefficient it settled on.
        self.sparsity_control: torch.Tensor | None
        if config.controls_l0:
            assert config.target_l0 is not None  # controls_l0 says so
            self.register_buffer("sparsity_control", initial_control(config.lambda_, config.target_l0))
        else:
            self.sparsity_control = None

    def decoder_norms(self) -> torch.Tensor:
        """[n_features, S]: ||W_D^{s,i}||, how strongly feature i is written at snapshot s."""
        return self.decoder_weight.norm(dim=-1)

    def normalise(self, activations: torch.Tensor) -> torch.Tensor:
        return activations * self.input_scale[:, None].to(activations.dtype)

    @torch.no_grad()
    def reconstruct(self, activations: torch.Tensor) -> torch.Tensor:
        """[B, S, d] raw activations -> their reconstruction in raw units (to splice back into the model)."""
        return self(activations).reconstruction / self.input_scale[:, None].to(activations.dtype)

    @torch.no_grad()
    def feature_activations(self, activations: torch.Tensor) -> torch.Tensor:
        """[B, F] each feature's activation on each token; for JumpReLU, its largest over snapshots."""
        codes = self(activations).codes
        return codes.amax(0) if codes.dim() == 3 else codes

    @torch.no_grad()
    def snapshot_terms(self, activations: torch.Tensor) -> SnapshotTerms:
        """Split raw activations [B, S, d] into feature contributions and error, per snapshot
        (what attribution and ablation act on)."""
        output = self(activations)
        codes = output.codes if output.codes.dim() == 3 else output.codes.expand(self.n_snapshots, -1, -1)
        scale = self.input_scale[:, None].to(activations.dtype)  # [S, 1]
        decoder = self.decoder_weight.transpose(0, 1) / scale[:, :, None]
        error = activations - output.reconstruction / scale
        return SnapshotTerms(codes, decoder, self.decoder_bias / scale, error)

    @torch.no_grad()
    def snapshot_preactivations(self, activations: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[S, B, K]: the pre-activation of the K ``features`` that each snapshot's input contributes alone."""
        normalised = self.normalise(activations).transpose(0, 1)  # [S, B, d]
        encoder = self.encoder_weight[features].view(-1, self.n_snapshots, self.d_model)  # [K, S, d]
        return torch.bmm(normalised, encoder.permute(1, 2, 0))

    def encode(self, normalised: torch.Tensor) -> torch.Tensor:
        """[B, S, d] -> pre-activation [B, F], summed over snapshots in one matmul."""
        return torch.addmm(self.encoder_bias, normalised.flatten(1), self.encoder_weight.T)

    def forward(self, activations: torch.Tensor) -> CrossCoderOutput:
        """Reconstruct raw activations [B, S, d]; returns normalised reconstruction, codes and penalty.

        In training (grad enabled, train mode) the step decodes sparsely whenever at most
        ``sparse_step_max_density`` of the codes are non-zero; the result is the same to float32 rounding.
        """
        config = self.config
        max_density = self.sparse_step_max_density() if self.training and torch.is_grad_enabled() else 0.0
        normalised = self.normalise(activations)
        encoder_gradient = EncoderGradient()
        if max_density > 0:
            pre = encode(normalised.flatten(1), self.encoder_weight, self.encoder_bias, encoder_gradient)
        else:
            pre = self.encode(normalised)
        method = METHODS[config.sparsity]
        decoder: torch.Tensor = self.decoder_weight
        norms: torch.Tensor | None = None
        if method.reads_decoder_norms:
            decoder, norms = decoder_and_norms(self.decoder_weight)  # norms [F, S]
        inputs = CodeInputs(
            pre,
            norms,
            self.log_threshold,
            self.jumprelu_window.item() if method.layout == "per_snapshot" else 0.0,
            jumprelu_tanh_scale(config.tanh_scale, self.d_model),
            config.frequency_scale,
            config.k,
            self.process_group,
        )
        entries, penalty, active = method.codes(inputs)
        sparse_step = max_density > 0 and fired_share(entries, pre.numel(), self.n_snapshots) <= max_density
        if sparse_step:
            encoder_gradient.cells = entries.cells
            reconstruction, codes = self.decode_sparse(entries, decoder, len(pre))
        else:
            reconstruction, codes = self.decode_dense(entries, decoder, pre)
        return CrossCoderOutput(reconstruction, codes, active, penalty)

    def sparse_step_max_density(self) -> float:
        """The configured crossover to the sparse step, or the one measured for this method's code layout and
        the dense products of the device the weights are on."""
        if self.config.sparse_step_max_density is not None:
            return self.config.sparse_step_max_density
        layout = METHODS[self.config.sparsity].layout
        return SPARSE_STEP_MAX_DENSITY.get(matmul_kind(self.decoder_weight.device.type), {}).get(layout, 0.0)

    def decode_dense(
        self, entries: CodeEntries, decoder: torch.Tensor, pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction [B, S, d] and the dense codes, in the layout of ``pre``, by matmuls over all features
        of ``decoder`` [F, S, d]."""
        feature_major = is_feature_major(pre)
        product = feature_major_product if feature_major else torch.matmul
        if entries.snapshots is None:
            codes = dense_codes(entries.values, (entries.tokens, entries.features), pre.shape, feature_major)
            # Shared code: all snapshots decoded by one [B, F] x [F, S*d] product.
            flat = product(codes, decoder.flatten(1).to(codes.dtype))
            return flat.view(-1, self.n_snapshots, self.d_model) + self.decoder_bias, codes
        shape = (self.n_snapshots, *pre.shape)
        indices = (entries.snapshots, entries.tokens, entries.features)
        codes = dense_codes(entries.values, indices, shape, feature_major)
        # Per-snapshot codes: one [B, F] x [F, d] product per snapshot.
        per_snapshot = product(codes, decoder.transpose(0, 1).to(codes.dtype))
        return (per_snapshot + self.decoder_bias[:, None, :]).transpose(0, 1), codes

    def decode_sparse(
        self, entries: CodeEntries, decoder: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same reconstruction from the entries alone (``crosscoder.sparse_codes``), and the codes as a
        torch sparse tensor."""
        n_snapshots, d_model = self.n_snapshots, self.d_model
        size: tuple[int, ...]
        detached = entries.values.detach()
        if entries.snapshots is None:
            codes = SparseCodes(entries.values, entries.tokens, entries.features, batch_size)
            flat = sparse_decode(codes, decoder.flatten(1))
            indices, size = torch.stack([entries.tokens, entries.features]), (batch_size, self.n_features)
        else:
            # Row b*S + s of the output reads row i*S + s of the decoder viewed as [F*S, d].
            rows = entries.tokens * n_snapshots + entries.snapshots
            columns = entries.features * n_snapshots + entries.snapshots
            codes = SparseCodes(entries.values, rows, columns, batch_size * n_snapshots)
            flat = sparse_decode(codes, decoder.view(-1, d_model))
            indices = torch.stack([entries.snapshots, entries.tokens, entries.features])
            size = (n_snapshots, batch_size, self.n_features)
        reconstruction = flat.view(batch_size, n_snapshots, d_model) + self.decoder_bias
        return reconstruction, torch.sparse_coo_tensor(indices, detached, size, check_invariants=False)

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        """Set the normalisation from ``sample`` [n, S, d] and draw the initial weights.

        One decoder is drawn and copied to every snapshot; the encoder starts as its transpose
        (divided by S, as the pre-activation sums S snapshots); the decoder norm is the one, on a
        log grid, that gives the lowest reconstruction error on the sample's first
        ``initialization_tokens``. JumpReLU thresholds start where each feature fires on
        ``jumprelu_initial_firing`` of those tokens, and
        the straight-through window is ``jumprelu_bandwidth`` times their median: fixed values
        would, depending on the data's scale, leave every feature dead or none sparse.
        """
        sample = sample.float()
        mean_norms = sample.norm(dim=-1).mean(0)
        self.input_scale.copy_(math.sqrt(self.d_model) / mean_norms.clamp_min(1e-12))
        self.decoder_bias.copy_(self.normalise(sample).mean(0))
        # The norm search and the thresholds need far fewer tokens than the normalisation: on a
        # large dictionary, 16 forward passes over the whole sample cost more than training.
        subset = sample[: self.config.initialization_tokens]
        normalised = self.normalise(subset)
        directions = torch.randn(self.n_features, self.d_model, generator=generator)
        directions /= directions.norm(dim=-1, keepdim=True)
        # With a zero bias the pre-activation is linear in the encoder, and the gated quantity
        # pre * ||W_D|| scales as norm²: one product gives the thresholds for every candidate norm.
        unit_gated = normalised.sum(1) @ directions.T * (self.config.encoder_init_factor / self.n_snapshots)
        rank = max(1, math.ceil((1 - self.config.jumprelu_initial_firing) * len(unit_gated)))
        unit_thresholds = unit_gated.kthvalue(rank, dim=0).values

        def set_norm(norm: float) -> None:
            self.decoder_weight.copy_(directions[:, None, :].expand(-1, self.n_snapshots, -1) * norm)
            encoder = directions * (norm * self.config.encoder_init_factor / self.n_snapshots)
            self.encoder_weight.copy_(encoder.repeat(1, self.n_snapshots))
            if self.log_threshold is not None:
                self.log_threshold.copy_((unit_thresholds * norm * norm).clamp_min(1e-6).log())

        # Codes scale with the norm and the decoder with it, while which codes fire does not depend on it
        # (thresholds scale as norm², the encoder's bias is zero, top-k picks the same features): the
        # reconstruction is bias + norm² x (its value at norm 1), so one forward pass gives the error at
        # every candidate norm. (Not quite for a threshold held at its floor of 1e-6, whose codes below
        # 1e-6 / norm² fire at some norms only: they change the error by far less than the grid's steps.)
        # A pass per candidate cost a tenth of a 1,000-step x16 trial of the main command.
        set_norm(1.0)
        unit_reconstruction = self(subset).reconstruction - self.decoder_bias
        target = normalised - self.decoder_bias

        def error(norm: float) -> float:
            return (norm * norm * unit_reconstruction - target).square().sum(-1).mean().item()

        set_norm(min(torch.logspace(-2, 1, 16).tolist(), key=error))
        if self.log_threshold is not None:
            self.jumprelu_window.fill_(self.config.jumprelu_bandwidth * self.log_threshold.exp().median().item())

    def save(self, path: str | Path) -> None:
        """One safetensors file: the weights, the normalisation, and the config as metadata."""
        metadata = {
            "config": json.dumps(self.config.to_dict()),
            "n_snapshots": str(self.n_snapshots),
            "d_model": str(self.d_model),
            "encoder_layout": "features_first",
        }
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> CrossCoder:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        model = cls(
            int(metadata["n_snapshots"]),
            int(metadata["d_model"]),
            CrossCoderConfig.from_dict(json.loads(metadata["config"])),
        )
        state = load_file(str(path))
        if metadata.get("encoder_layout") != "features_first":  # written before the encoder was feature-major
            state["encoder_weight"] = state["encoder_weight"].T.contiguous()
        model.load_state_dict(state)
        return model.to(device)
