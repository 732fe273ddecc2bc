"""The sparse step's gather-decode on one device, four ways, against the dense product it replaces.

    python bench/decode_kernels.py [--device cuda] [--dtype bfloat16] [--shape 8x768x6144x8192]
                                   [--densities 0.01,0.05,0.1] [--rounds 20]

With the codes of B tokens over F features (a share ``density`` non-zero) and a decoder [F, S*d]:

* forward, out[b] = sum over the features f firing on b of code[b, f] * decoder[f];
* backward, the decoder's gradient grad[f] = sum over the tokens b that f fires on of code[b, f] * grad_out[b].

Each is timed as the dense product (the [B, F] code matrix, what the dense step does), as
``crosscoder.sparse_codes.bag_sum`` (``embedding_bag``, what the sparse step uses; on CPU the forward
gathers ``GATHER_COLUMN_BLOCK`` columns of the decoder per pass), as one ``embedding_bag`` over the
whole width (the forward's "1-pass bag", to show what the column blocks give), as a CSR matrix
product (``torch.sparse.mm``: cuSPARSE on CUDA), and, for the forward, as a ``torch.compile``d gather
padded to the most features any token has, summed over them (one fused kernel where Triton is at
hand). Printed: milliseconds (median of ``rounds``) and each one's speed-up over the dense product.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from crosscoder.sparse_codes import GATHER_COLUMN_BLOCK, bag_offsets, bag_sum

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COLUMNS = (("dense", 9), ("bag", 8), ("1-pass bag", 10), ("csr", 8), ("compiled", 11))


def milliseconds(run: Callable[[], torch.Tensor], device: torch.device, rounds: int) -> float:
    """Median wall-clock milliseconds of ``run`` after two warm-up calls (compilation included there)."""
    times = []
    for index in range(rounds + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def padded_gather(indices: torch.Tensor, values: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """[B, width]: rows of ``decoder`` at ``indices`` [B, L], weighted by ``values`` [B, L], summed over L."""
    return (values[..., None] * decoder[indices]).sum(1)


def time_kernels(
    codes: torch.Tensor, decoder: torch.Tensor, grad_output: torch.Tensor, compiled: Callable, rounds: int
) -> dict[str, dict[str, float]]:
    """Milliseconds of each kernel, for the forward and for the decoder's gradient, at these codes [B, F]."""
    device, (batch_size, n_features) = codes.device, codes.shape
    tokens, features = codes.nonzero(as_tuple=True)  # row-major: grouped by token
    values = codes[tokens, features]
    csr, csr_transposed = codes.to_sparse_csr(), codes.T.contiguous().to_sparse_csr()
    # Padded per-token lists for the compiled gather: every token holds the same L slots, zeros unused.
    per_token = (codes != 0).sum(1)
    slot = torch.arange(len(tokens), device=device) - (torch.cumsum(per_token, 0) - per_token)[tokens]
    padded_indices = torch.zeros(batch_size, int(per_token.max()), dtype=torch.long, device=device)
    padded_values = torch.zeros(batch_size, int(per_token.max()), dtype=codes.dtype, device=device)
    padded_indices[tokens, slot], padded_values[tokens, slot] = features, values
    offsets = bag_offsets(tokens, batch_size)
    forward = {
        "dense": lambda: codes @ decoder,
        "bag": lambda: bag_sum(tokens, features, values, decoder, batch_size, GATHER_COLUMN_BLOCK),
        "1-pass bag": lambda: F.embedding_bag(features, decoder, offsets, per_sample_weights=values, mode="sum"),
        "csr": lambda: torch.sparse.mm(csr, decoder),
        "compiled": lambda: compiled(padded_indices, padded_values, decoder),
    }
    backward = {
        "dense": lambda: codes.T @ grad_output,
        "bag": lambda: bag_sum(features, tokens, values, grad_output, n_features),
        "csr": lambda: torch.sparse.mm(csr_transposed, grad_output),
    }
    reference = forward["dense"]().float()
    for name, run in forward.items():  # every kernel computes the same product
        error = (run().float() - reference).abs().max() / reference.abs().max()
        assert error < 2e-2, f"{name}: relative error {error:.1e}"
    return {
        label: {name: milliseconds(run, device, rounds) for name, run in kernels.items()}
        for label, kernels in (("forward", forward), ("backward", backward))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--shape", default="8x768x6144x8192", help="SxDxFxBATCH")
    parser.add_argument("--densities", default="0.01,0.05,0.1")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    n_snapshots, d_model, n_features, batch_size = (int(part) for part in args.shape.split("x"))
    width = n_snapshots * d_model
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(n_features, width, generator=generator).to(device, dtype)
    grad_output = torch.randn(batch_size, width, generator=generator).to(device, dtype)
    compiled = torch.compile(padded_gather, dynamic=False)
    print(
        f"device {device}, torch {torch.__version__}, {args.dtype}, S {n_snapshots} d {d_model} F {n_features} B {batch_size}"
    )
    print(
        f"{'density':>7} {'pass':>8} {'dense ms':>9} {'bag ms':>8} {'1-pass ms':>10} {'csr ms':>8} {'compiled ms':>11}"
        "  speed-up over dense"
    )
    for density in (float(value) for value in args.densities.split(",")):
        fires = torch.rand(batch_size, n_features, generator=generator) < density
        codes = (torch.rand(batch_size, n_features, generator=generator) * fires).to(device, dtype)
        for label, times in time_kernels(codes, decoder, grad_output, compiled, args.rounds).items():
            cells = [f"{times.get(name, float('nan')):>{size}.3f}" for name, size in COLUMNS]
            ratios = ", ".join(f"{name} {times['dense'] / ms:.2f}x" for name, ms in times.items() if name != "dense")
            print(f"{density:>7.3f} {label:>8} {' '.join(cells)}  {ratios}", flush=True)


if __name__ == "__main__":
    main()
