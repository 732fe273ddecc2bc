"""The planted trajectory: GPT-NeoX checkpoints built by hand, whose features and their history are known.

Every block's output projections are zero, so the residual stream at every layer is the token's
embedding, and the embedding of token v at snapshot s is written from a planted dictionary:

    embedding_s[v] = sum_f coefficient[f, v] * planted_decoder[f, s]

``planted_decoder[f, s]`` is feature f's direction at snapshot s scaled by its magnitude there (zero
where the feature is absent). What a perfect crosscoder would read is therefore known, and written
beside the checkpoints as ``truth.json``: per feature its kind, tokens, present-from and gone-at
steps, emergence and peak step (read from the planted decoder norms exactly as the trial reads its
own); the dictionary's total dimensionality per snapshot and its turning step; the step where
statistical learning ends.

What is planted (see ``PlantedConfig``):

* shared features, each on a share of the vocabulary; a share of them is present from step 0, the
  others appear at chosen steps; their directions collapse onto a few group directions up to the
  turning step and then spread into new directions of their own, so that the total feature
  dimensionality falls to its minimum at the turning step and rises after it;
* token-specific features, each alone on one frequent token, strongest at step 0, fading and gone at
  a chosen step (paper 1's early token-level features);
* a unigram phase: the final layer norm's gain is zero, so the logits do not read the residual stream;
  they are alpha_s * log p_unigram with alpha rising to 1 at ``statistical_end``, where the model's
  unigram KL reaches its floor.

Over 300 lines on purpose: the planted dictionary, the model that writes it and its truth must agree, so they sit together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as transformers_logging
from transformers.utils.logging import disable_progress_bar

from crosscoder.evolution import EMERGENCE_FRACTION, feature_dimensionality, turning_point
from study.errors import StudyInputError, run_cli
from study.lm.corpus import generate_documents
from study.lm.planted_task import TaskKind, add_sparse_task, dense_readout, sparse_readout, task_plan, task_truth
from study.lm.planted_truth import expected_verdicts
from study.lm.tokenizer import train_tokenizer
from study.paths import build_once, cache_root
from study.record import METRIC

TRUTH = "truth.json"
"""The planted trajectory's answers, written last by a build."""
PLANTED_DECODER = "planted_decoder.pt"
"""The planted dictionary [features, snapshots, d_model], in the units a crosscoder's decoder has."""
PLANTED_VERSION = "planted-v4"
"""Part of the cache key: raise it when the construction changes."""
TASK_LOGIT_SCALE = 4.0
"""How strongly the answers' logits read the task direction (after the final layer norm): a few nats."""


