"""Residual-stream activations from a causal LM, running only the blocks needed for the deepest layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from study.errors import StudyInputError


class _EnoughLayers(Exception):
    """Raised by the hook on the deepest requested block: the remaining blocks need not run."""


def decoder_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The transformer blocks, in order (``layers`` for GPT-NeoX and Llama, ``h`` for GPT-2)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise StudyInputError(
        f"cannot find the transformer blocks of {type(model).__name__}; expected base_model.layers or .h"
    )


def check_layers(layers: list[int] | tuple[int, ...], n_layers: int, model_name: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad or not layers:
        raise StudyInputError(
            f"layer {bad or layers} is outside 0..{n_layers} for {model_name}; choose layers in that range"
        )


@torch.no_grad()
def residual_stream(
    model: PreTrainedModel, input_ids: torch.Tensor, layers: list[int] | tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """{layer: [batch, length, d_model]}: layer 0 is the embedding output, layer l the residual after block l.

    For l below the number of blocks this equals ``output_hidden_states[l]``; for the last block it
    is the residual before the final layer norm. Blocks after the deepest requested layer never run.
    """
    blocks = decoder_blocks(model)
    check_layers(layers, len(blocks), str(model.name_or_path))
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int, hidden: torch.Tensor) -> None:
        captured[layer] = hidden
        if layer == deepest:
            raise _EnoughLayers

    if 0 in layers:
        handles.append(
            blocks[0].register_forward_pre_hook(
                lambda _, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True
            )
        )
    for layer in set(layers) - {0}:
        handles.append(
            blocks[layer - 1].register_forward_hook(
                lambda _, __, output, layer=layer: keep(layer, output[0] if isinstance(output, tuple) else output)
            )
        )
    try:
        model.base_model(input_ids=input_ids)
    except _EnoughLayers:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@contextmanager
def residual_replaced(
    model: PreTrainedModel, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Inside the block, every forward pass sends the residual stream at ``layer`` ([batch, length, d])
    through ``replace`` and continues with what it returns (the same stream to only look at it)."""
    blocks = decoder_blocks(model)
    check_layers([layer], len(blocks), str(model.name_or_path))
    if layer == 0:

        def before_first_block(_, args, kwargs):
            if args:
                return (replace(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

        handle = blocks[0].register_forward_pre_hook(before_first_block, with_kwargs=True)
    else:

        def after_block(_, __, output):
            if isinstance(output, tuple):
                return (replace(output[0]), *output[1:])
            return replace(output)

        handle = blocks[layer - 1].register_forward_hook(after_block)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def next_token_loss(model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 16) -> float:
    """Mean cross-entropy of the predictions made at positions 1 .. length-2 (position 0's residual is
    never replaced, so its prediction is left out of comparisons between clean and spliced runs)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, 1:-1].float()
        targets = batch[:, 2:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total / count
