"""Trajectories: the ordered snapshots of one pre-training run, from the hub, a folder, or the embedded model.

Every snapshot is loaded by the same call, ``from_pretrained(source, revision=...)``: a hub id with
a revision such as ``step1000`` (Pythia), or a ``save_pretrained`` folder with no revision.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.constants import HF_HUB_CACHE
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.logging import disable_progress_bar

from study.errors import StudyInputError
from study.lm.pretrain_config import PretrainConfig

STEP_NAME = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class Snapshot:
    """One checkpoint: its training step and where ``from_pretrained`` finds it."""

    step: int
    """Optimizer step at which the checkpoint was saved."""
    source: str
    """Hub model id, or a local ``save_pretrained`` folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None for a local folder."""

    def __str__(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else self.source


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
"""Files of a checkpoint folder whose contents define what it computes (weights, configuration, tokenizer)."""


def snapshot_fingerprint(snapshot: Snapshot) -> str:
    """What a snapshot holds, cheaply: for a local folder, the name, size and modification time of each
    weight and configuration file (no file is read, so a re-written checkpoint changes it at the cost of a
    stat per file); for a hub revision, the commit it resolves to in the local hub cache, else the revision."""
    folder = Path(snapshot.source).expanduser()
    if folder.is_dir():
        files = sorted(path for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES)
        listing = "\n".join(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files)
        return hashlib.sha256(listing.encode()).hexdigest()[:16]
    ref = (
        Path(HF_HUB_CACHE) / ("models--" + snapshot.source.replace("/", "--")) / "refs" / (snapshot.revision or "main")
    )
    return ref.read_text().strip() if ref.is_file() else str(snapshot.revision)


@dataclass(frozen=True)
class Trajectory:
    """Snapshots of one run, ordered by step."""

    name: str
    """Model id, folder, or ``embedded-<key>``; identifies the trajectory in caches and MLflow."""
    snapshots: tuple[Snapshot, ...]
    """Ordered by increasing step."""

    @property
    def steps(self) -> list[int]:
        return [snapshot.step for snapshot in self.snapshots]

    def snapshot(self, step: int) -> Snapshot:
        for snapshot in self.snapshots:
            if snapshot.step == step:
                return snapshot
        raise StudyInputError(f"trajectory {self.name} has no step {step}; its steps are {self.steps}")

    def select(self, count: int, placement: str) -> Trajectory:
        """``count`` snapshots, always the first and the last: ``log`` spaced evenly in log(step + 1)
        (dense early, like Pythia's schedule) or ``uniform`` evenly in steps; each target takes the
        nearest snapshot not yet taken."""
        if count > len(self.snapshots):
            raise StudyInputError(
                f"n_snapshots {count} exceeds the {len(self.snapshots)} snapshots of {self.name}; choose at most that"
            )
        position = (lambda step: math.log1p(step)) if placement == "log" else float
        first, last = position(self.steps[0]), position(self.steps[-1])
        remaining = list(range(len(self.snapshots)))
        chosen = []
        for index in range(count):
            target = first + (last - first) * index / (count - 1)
            nearest = min(remaining, key=lambda i: abs(position(self.steps[i]) - target))
            remaining.remove(nearest)
            chosen.append(nearest)
        return Trajectory(self.name, tuple(self.snapshots[i] for i in sorted(chosen)))

    def check(self) -> None:
        """Read every snapshot's config, so that a missing one fails before any heavy work."""
        for snapshot in self.snapshots:
            with explained_load_errors(snapshot):
                AutoConfig.from_pretrained(snapshot.source, revision=snapshot.revision)

    def check_files(self) -> None:
        """Every local snapshot's weight files whole, by their headers and sizes (nothing loaded): a checkpoint cut
        short or overwritten names its file here, before Ray starts, not as a failed extraction block."""
        for snapshot in self.snapshots:
            folder = Path(snapshot.source).expanduser()
            if not folder.is_dir():
                continue  # a hub revision: the hub's own download checks it
            for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
                reason = damaged_weight_file(path)
                if reason is not None:
                    raise StudyInputError(
                        f"checkpoint {path} is damaged: {reason}; restore it (or save the step again with "
                        "save_pretrained), or move its step<N>/ folder out of the trajectory"
                    )


def damaged_weight_file(path: Path) -> str | None:
    """Why a weight file cannot be whole, or None: a safetensors file must be exactly its 8-byte header length,
    its JSON header and the data the header's offsets reach; a PyTorch .bin a zip archive."""
    size = path.stat().st_size
    if path.suffix == ".bin":
        return None if zipfile.is_zipfile(path) else f"{size:,} bytes that are not a PyTorch zip archive"
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= length <= size - 8:
            return f"{size:,} bytes, too short for the header it announces"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its header is not JSON"
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    needed = 8 + length + end
    return None if size == needed else f"{size:,} bytes where its header needs {needed:,} (cut short?)"


def pythia_revisions() -> list[str]:
    """Pythia's 154 checkpoint names: step0, the powers of two to 512, then every 1000 to 143000."""
    steps = [0] + [2**power for power in range(10)] + list(range(1000, 143_001, 1000))
    return [f"step{step}" for step in steps]


def step_of(name: str) -> int:
    match = STEP_NAME.match(name)
    if not match:
        raise StudyInputError(f"cannot read a step from '{name}'; name revisions and folders step<N>, e.g. step1000")
    return int(match.group(1))


def hub_trajectory(model_id: str, revisions: list[str] | None = None) -> Trajectory:
    """Snapshots ``model_id@revision``; revisions default to Pythia's ``step0 ... step143000``."""
    revisions = revisions or pythia_revisions()
    snapshots = sorted(
        (Snapshot(step_of(revision), model_id, revision) for revision in revisions), key=lambda s: s.step
    )
    return Trajectory(model_id, tuple(snapshots))


def directory_trajectory(path: str | Path, name: str | None = None) -> Trajectory:
    """Snapshots from the ``step<N>/`` sub-folders of ``path``, each a ``save_pretrained`` folder."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise StudyInputError(f"{path} is not a directory; pass a folder holding step<N>/ checkpoint folders")
    named = [(child, STEP_NAME.match(child.name)) for child in path.iterdir() if child.is_dir()]
    snapshots = [
        Snapshot(int(match.group(1)), str(child))
        for child, match in named
        if match is not None and (child / "config.json").is_file()
    ]
    if not snapshots:
        raise StudyInputError(
            f"{path} holds no checkpoints; expected sub-folders step<N>/ written by save_pretrained (with config.json)"
        )
    return Trajectory(name or str(path), tuple(sorted(snapshots, key=lambda s: s.step)))


def embedded_trajectory(config: PretrainConfig | None = None, cache_dir: str | Path | None = None) -> Trajectory:
    """The project's own pre-trained GPT-NeoX, built into the cache on first use."""
    from study.lm.pretrain import build_embedded_trajectory  # pretraining is only imported when needed

    config = config or PretrainConfig()
    folder = build_embedded_trajectory(config, cache_dir)
    return directory_trajectory(folder, name=f"embedded-{config.cache_key()}")


NULL_TWINS = ("frozen", "shuffled", "reversed")
"""Controls for the order claims, ``frozen:SPEC``, ``shuffled:SPEC`` and ``reversed:SPEC``: SPEC's step names
over checkpoints whose order means nothing, or runs backwards (a model un-learning)."""


def null_twin(trajectory: Trajectory, kind: str, seed: int = 0) -> Trajectory:
    """``frozen``: the last checkpoint under every step name (nothing evolves); ``shuffled``: each step
    name over another step's checkpoint, a seeded permutation with no step left in place; ``reversed``: the
    first step name over the last checkpoint and so on (time runs backwards)."""
    snapshots = trajectory.snapshots
    if kind == "frozen":
        sources = [snapshots[-1]] * len(snapshots)
    elif kind == "reversed":
        sources = list(reversed(snapshots))
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(snapshots), generator=generator)
        while len(snapshots) > 1 and (order == torch.arange(len(snapshots))).any():
            order = torch.randperm(len(snapshots), generator=generator)
        sources = [snapshots[index] for index in order.tolist()]
    twins = tuple(
        Snapshot(snapshot.step, source.source, source.revision) for snapshot, source in zip(snapshots, sources)
    )
    return Trajectory(f"{kind}:{trajectory.name}", twins)