@dataclass(frozen=True)
class PlantedConfig:
    """What the planted trajectory plants, and where."""

    seed: int = 0
    """Seed of the corpus sample, the tokenizer, directions, token sets and coefficients."""
    steps: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    """Snapshot steps, dense early like Pythia's schedule."""
    hidden_size: int = 32
    """Residual-stream width."""
    n_layers: int = 2
    """Blocks; they add nothing, so every layer holds the embedding."""
    vocab_size: int = 1280
    """BPE vocabulary trained on the grammar, as the embedded model's."""
    tokenizer_documents: int = 3000
    """Grammar documents the tokenizer and the token frequencies are drawn from."""
    n_shared: int = 48
    """Features shared by many tokens."""
    appearing_share: float = 0.5
    """Share of the shared features absent at step 0, appearing at one of ``appear_steps``. Every token but
    the token-specific ones carries one shared feature present from step 0 and one appearing one."""
    appear_steps: tuple[int, ...] = (64, 128, 256)
    """Steps at which the appearing features appear, in turn."""
    n_specific: int = 16
    """Token-specific features, each the only feature of one frequent token."""
    specific_from_rank: int = 16
    """Frequency rank of the first token-specific token. Not the top ranks: they carry much of the residual
    stream's norm, and a feature vanishing from them would, under the crosscoder's per-snapshot
    normalisation, rescale every other feature."""
    specific_gone_at: int | None = 64
    """First step at which the token-specific features are gone; None: they never fade, growing as the shared
    ones do (no feature's share of the dictionary shrinks, so nothing fakes a dip in its dimensionality)."""
    n_groups: int = 8
    """Group directions the shared features collapse onto."""
    collapse_from: int = 8
    """Last step at which the shared features still have their own early directions."""
    turning_step: int | None = 128
    """Step of full collapse, after which the shared features spread into new directions; None: they never
    collapse and keep their directions (no turning point)."""
    statistical_end: int = 32
    """Step from which the logits are the corpus's unigram distribution."""
    coefficient_range: tuple[float, float] = field(default=(0.5, 1.5))
    """A feature's coefficient on each of its tokens is drawn uniformly from this range."""
    task: TaskKind = "none"
    """A task the logits read (``study.lm.planted_task``): none, sparse (a few planted features carry it) or dense
    (a mixture of every shared feature does)."""
    task_onset: int = 128
    """Step from which the logits read the task (it is learned there)."""
    task_features: int = 4
    """Features carrying a sparse task, half for each answer."""
    task_tokens: int = 32
    """Class tokens the task's prompts end with."""

    def __post_init__(self) -> None:
        steps = list(self.steps)
        if steps != sorted(set(steps)) or len(steps) < 4 or steps[0] != 0:
            raise StudyInputError(f"planted steps must rise strictly from 0, at least 4 of them; got {steps}")
        named = {"turning_step": self.turning_step, "statistical_end": self.statistical_end}
        named |= {"specific_gone_at": self.specific_gone_at, "collapse_from": self.collapse_from}
        for name, step in named.items():
            if step is not None and step not in steps[1:-1]:
                raise StudyInputError(f"planted {name} {step} must be an inner step of {steps}")
        if self.turning_step is not None and not self.collapse_from < self.turning_step:
            raise StudyInputError("planted collapse_from must come before turning_step")
        gone, turn = self.specific_gone_at, self.turning_step
        if gone is not None and turn is not None and gone > turn:
            # Fading features lower the dictionary's dimensionality too: the dip would last past the turn.
            raise StudyInputError("planted specific_gone_at must come at or before turning_step")
        if self.specific_from_rank < 0 or min(self.n_shared, self.n_specific) < 0:
            raise StudyInputError("planted specific_from_rank, n_shared and n_specific must be >= 0")
        if self.task != "none" and (
            self.task_onset not in steps[1:] or self.task_features < 2 or self.task_features % 2
        ):
            raise StudyInputError(
                "a planted task needs task_onset among the steps after 0 and an even task_features >= 2"
            )
        if any(step not in steps[1:] for step in self.appear_steps):
            raise StudyInputError(f"planted appear_steps {self.appear_steps} must be steps of {steps} after 0")

    def cache_key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + PLANTED_VERSION
        return hashlib.sha256(text.encode()).hexdigest()[:12]


LOG_STEPS_32 = (
    0,
    1,
    2,
    3,
    4,
    6,
    8,
    11,
    16,
    22,
    32,
    45,
    64,
    90,
    128,
    180,
    256,
    300,
    362,
    430,
    512,
    560,
    610,
    660,
    710,
    760,
    810,
    860,
    900,
    940,
    970,
    1000,
)
"""32 snapshot steps, dense early, for the snapshot-count case."""
PRESETS = {
    "default": PlantedConfig(),
    "no_turn": PlantedConfig(turning_step=None, specific_gone_at=None),
    "late_emergence": PlantedConfig(appear_steps=(512, 1000)),
    "mostly_emergent": PlantedConfig(appearing_share=0.85),
    "mostly_initial": PlantedConfig(appearing_share=0.1),
    "turn_32": PlantedConfig(
        turning_step=32, collapse_from=4, specific_gone_at=32, statistical_end=16, appear_steps=(16, 32, 64)
    ),
    "turn_512": PlantedConfig(turning_step=512, collapse_from=32, appear_steps=(256, 512, 1000)),
    "steps_4": PlantedConfig(
        steps=(0, 16, 128, 1000), collapse_from=16, statistical_end=16, specific_gone_at=16, appear_steps=(128,)
    ),
    "steps_32": PlantedConfig(steps=LOG_STEPS_32),
    "task": PlantedConfig(task="sparse", task_onset=256, task_tokens=64, task_features=2),
    "task_dense": PlantedConfig(task="dense", task_onset=256, task_tokens=128, n_shared=96),
}
"""Named planted cases (``--trajectory planted:NAME``), each with its truth per claim in its truth.json: the
default layout; no turning point; features emerging well after the turn; other initialization-dependent
shares; other turning steps; 4 and 32 snapshots."""


