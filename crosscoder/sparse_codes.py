"""Training arithmetic that scales with the codes that fire, not with the dictionary size.

Once a crosscoder is sparse, only L0 << F features fire per token, yet a dense step pays for all F
four times out of five: the decoder's forward, its weight gradient, the gradient back into the codes
and the encoder's weight gradient. Here each of those runs over the non-zero codes alone:

* decoding is an ``embedding_bag``: each output row sums the decoder rows of its active features,
  weighted by their codes, without building the [nnz, width] gather;
* the decoder's weight gradient is the same bag taken the other way: each feature's row sums the
  output gradients of the tokens it fired on;
* the gradient of the codes is only needed where a code is non-zero: a sampled product;
* the encoder's weight gradient is again a bag per feature over the tokens whose pre-activation
  carries a gradient (the active ones, and for JumpReLU those inside the threshold window).

Only the encoder's forward (the dense [B, F] pre-activation) and Adam's pass over all weights stay
dense. Every sum is over the same terms as the dense product, so results agree to float32 rounding,
and every operation here is deterministic on CPU.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The one CSR operation used here (a sampled product) is tested against the dense product in tests/.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseCodes(NamedTuple):
    """Non-zero codes as (row, column, value) entries of an [n_rows, n_columns] code matrix."""

    values: torch.Tensor
    """[nnz] the codes, differentiable."""
    rows: torch.Tensor
    """[nnz] the output row each code is added to (a token, or token x S + snapshot)."""
    columns: torch.Tensor
    """[nnz] the decoder row it reads (a feature, or feature x S + snapshot)."""
    n_rows: int
    """Rows of the output."""


def is_feature_major(matrix: torch.Tensor) -> bool:
    """Whether a [B, F] matrix is the transpose of a contiguous [F, B], as the sparse step's pre-activation is."""
    return not matrix.is_contiguous() and matrix.T.is_contiguous()