def resolve_trajectory(
    spec: str, revisions: list[str] | None = None, cache_dir: str | Path | None = None
) -> Trajectory:
    """``embedded``, ``planted`` (known answers, see ``study.lm.planted``), a local folder of ``step<N>/``
    checkpoints, a hub model id (with revisions), a named planted case (``planted:NAME``, ``study.lm.planted
    .PRESETS``), or a null twin of one of those (``frozen:SPEC``, ``shuffled:SPEC``, ``reversed:SPEC``)."""
    kind, separator, rest = spec.partition(":")
    if separator and kind in NULL_TWINS:
        return null_twin(resolve_trajectory(rest, revisions, cache_dir), kind)
    if separator and kind == "planted":
        from study.lm.planted import PRESETS, planted_folder  # built only when asked for

        if rest not in PRESETS:
            raise StudyInputError(f"no planted case '{rest}'; choose one of {', '.join(PRESETS)}")
        return directory_trajectory(planted_folder(PRESETS[rest], cache_dir), name=f"planted-{rest}")
    local = spec in ("embedded", "planted") or kind == "planted" or Path(spec).expanduser().exists()
    if revisions and local:
        raise StudyInputError(
            f"revisions name hub commits, but trajectory '{spec}' is local; drop --revisions and choose its "
            "snapshots with n_snapshots and snapshot_placement"
        )
    if spec == "embedded":
        return embedded_trajectory(cache_dir=cache_dir)
    if spec == "planted":
        from study.lm.planted import PlantedConfig, planted_folder  # built only when asked for

        return directory_trajectory(planted_folder(cache_dir=cache_dir), name=f"planted-{PlantedConfig().cache_key()}")
    if Path(spec).expanduser().exists():
        return directory_trajectory(spec)
    return hub_trajectory(spec, revisions)