def positions(steps: tuple[int, ...]) -> torch.Tensor:
    """Where each step lies on a log(step + 1) axis, from 0 at the first to 1 at the last."""
    logs = torch.tensor([math.log1p(step) for step in steps], dtype=torch.float64)
    return logs / logs[-1]


def ramp(position: torch.Tensor, start: float, end: float) -> torch.Tensor:
    """0 up to ``start``, 1 from ``end``, linear between."""
    return ((position - start) / (end - start)).clamp(0, 1)


def unit_vectors(count: int, dimension: int, generator: torch.Generator) -> torch.Tensor:
    vectors = torch.randn(count, dimension, generator=generator, dtype=torch.float64)
    return vectors / vectors.norm(dim=-1, keepdim=True)


def token_coefficients(
    config: PlantedConfig, frequency: torch.Tensor, appearing: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """[features, vocab] each feature's coefficient on each token (zero where it is not planted).

    Each token-specific feature alone on one frequent token (a shared feature beside it would be
    absorbed: one feature for the token's whole embedding is sparser than two, so no sparse dictionary
    could recover the pair). Every other token one feature of each pool (present from step 0;
    ``appearing``), the one with the least frequency mass so far (a token's mass capped at the pool's
    size-th largest), so every shared feature fires on many tokens, about equally often. Each pool walks
    the tokens in its own random order: its features' token sets are then independent of the other
    pool's, and no pair of features always fires together. A token thus never loses its whole embedding
    when features appear, so the crosscoder's per-snapshot normalisation barely rescales the features
    already there.
    """
    is_appearing = torch.zeros(config.n_shared, dtype=torch.bool)
    is_appearing[appearing] = True
    pools = [pool for pool in (is_appearing.logical_not().nonzero().squeeze(1), appearing) if len(pool)]
    coefficients = torch.zeros(config.n_shared + config.n_specific, len(frequency), dtype=torch.float64)
    by_frequency = frequency.argsort(descending=True)[: int((frequency > 0).sum())]
    first_specific = config.specific_from_rank
    specific_tokens = by_frequency[first_specific : first_specific + config.n_specific]
    shared_tokens = torch.cat([by_frequency[:first_specific], by_frequency[first_specific + config.n_specific :]])
    for pool in pools:
        cap = float(frequency[shared_tokens[min(len(pool), len(shared_tokens)) - 1]])
        mass = torch.zeros(len(pool), dtype=torch.float64)
        order = shared_tokens[torch.randperm(len(shared_tokens), generator=generator)]
        for token in order.tolist():
            chosen = int(mass.argmin())
            coefficients[pool[chosen], token] = 1.0
            mass[chosen] += min(float(frequency[token]), cap)
    for offset, token in enumerate(specific_tokens.tolist()):
        coefficients[config.n_shared + offset, token] = 1.0
    low, high = config.coefficient_range
    drawn = low + (high - low) * torch.rand(coefficients.shape, generator=generator, dtype=torch.float64)
    return coefficients * drawn


def magnitudes(config: PlantedConfig, appearing: torch.Tensor) -> torch.Tensor:
    """[features, snapshots]: shared features grow slowly (so they peak late), appearing ones are zero
    before their step; token-specific ones are strongest at step 0 and fade out."""
    at, step_index = positions(config.steps), {step: index for index, step in enumerate(config.steps)}
    magnitude = torch.zeros(config.n_shared + config.n_specific, len(at), dtype=torch.float64)
    magnitude[: config.n_shared] = 0.6 + 0.4 * at
    for order, feature in enumerate(appearing.tolist()):
        magnitude[feature, : step_index[config.appear_steps[order % len(config.appear_steps)]]] = 0.0
    if config.specific_gone_at is None:
        magnitude[config.n_shared :] = 0.6 + 0.4 * at
        return magnitude
    gone = step_index[config.specific_gone_at]
    fading = 1.0 - 0.5 * at / max(float(at[gone - 1]), 1e-9)  # gone at the second step: present at 0 only
    magnitude[config.n_shared :, :gone] = fading[:gone]
    return magnitude


def planted_directions(config: PlantedConfig, generator: torch.Generator) -> torch.Tensor:
    """[features, snapshots, d] unit directions: shared features move from their own early direction onto
    their group's, fully at the turning step, then out to a new direction of their own; token-specific
    ones stay put."""
    n_features, d = config.n_shared + config.n_specific, config.hidden_size
    at, step_index = positions(config.steps), {step: index for index, step in enumerate(config.steps)}
    early, late = unit_vectors(n_features, d, generator), unit_vectors(n_features, d, generator)
    groups = unit_vectors(config.n_groups, d, generator)
    if config.turning_step is None:
        return early[:, None].expand(-1, len(at), -1).clone()
    group_of = torch.arange(n_features) % config.n_groups
    collapse_at, turn_at = float(at[step_index[config.collapse_from]]), float(at[step_index[config.turning_step]])
    collapsing = ramp(at, collapse_at, turn_at) - ramp(at, turn_at, 1.0)  # 0 .. 1 at the turn .. 0
    own = torch.where((at > turn_at)[None, :, None], late[:, None], early[:, None])
    mixed = (1 - collapsing)[None, :, None] * own + collapsing[None, :, None] * groups[group_of][:, None]
    directions = mixed / mixed.norm(dim=-1, keepdim=True)
    directions[config.n_shared :] = early[config.n_shared :, None]
    return directions


class PlantedDictionary:
    """The planted features of ``config`` over the tokens whose ``frequency`` [vocab] is positive."""

    def __init__(self, config: PlantedConfig, frequency: torch.Tensor):
        self.config = config
        self.kinds = ["shared"] * config.n_shared + ["specific"] * config.n_specific
        generator = torch.Generator().manual_seed(config.seed)
        # Shared features come in two pools: present from step 0, and appearing at one of appear_steps.
        appearing = torch.randperm(config.n_shared, generator=generator)[
            : round(config.appearing_share * config.n_shared)
        ]
        self.coefficients = token_coefficients(config, frequency, appearing, generator)
        decoder = magnitudes(config, appearing)[:, :, None] * planted_directions(config, generator)
        self.task_features: list[int] = []
        if config.task == "sparse":
            self.coefficients, decoder, self.task_features = add_sparse_task(
                self.coefficients,
                decoder,
                frequency,
                config.steps,
                config.task_onset,
                config.task_features,
                config.task_tokens,
                generator,
            )
            self.kinds = self.kinds + ["task"] * len(self.task_features)
        # Each snapshot scaled to the same frequency-weighted mean norm, so that the crosscoder's
        # per-snapshot normalisation leaves the planted magnitudes as they are.
        weights = frequency.double() / frequency.sum()
        norms = torch.stack(
            [(self.coefficients.T @ decoder[:, s]).norm(dim=-1) @ weights for s in range(len(config.steps))]
        )
        self.decoder = decoder * (norms[0] / norms)[None, :, None]
        self.readouts = [self.readout(index) for index in range(len(config.steps))]
        self.plan = (
            task_plan(
                config.task,
                self.coefficients,
                self.decoder,
                frequency,
                self.readouts[-1],
                self.task_features,
                config.task_tokens,
            )
            if config.task != "none"
            else None
        )

    def readout(self, snapshot: int) -> torch.Tensor:
        """[d] the direction the task's logit difference reads at ``snapshot`` (zero before the onset or with no task)."""
        config = self.config
        if config.task == "none" or config.steps[snapshot] < config.task_onset:
            return torch.zeros(config.hidden_size, dtype=torch.float64)
        if config.task == "sparse":
            return sparse_readout(config.hidden_size, config.task_features)
        return dense_readout(self.decoder, config.n_shared, snapshot, config.seed)

    def embeddings(self, snapshot: int) -> torch.Tensor:
        """[vocab, d] the embedding matrix at snapshot index ``snapshot``."""
        return self.coefficients.T @ self.decoder[:, snapshot]

    def truth(self) -> dict:
        """Per feature and for the whole dictionary, what a crosscoder that recovered it would read."""
        steps = list(self.config.steps)
        norms = self.decoder.norm(dim=-1)  # [F, S]
        present = norms > 0
        reached = norms >= EMERGENCE_FRACTION * norms.max(1, keepdim=True).values
        dimensionality = feature_dimensionality(self.decoder.float()).sum(0)
        features = []
        for feature, kind in enumerate(self.kinds):
            present_at = present[feature].nonzero().squeeze(1).tolist()
            gone = [s for s in range(present_at[0], len(steps)) if not present[feature, s]]
            features.append(
                {
                    "feature": feature,
                    "kind": kind,
                    "tokens": self.coefficients[feature].nonzero().squeeze(1).tolist(),
                    "present_from": steps[present_at[0]],
                    "gone_at": steps[gone[0]] if gone else None,
                    "emergence_step": steps[int(reached[feature].float().argmax())],
                    "peak_step": steps[int(norms[feature].argmax())],
                }
            )
        emergence_steps = torch.tensor([f["emergence_step"] for f in features], dtype=torch.float64)
        later = emergence_steps[emergence_steps > 0]
        truth = {
            "config": asdict(self.config),
            "steps": steps,
            "turning_step": turning_point(dimensionality, steps).step,
            "statistical_end": self.config.statistical_end,
            METRIC.initial_share: float((emergence_steps == 0).double().mean()),
            METRIC.median_emergence_step: float(later.median()) if len(later) else None,
            "dimensionality_by_step": dimensionality.tolist(),
            "features": features,
        }
        if self.plan is not None:
            truth["task"] = {
                "kind": self.config.task,
                "onset": self.config.task_onset,
                **task_truth(self.plan, self.coefficients, self.decoder, self.readouts[-1]),
            }
        truth["claims"] = expected_verdicts(truth)
        return truth


def token_frequency(tokenizer, documents: list[str]) -> torch.Tensor:
    ids = [token for document in documents for token in tokenizer(document)["input_ids"]]
    return torch.bincount(torch.tensor(ids), minlength=len(tokenizer))


@torch.no_grad()
def silence_blocks(model: GPTNeoXForCausalLM) -> None:
    """Zero every block's attention and MLP output projections: the residual stream at every layer is then
    the token's embedding, whatever the rest of the weights."""
    blocks: Any = model.base_model.layers  # transformers types its submodules as Tensor | Module
    for layer in blocks:
        for projection in (layer.attention.dense, layer.mlp.dense_4h_to_h):
            projection.weight.zero_()
            projection.bias.zero_()


def planted_model(
    config: PlantedConfig,
    embeddings: torch.Tensor,
    log_unigram: torch.Tensor,
    unigram_weight: float,
    readout: torch.Tensor | None = None,
    answers: tuple[int, int] | None = None,
) -> GPTNeoXForCausalLM:
    """A GPT-NeoX whose residual stream is ``embeddings`` at every layer and whose logits are
    ``unigram_weight * log_unigram`` whatever the input, but for the two ``answers`` of a planted task, whose
    logits also read the residual along ``readout`` (``+`` for the first, ``-`` for the second)."""
    vocab, d = embeddings.shape
    neox = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=config.n_layers,
        num_attention_heads=2,
        intermediate_size=2 * d,
        max_position_embeddings=256,
    )
    torch.manual_seed(config.seed)  # the unused weights (attention, MLP inputs) are drawn, seeded
    model = GPTNeoXForCausalLM(neox)
    silence_blocks(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embeddings)  # type: ignore[operator]
        final_norm: Any = model.base_model.final_layer_norm  # typed as Tensor | Module by transformers
        final_norm.weight.zero_()
        final_norm.bias.zero_()
        final_norm.bias[0] = unigram_weight
        unembedding: Any = model.get_output_embeddings().weight
        unembedding.zero_()
        unembedding[:, 0] = log_unigram
        if readout is not None and answers is not None and bool(readout.any()):
            final_norm.weight[1:] = 1.0  # only the answers' rows read dimensions 1 onwards
            unembedding[answers[0], 1:] = TASK_LOGIT_SCALE * readout[1:]
            unembedding[answers[1], 1:] = -TASK_LOGIT_SCALE * readout[1:]
    return model


