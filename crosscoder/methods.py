"""The sparsity methods, each declared once: whether it uses ``k``, whether it reads the decoder norms, how it
picks the codes that fire and its penalty, its default coefficient, and the code layout whose measured
crossover to the sparse training step it takes. The model, the sharded trainer, the sweep's checks and the
report read these declarations; adding a method is one ``SparsityMethod`` in ``METHODS`` (CONTRIBUTING.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

from crosscoder.sparse_codes import is_feature_major
from crosscoder.sparsity import (
    CodeEntries,
    batch_topk_fires,
    frequency_penalty,
    jumprelu,
    l1_penalty,
    shared_entries,
    topk_fires,
)

SparsityName = Literal["jumprelu", "l1", "topk", "batchtopk"]
"""The methods' names, as a configuration spells them (``METHODS`` has one entry each)."""
CodeLayout = Literal["shared", "per_snapshot"]

# Largest share of firing codes at which the sparse training step still beats the dense one: a property of
# the machine, per kind of dense matmul (``crosscoder.model.matmul_kind``) and per code layout ("shared": one
# code per feature for all snapshots, as l1, topk and batchtopk have; "per_snapshot": JumpReLU's, which also
# pay for the zero codes in the threshold's window). Measured with bench/crosscoder_throughput.py on two
# 2-core CPUs, each entry a little below the smaller shape's break-even so that `auto` is never slower than
# the dense step there. The CPU with AMX (an Intel Xeon: two 512-bit FMA units, 370-470 GFLOP/s float32)
# breaks even near 7-8 % firing for l1 and 3.5-5 % for JumpReLU in float32; bf16 autocast on its AMX
# tiles runs the dense products 7x faster while the sparse ones stay float32, so there break-even falls
# to about 1.8 % (l1) and 1.3 % (JumpReLU) at (8, 128, 1,024), the bench's smallest shape. The CPU without
# (an AMD EPYC, 200-220 GFLOP/s float32) breaks even near 35 % (l1; topk and batchtopk 1.16-1.21x at
# 25 %) and 10 % (JumpReLU) in float32, near 7-8 % and 3 % in bf16. AMX stands for the first kind of
# CPU; every CPU without it gets the second's entries. Kinds not listed, CUDA's among them, stay dense:
# on an H200, bf16 and float32, cuBLAS's dense products beat the embedding-bag, CSR and compiled gather
# kernels down to 1 % (bench/decode_kernels.py).
SPARSE_STEP_MAX_DENSITY: dict[str, dict[CodeLayout, float]] = {
    "cpu": {"shared": 0.2, "per_snapshot": 0.08},
    "cpu-bf16": {"shared": 0.06, "per_snapshot": 0.03},
    "cpu-amx": {"shared": 0.06, "per_snapshot": 0.03},
    "cpu-amx-bf16": {"shared": 0.015, "per_snapshot": 0.012},
}


class CodeInputs(NamedTuple):
    """What a method may read to pick its codes."""

    pre: torch.Tensor
    """[B, F] the shared pre-activation (feature-major memory in the sparse step)."""
    decoder_norms: torch.Tensor | None
    """[F, S] the decoder norms, where the method reads them (``reads_decoder_norms``), else None."""
    log_threshold: torch.Tensor | None
    """[F] JumpReLU's learned log-thresholds; None for the other methods."""
    window: float
    """JumpReLU's straight-through window, in units of the gated quantity."""
    tanh_scale: float
    """JumpReLU's c, already divided by sqrt(d_model)."""
    frequency_scale: float
    """JumpReLU's s_f."""
    k: int
    """Active features per token (topk) or on average (batchtopk)."""
    group: dist.ProcessGroup | None
    """The process group of a crosscoder split by features over ranks (None: one process)."""


class MethodCodes(NamedTuple):
    """A method's codes for one batch."""

    entries: CodeEntries
    penalty: torch.Tensor
    """The sparsity penalty, before the coefficient."""
    active: torch.Tensor
    """[B, F] bool, in the layout of ``pre``: the (token, feature) pairs whose code is non-zero at some snapshot."""


