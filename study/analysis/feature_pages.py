"""What a feature browser page shows of one trial's features, computed from what the trial already holds: the
crosscoder, its held-out activations and their tokens, the snapshots' unembeddings, and its per-feature table
(``ClaimStatistics.features``). ``reports.features`` assembles the pages into ``features.html`` once the sweep's
other trials and verdicts are known.

The result is plain JSON (lists, numbers, strings): it is logged as one artifact of the trial's run.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from crosscoder import CrossCoder
from study.lm.trajectory import Snapshot, load_model
from study.record import IE_COLUMN, RELIE_COLUMN, TOP_FEATURES

TOP_BY_EFFECT = TOP_FEATURES
"""Features shown for their indirect effect on the task at the last snapshot, largest first (the ones RelIE, the
seeds' top-feature overlap and the report's RelIE table read)."""
EMERGENT_EACH_END = 6
"""Earliest and latest emergent features shown, this many at each end."""
INITIAL_SAMPLE = 8
"""Initialization-dependent features shown, drawn at random (by the trial's seed)."""
PLANTED_SHOWN = 12
"""On a planted trajectory, features recovering a planted one shown at most (token-specific ones first)."""
MAX_FEATURES = 48
"""A trial's pages at most: keeps features.html near a hundred kilobytes."""
CONTEXTS_SHOWN = 8
"""Top-activating held-out contexts per feature (per snapshot where codes differ per snapshot)."""
CONTEXT_SIDE = 5
"""Tokens shown either side of the firing token."""
TOP_TOKENS = 8
"""Most frequent tokens among a feature's firings."""
LOGIT_TOKENS = 6
"""Tokens listed as most promoted and most suppressed by a feature's direct path."""
LOGIT_SNAPSHOTS = 3
"""Snapshots at which the logit effect is shown: the first, the middle and the last."""


def feature_kind(row: dict, first_step: int) -> str:
    """dead, unresolved (its decoders never moved from their initial value), initialization-dependent (present at
    the first snapshot) or emergent."""
    if not row["alive"]:
        return "dead"
    if row["unresolved"] or math.isnan(row["emergence_step"]):
        return "unresolved"
    return "initialization-dependent" if row["emergence_step"] == first_step else "emergent"


def chosen_features(features: pd.DataFrame, steps: list[int], seed: int, planted: dict[int, dict]) -> list[int]:
    """The features a trial shows: its top features by indirect effect at the last snapshot, the earliest and
    latest emergent, a sample of initialization-dependent ones and, on a planted trajectory, those recovering a
    planted feature; at most MAX_FEATURES, in that order of priority."""
    chosen: list[int] = []
    effect = f"{IE_COLUMN}{steps[-1]}"
    if effect in features:
        chosen += features.dropna(subset=[effect]).nlargest(TOP_BY_EFFECT, effect)["feature"].tolist()
    kinds = pd.Series([feature_kind(row, steps[0]) for row in features.to_dict("records")], index=features.index)
    emergent = features[kinds == "emergent"].sort_values(["emergence_step", "feature"])["feature"].tolist()
    chosen += emergent[:EMERGENT_EACH_END] + emergent[-EMERGENT_EACH_END:]
    initial = torch.tensor(features[kinds == "initialization-dependent"]["feature"].tolist(), dtype=torch.long)
    order = torch.randperm(len(initial), generator=torch.Generator().manual_seed(seed))
    chosen += initial[order[:INITIAL_SAMPLE]].tolist()
    by_kind = sorted(planted, key=lambda feature: (planted[feature]["kind"] != "specific", feature))
    chosen += by_kind[:PLANTED_SHOWN]
    return list(dict.fromkeys(int(feature) for feature in chosen))[:MAX_FEATURES]


def context_window(row: int, token_ids: torch.Tensor, positions: torch.Tensor, tokenizer) -> dict:
    """The tokens of ``row``'s context around it (rows of one context are consecutive, positions 1, 2, ...)."""
    position = int(positions[row])
    first = row - min(CONTEXT_SIDE, position - 1)
    last = row
    while last - row < CONTEXT_SIDE and last + 1 < len(positions) and positions[last + 1] == positions[last] + 1:
        last += 1
    return {
        "tokens": [tokenizer.decode([int(token)]) for token in token_ids[first : last + 1]],
        "at": row - first,
    }


@torch.no_grad()
def feature_codes(
    model: CrossCoder, held_out: torch.Tensor, features: list[int], batch_size: int = 4096
) -> torch.Tensor:
    """[C, N, K] the ``features``' codes on every held-out row: C = 1 where one code serves every snapshot, C = S
    where each snapshot is gated apart (JumpReLU)."""
    device = model.decoder_weight.device
    index = torch.tensor(features, dtype=torch.long)
    chunks = []
    for chunk in held_out.split(batch_size):
        codes = model(chunk.to(device)).codes.float().cpu()
        chunks.append((codes if codes.dim() == 3 else codes[None])[..., index])
    return torch.cat(chunks, dim=1)


def top_contexts(codes: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor, tokenizer) -> dict:
    """Per code set in ``codes`` [C, N] (keyed by its index), the CONTEXTS_SHOWN rows where it is largest and positive
    as [context, activation]; the contexts themselves listed once under "contexts" (per-snapshot gates of one
    feature mostly pick the same rows)."""
    rows: dict[int, int] = {}
    tops = {}
    for index, code in enumerate(codes):
        values, top_rows = code.topk(min(CONTEXTS_SHOWN, len(code)))
        tops[index] = [
            [rows.setdefault(int(row), len(rows)), round(float(value), 4)]
            for value, row in zip(values, top_rows)
            if value > 0
        ]
    return {"contexts": [context_window(row, token_ids, positions, tokenizer) for row in rows], "top": tops}


def token_distribution(fires: torch.Tensor, token_ids: torch.Tensor, tokenizer) -> list[list]:
    """[token, share of firings] of the TOP_TOKENS most frequent tokens among ``fires`` [N] (bool)."""
    fired = token_ids[fires]
    if len(fired) == 0:
        return []
    tokens, counts = fired.unique(return_counts=True)
    top = counts.argsort(descending=True)[:TOP_TOKENS]
    return [[tokenizer.decode([int(tokens[i])]), round(float(counts[i]) / len(fired), 4)] for i in top]


def final_norm_gain(language_model) -> torch.Tensor | None:
    """The final layer norm's gain of a causal LM (GPT-NeoX ``final_layer_norm``, GPT-2 ``ln_f``, Llama ``norm``)."""
    for name in ("final_layer_norm", "ln_f", "norm"):
        norm = getattr(language_model.base_model, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return norm.weight.detach().float().cpu()
    return None


@torch.no_grad()
def logit_effects(model: CrossCoder, features: list[int], snapshot: Snapshot, index: int, tokenizer) -> list[dict]:
    """Per feature, the tokens its decoder direction at snapshot ``index`` most promotes and suppresses through that
    snapshot's unembedding (after the final norm's gain): the direct path from the studied layer to the logits."""
    language_model = load_model(snapshot)
    unembedding = language_model.get_output_embeddings().weight.detach().float().cpu()  # [V, d]
    directions = model.decoder_weight[features, index].detach().float().cpu()  # [K, d]
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gain = final_norm_gain(language_model)
    logits = (directions * gain if gain is not None else directions) @ unembedding.T  # [K, V]

    def listed(values: torch.Tensor, tokens: torch.Tensor) -> list[list]:
        return [[tokenizer.decode([int(token)]), round(float(value), 4)] for value, token in zip(values, tokens)]

    effects = []
    for row in logits:
        high, high_tokens = row.topk(LOGIT_TOKENS)
        low, low_tokens = (-row).topk(LOGIT_TOKENS)
        effects.append({"promoted": listed(high, high_tokens), "suppressed": listed(-low, low_tokens)})
    return effects


def nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 5)


# Over 60 lines on purpose: one page's fields, each from one of the functions above.
def feature_pages(
    model: CrossCoder,
    held_out: torch.Tensor,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    tokenizer,
    snapshots: list[Snapshot],
    steps: list[int],
    features: pd.DataFrame,
    seed: int,
    planted: dict[int, dict] | None = None,
) -> dict:
    """The pages of a trial's chosen features (``chosen_features``): held-out activations [N, S, d] with their
    ``token_ids`` and context ``positions`` [N]; ``features`` is the trial's per-feature table; ``planted`` maps a
    feature to the planted feature it recovers (kind, token ids, cosine), on a planted trajectory."""
    planted = planted or {}
    shown = chosen_features(features, steps, seed, planted)
    if not shown:
        return {"steps": steps, "method": model.config.sparsity, "features": []}
    codes = feature_codes(model, held_out, shown)  # [C, N, K]
    fires = (codes > 0).any(0)  # [N, K]
    decoder = model.decoder_weight[shown].detach().float().cpu()  # [K, S, d]
    norms = decoder.norm(dim=-1)
    cosine_to_last = torch.nn.functional.cosine_similarity(decoder, decoder[:, -1:], dim=-1)
    logit_indices = sorted({0, (len(steps) - 1) // 2, len(steps) - 1})[:LOGIT_SNAPSHOTS]
    logits = {i: logit_effects(model, shown, snapshots[i], i, tokenizer) for i in logit_indices}
    effect_columns = [f"{IE_COLUMN}{step}" for step in steps]
    rows = features.set_index("feature")
    pages = []
    for position, feature in enumerate(shown):
        row = {"feature": feature, **rows.loc[feature].to_dict()}
        contexts = top_contexts(codes[:, :, position], token_ids, positions, tokenizer)
        names = ["all"] if len(codes) == 1 else [str(step) for step in steps]
        pages.append(
            {
                "feature": feature,
                "kind": feature_kind(row, steps[0]),
                "emergence_step": nan_to_none(float(row["emergence_step"])),
                "peak_step": nan_to_none(float(row["peak_step"])),
                "activation_frequency": nan_to_none(float(row["activation_frequency"])),
                "decoder_norms": [round(float(value), 5) for value in norms[position]],
                "cosine_to_last": [round(float(value), 5) for value in cosine_to_last[position]],
                "contexts": contexts["contexts"],
                "top_contexts": {names[index]: top for index, top in contexts["top"].items()},
                "token_entropy": nan_to_none(float(row["token_entropy"])),
                "top_tokens": token_distribution(fires[:, position], token_ids, tokenizer),
                "logit_effects": {str(steps[i]): logits[i][position] for i in logit_indices},
                "indirect_effect": [
                    nan_to_none(float(row[column])) if column in row else None for column in effect_columns
                ],
                "relie": {
                    column[len(RELIE_COLUMN) :]: nan_to_none(float(value))
                    for column, value in row.items()
                    if str(column).startswith(RELIE_COLUMN)
                },
                "planted": planted.get(feature),
            }
        )
    return {"steps": steps, "method": model.config.sparsity, "features": pages}