def build_planted(config: PlantedConfig, out: Path) -> None:
    """Write ``step<N>/`` checkpoints (model and tokenizer) and ``truth.json`` into ``out``."""
    transformers_logging.set_verbosity_error()
    disable_progress_bar()  # one bar per checkpoint written
    out.mkdir(parents=True)
    documents = generate_documents(config.tokenizer_documents, config.seed)
    tokenizer = train_tokenizer(documents, config.vocab_size)
    frequency = token_frequency(tokenizer, documents)
    dictionary = PlantedDictionary(config, frequency)
    unigram = (frequency.double() + 0.01) / (frequency.sum() + 0.01 * len(frequency))
    log_unigram = unigram.log() - unigram.log().mean()
    unigram_weights = ramp(
        positions(config.steps), 0.0, float(positions(config.steps)[config.steps.index(config.statistical_end)])
    )
    for index, step in enumerate(config.steps):
        model = planted_model(
            config,
            dictionary.embeddings(index).float(),
            log_unigram.float(),
            float(unigram_weights[index]),
            dictionary.readouts[index].float(),
            dictionary.plan.answers if dictionary.plan is not None else None,
        )
        model.save_pretrained(out / f"step{step}")
        tokenizer.save_pretrained(out / f"step{step}")
    truth = dictionary.truth()
    if truth["turning_step"] != config.turning_step:
        raise StudyInputError(
            f"the planted dictionary turns at step {truth['turning_step']}, not at the configured turning_step "
            f"{config.turning_step}; move specific_gone_at or appear_steps away from the turn"
        )
    torch.save(dictionary.decoder.float(), out / PLANTED_DECODER)
    (out / TRUTH).write_text(json.dumps(truth, indent=1))