class SparsityMethod(NamedTuple):
    """One sparsity method."""

    uses_k: bool
    """It fires ``k`` features per token or per batch: k must be below the dictionary, and each shard of a split
    crosscoder must hold at least k features."""
    reads_decoder_norms: bool
    """Its codes or its penalty read the decoder norms (their gradient then reaches the decoder through them)."""
    layout: CodeLayout
    """per_snapshot: a code per snapshot (JumpReLU gates each by its decoder norm there, with a learned
    threshold); shared: one code for all snapshots. Picks the row of SPARSE_STEP_MAX_DENSITY."""
    default_coefficient: float
    """lambda of its penalty when none is configured (0 where it has none)."""
    codes: Callable[[CodeInputs], MethodCodes]
    """Which codes fire, and the penalty."""


def active_pairs(entries: CodeEntries, pre: torch.Tensor) -> torch.Tensor:
    """[B, F] bool, in the layout of ``pre``: the (token, feature) pairs whose code is non-zero at some snapshot."""
    active = torch.zeros(pre.numel(), dtype=torch.bool, device=pre.device).index_fill_(0, entries.cells, True)
    return active.view(pre.shape[1], pre.shape[0]).T if is_feature_major(pre) else active.view(pre.shape)


def jumprelu_codes(inputs: CodeInputs) -> MethodCodes:
    assert inputs.decoder_norms is not None and inputs.log_threshold is not None
    entries, frequency = jumprelu(
        inputs.pre, inputs.decoder_norms, inputs.log_threshold, inputs.window, inputs.tanh_scale
    )
    return MethodCodes(entries, frequency_penalty(frequency, inputs.frequency_scale), active_pairs(entries, inputs.pre))


def l1_codes(inputs: CodeInputs) -> MethodCodes:
    assert inputs.decoder_norms is not None
    fires = inputs.pre > 0
    entries = shared_entries(inputs.pre, fires)
    return MethodCodes(entries, l1_penalty(entries, inputs.decoder_norms, len(inputs.pre)), fires)


def unpenalised(pick: Callable[[torch.Tensor, int, dist.ProcessGroup | None], torch.Tensor]):
    """A method whose rule alone keeps the codes sparse (top-k): its fired pre-activations, no penalty."""

    def codes(inputs: CodeInputs) -> MethodCodes:
        fires = pick(inputs.pre, inputs.k, inputs.group)
        return MethodCodes(shared_entries(inputs.pre, fires), inputs.pre.new_zeros(()), fires)

    return codes


# jumprelu's 1e-2 recovers the planted dictionaries of crosscoder.synthetic (bench/hard_planted.py); the
# reconstruction loss is divided by d_model, its tanh reads codes in units of sqrt(d_model), and every penalty
# is averaged over snapshots, so these carry over between model widths and snapshot counts. (l1's 9e-3 is the
# 1e-3 it was when its penalty summed decoder norms over snapshots, at 9 snapshots.)
METHODS: dict[str, SparsityMethod] = {
    "jumprelu": SparsityMethod(False, True, "per_snapshot", 1e-2, jumprelu_codes),
    "l1": SparsityMethod(False, True, "shared", 9e-3, l1_codes),
    "topk": SparsityMethod(True, False, "shared", 0.0, unpenalised(topk_fires)),
    "batchtopk": SparsityMethod(True, False, "shared", 0.0, unpenalised(batch_topk_fires)),
}
"""Each method by its name (paper 1's JumpReLU, paper 2's decoder-norm-weighted L1, TopK and BatchTopK)."""


def jumprelu_tanh_scale(tanh_scale: float, d_model: int) -> float:
    """Inputs are normalised to mean norm sqrt(d_model), so f * ||W_D|| grows as sqrt(d_model): read in those
    units the tanh keeps one meaning at every width. In raw units c = 4 saturates on nearly every code, the
    penalty's gradient then reaches only the threshold, and L0 stays where initialisation put it
    (bench/hard_planted.py: 57 % of the planted features recovered)."""
    return tanh_scale / math.sqrt(d_model)