@contextmanager
def explained_load_errors(snapshot: Snapshot) -> Iterator[None]:
    """Turn the hub's and transformers' loading errors into one line that says what to check."""
    try:
        yield
    except (OSError, ValueError, HfHubHTTPError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StudyInputError(
            f"cannot load snapshot {snapshot}: {reason} -- check the model id and revision (hub revisions look like "
            "step1000; offline, the hub cache must hold them), or use a local folder or 'embedded'"
        ) from None


# A trial visits every snapshot four times (spliced loss: capture, then splice; causal statistics:
# task activations, then attribution). The models loaded last stay in memory up to this many bytes of
# weights, so that on the embedded trajectory each is loaded once per process; a Pythia-160M
# snapshot (650 MB) fills it three times over, so at that size the cache only spares adjacent reloads.
LOADED_MODELS_BYTES = 2 * 2**30
_loaded_models: OrderedDict[tuple, PreTrainedModel] = OrderedDict()


def load_model(
    snapshot: Snapshot, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """The snapshot's causal LM in eval mode, on ``device``. The object is shared with later calls for
    the same snapshot: callers may add hooks (and remove them) but must not change its weights."""
    key = (snapshot.source, snapshot.revision, snapshot_fingerprint(snapshot), dtype, str(device))
    if key in _loaded_models:
        _loaded_models.move_to_end(key)
        return _loaded_models[key]
    disable_progress_bar()  # one bar per snapshot load would bury the sweep's own lines
    with explained_load_errors(snapshot):
        model = AutoModelForCausalLM.from_pretrained(snapshot.source, revision=snapshot.revision, dtype=dtype)
    _loaded_models[key] = model.eval().to(device)
    while len(_loaded_models) > 1 and sum(map(weight_bytes, _loaded_models.values())) > LOADED_MODELS_BYTES:
        _loaded_models.popitem(last=False)
    return _loaded_models[key]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def load_tokenizer(snapshot: Snapshot) -> PreTrainedTokenizerBase:
    """The tokenizer stored with the snapshot (Pythia ships one per revision, as the embedded model does)."""
    with explained_load_errors(snapshot):
        return AutoTokenizer.from_pretrained(snapshot.source, revision=snapshot.revision)