def planted_folder(config: PlantedConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """The planted trajectory's folder, built first unless a complete one is cached."""
    config = config or PlantedConfig()
    folder = cache_root(cache_dir) / "trajectories" / f"planted-{config.cache_key()}"
    return build_once(folder, TRUTH, lambda partial: build_planted(config, partial))


def read_truth(folder: str | Path) -> dict:
    return json.loads((Path(folder) / TRUTH).read_text())


def planted_truth_of(snapshots: list) -> Path | None:
    """The planted trajectory folder that ``snapshots`` (``Snapshot``s) are taken from, each at its own
    step; None for any other trajectory, a null twin of a planted one included (its truth is not this)."""
    folders = {Path(snapshot.source).parent for snapshot in snapshots}
    if len(folders) != 1 or any(Path(snapshot.source).name != f"step{snapshot.step}" for snapshot in snapshots):
        return None
    folder = folders.pop()
    return folder if (folder / TRUTH).is_file() and (folder / PLANTED_DECODER).is_file() else None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (lists for the step tuples), checked against PlantedConfig."""
    key, separator, value = text.partition("=")
    names = [name for name in PlantedConfig.__dataclass_fields__]
    if not separator or key not in names:
        raise StudyInputError(f"--set takes key=value with a key of {', '.join(names)}; got '{text}'")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise StudyInputError(f"--set {key}: '{value}' is not a JSON value, e.g. 64 or [128, 256]") from None
    return key, tuple(parsed) if isinstance(parsed, list) else parsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m study.lm.planted",
        description="Build a planted trajectory (known answers) and print where it is and what it plants.",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a PlantedConfig field")
    parser.add_argument(
        "--cache-dir", help="cache folder (default: $CROSSCODER_STUDY_CACHE or ~/.cache/crosscoder-study)"
    )
    args = parser.parse_args(argv)
    config = PlantedConfig(**dict(parse_override(text) for text in args.set))
    folder = planted_folder(config, args.cache_dir)
    truth = read_truth(folder)
    print(f"trajectory: {folder}  (pass it as --trajectory; the default one is also --trajectory planted)")
    print(
        f"turning step {truth['turning_step']}, statistical learning ends at {truth['statistical_end']}, "
        f"initialization-dependent share {truth['initial_share']:.3f}, median emergence step "
        f"{truth['median_emergence_step']}, {len(truth['features'])} features"
    )


if __name__ == "__main__":
    run_cli(main)