def flat_memory(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A [B, F] matrix as a flat view of its memory, and whether that memory is feature-major; a layout other
    than feature-major or contiguous is copied token-major."""
    if is_feature_major(matrix):
        return matrix.T.reshape(-1), True
    return matrix.reshape(-1), False


def nonzero_pairs(matrix: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero cells of a [B, F] ``matrix``: their flat positions in the memory of ``like`` (a matrix
    of the same shape, as ``flat_memory`` lays it out), their tokens and their features."""
    if matrix.stride() != like.stride():
        matrix = torch.empty_like(like, dtype=matrix.dtype).copy_(matrix)
    positions = flat_memory(matrix)[0].nonzero().squeeze(1)
    return (positions, *cells_at(positions, like))


def cells_at(positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens and features of flat positions in the memory of ``like`` [B, F] (``flat_memory``)."""
    if is_feature_major(like):
        return positions % like.shape[0], positions // like.shape[0]
    return positions // like.shape[1], positions % like.shape[1]


def key_order(keys: torch.Tensor, n_keys: int) -> torch.Tensor | slice:
    """The stable sorting order of ``keys``, integers in [0, n_keys); on CPU, keys already in order give the
    full slice, which indexes as the identity without a copy."""
    # Entries of a feature-major pre-activation come sorted by feature: l1's decoder and encoder gradients
    # and its codes' gradient are keyed by feature, and checking (0.1 ms) saves a sort and three gathers
    # (about 3 ms each at 250,000 entries on a 2-core CPU). On CUDA the check would wait for the device.
    if not keys.is_cuda and bool((keys[1:] >= keys[:-1]).all()):
        return slice(None)
    # Sorted as int32 wherever they fit: a radix sort then takes half the passes, 3x faster on CPU.
    narrow = keys.to(torch.int32) if n_keys <= torch.iinfo(torch.int32).max else keys
    return torch.argsort(narrow, stable=True)


def bag_offsets(sorted_keys: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Start of each bag's entries in ``sorted_keys`` (empty bags included)."""
    return torch.searchsorted(sorted_keys, torch.arange(n_bags, device=sorted_keys.device))


# Columns of the decoder gathered per pass in decoding: each token reads its features' rows from the
# whole decoder, and a pass's 64 columns of it stay in cache for the next token instead of coming from
# memory again. On a 2-core CPU at (8, 768, 6144) a shared code's step took 0.97 s instead of 1.21 s at
# 5 % firing, and JumpReLU's decoding 45-54 ms instead of 73-79 at 1 %.
GATHER_COLUMN_BLOCK = 64


def bag_sum(
    keys: torch.Tensor,
    members: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    n_bags: int,
    column_block: int | None = None,
) -> torch.Tensor:
    """[n_bags, width]: out[key] = sum over entries with that key of weight * table[member]; on CPU
    ``column_block`` columns of the table at a time where given."""
    order = key_order(keys, n_bags)
    members, offsets = members[order], bag_offsets(keys[order], n_bags)
    weights = weights[order].to(table.dtype)
    width = table.shape[1]
    if column_block is None or table.is_cuda or width <= column_block:
        return F.embedding_bag(members, table, offsets=offsets, per_sample_weights=weights, mode="sum")
    out = table.new_empty((n_bags, width))
    for start in range(0, width, column_block):
        block = slice(start, start + column_block)
        out[:, block] = F.embedding_bag(
            members, table[:, block], offsets=offsets, per_sample_weights=weights, mode="sum"
        )
    return out


def add_by_feature(totals: torch.Tensor, features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """totals[features[i]] += values[i], summed in the same order on every run.

    On CUDA ``index_add_`` adds with atomics, in an order that changes from run to run, so the same
    seed gave different weights there. There each feature's entries are summed as one bag instead (the
    accumulating ``index_put_`` is deterministic too, but its kernel was a sixth of a JumpReLU step on an
    H200). On CPU ``index_add_`` is the faster and already deterministic."""
    if not totals.is_cuda:
        return totals.index_add_(0, features, values)
    entries = torch.arange(len(features), device=features.device)
    weights = torch.ones(len(features), dtype=values.dtype, device=values.device)
    sums = bag_sum(features, entries, weights, values.reshape(len(features), -1), totals.shape[0])
    return totals.add_(sums.view_as(totals))


class SparseDecode(torch.autograd.Function):
    """out[r] = sum_{(r, c, v)} v * decoder[c]: codes given as entries, decoder [n_columns, width]."""

    @staticmethod
    def forward(ctx, values, decoder, rows, columns, n_rows: int, column_block: int | None):
        # Zero codes (JumpReLU's window) add nothing here nor to the decoder's gradient; they are
        # entries only for their own gradient.
        fired = (values != 0).nonzero().squeeze(1)
        fired_rows, fired_columns, fired_values = rows[fired], columns[fired], values[fired]
        ctx.save_for_backward(decoder, rows, columns, fired_rows, fired_columns, fired_values)
        return bag_sum(fired_rows, fired_columns, fired_values, decoder, n_rows, column_block)

    @staticmethod
    def backward(ctx, grad_output):
        decoder, rows, columns, fired_rows, fired_columns, fired_values = ctx.saved_tensors
        grad_values = grad_decoder = None
        if ctx.needs_input_grad[0]:
            # <grad_output[r], decoder[c]> at each entry only: a product sampled at the code's pattern,
            # taken decoder row by decoder row. Each decoder row is then read once while the output
            # gradient, the smaller of the two, stays in cache: 1.5x faster on CPU than token-major.
            order = key_order(columns, decoder.shape[0])
            pattern = torch.sparse_csr_tensor(
                bag_offsets(columns[order], decoder.shape[0] + 1),
                rows[order],
                torch.zeros(len(rows), dtype=grad_output.dtype, device=grad_output.device),  # beta = 0 still reads it
                size=(decoder.shape[0], grad_output.shape[0]),
                check_invariants=False,
            )
            sampled = torch.sparse.sampled_addmm(pattern, decoder.to(grad_output.dtype), grad_output.T, beta=0.0)
            grad_values = torch.empty(len(rows), dtype=grad_output.dtype, device=grad_output.device)
            grad_values[order] = sampled.values()
            grad_values = grad_values.to(fired_values.dtype)
        if ctx.needs_input_grad[1]:
            output_gradient = grad_output.to(decoder.dtype)
            grad_decoder = bag_sum(fired_columns, fired_rows, fired_values, output_gradient, decoder.shape[0])
        return grad_values, grad_decoder, None, None, None, None


def sparse_decode(
    codes: SparseCodes, decoder: torch.Tensor, column_block: int | None = GATHER_COLUMN_BLOCK
) -> torch.Tensor:
    """[n_rows, width] = (the codes as a sparse [n_rows, n_columns] matrix) @ decoder [n_columns, width],
    gathering ``column_block`` columns of the decoder per pass on CPU (None: all in one pass)."""
    return SparseDecode.apply(codes.values, decoder, codes.rows, codes.columns, codes.n_rows, column_block)


class EncoderGradient:
    """How the encoder's weight gradient is taken, settled by the forward pass once it has seen how many
    codes fire (after the encoder ran, so the encoder cannot decide it itself)."""

    def __init__(self) -> None:
        self.cells: torch.Tensor | None = None
        """In a sparse step, the flat positions in the pre-activation's memory (``flat_memory``) of every cell
        its gradient can reach, each once: the weight gradient is then a bag per feature over them. None: a
        dense step, whose weight gradient is a dense product."""


class Encode(torch.autograd.Function):
    """pre = x @ W_E^T + b_E [B, F] for a feature-major W_E [F, width], whose weight gradient skips the
    features with no gradient. ``pre`` is a view of feature-major memory (``flat_memory`` reads it).

    The gradient reaching the pre-activation is zero outside the cells whose code fires (JumpReLU's
    window cells pass their gradient to the threshold, not to the pre-activation), so in a sparse step the weight gradient
    x^T @ grad_pre and the bias gradient are sums per feature over those cells alone, which the sparsity
    function has already found (``EncoderGradient.cells``): scanning the [B, F] gradient for its non-zeros
    again cost 9-10 ms of a 370 ms JumpReLU step at (2, 768, 24,576) on a 2-core CPU. In a dense step the
    weight gradient is the dense product grad_pre^T @ x.
    """

    @staticmethod
    def forward(ctx, inputs, weight, bias, gradient: EncoderGradient):
        ctx.save_for_backward(inputs, weight)
        ctx.gradient = gradient
        # Taken as the transpose of W_E @ x^T, feature-major: on a 2-core CPU at (2, 768, 24,576) with 512
        # tokens, MKL's product took 218-230 ms this way against 256-261 ms as x @ W_E^T.
        return torch.addmm(bias[:, None], weight, inputs.T).T

    @staticmethod
    def backward(ctx, grad_pre):
        inputs, weight = ctx.saved_tensors
        grad_inputs = grad_pre @ weight if ctx.needs_input_grad[0] else None
        cells = ctx.gradient.cells
        if cells is None:
            grad_weight = (grad_pre.T @ inputs.to(grad_pre.dtype)).to(weight.dtype)
            return grad_inputs, grad_weight, grad_pre.sum(0).to(weight.dtype), None
        # The cells are positions in the forward's feature-major [F, B] memory; reshape copies a gradient
        # that comes in another layout.
        gradients = grad_pre.T.reshape(-1).index_select(0, cells)
        tokens, features = cells % grad_pre.shape[0], cells // grad_pre.shape[0]
        grad_weight = bag_sum(features, tokens, gradients, inputs.to(weight.dtype), weight.shape[0])
        grad_bias = add_by_feature(weight.new_zeros(weight.shape[0]), features, gradients.to(weight.dtype))
        return grad_inputs, grad_weight, grad_bias, None


def encode(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gradient: EncoderGradient) -> torch.Tensor:
    """The encoder's pre-activation, with a weight gradient taken as ``gradient`` says by backward time."""
    return Encode.apply(inputs, weight, bias, gradient)
