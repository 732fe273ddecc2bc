"""Pre-train the embedded trajectory: a small GPT-NeoX on the built-in grammar, saved on Pythia's schedule.

    python -m study.lm.pretrain [--preset default|tiny] [--seed N] [--cache-dir DIR]

The result is a folder of ``step<N>/`` ``save_pretrained`` checkpoints (model and tokenizer), the
corpus as ``corpus.txt`` and a ``manifest.json`` with each checkpoint's losses and agreement score.
A second call with the same configuration returns the cached folder at once.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from study.errors import StudyInputError, run_cli
from study.lm.pretrain_config import MANIFEST, PRESETS, PretrainConfig
from study.paths import build_once, cache_root


def trajectory_folder(config: PretrainConfig, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "trajectories" / f"embedded-{config.cache_key()}"


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def build_embedded_trajectory(
    config: PretrainConfig, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """Return the trajectory's folder, building it first unless a complete one is cached."""

    def build(partial: Path) -> None:
        # Imported here so that reusing a cached trajectory does not pay for importing torch and transformers.
        from study.lm.training import pretrain

        pretrain(config, partial, progress)

    return build_once(trajectory_folder(config, cache_dir), MANIFEST, build)


def folder_size_megabytes(folder: Path) -> float:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) / 1e6


def summary_table(folder: Path) -> str:
    manifest = read_manifest(folder)
    lines = [f"{'step':>6} {'train loss':>10} {'held-out loss':>13} {'agreement acc':>13} {'logit diff':>10}"]
    for record in manifest["checkpoints"]:
        train = "-" if record["train_loss"] is None else f"{record['train_loss']:.3f}"
        lines.append(
            f"{record['step']:>6} {train:>10} {record['eval_loss']:>13.3f} "
            f"{record['agreement_accuracy']:>13.2f} {record['agreement_logit_difference']:>10.2f}"
        )
    lines.append(
        f"built in {manifest['build_seconds']:.0f} s, {manifest['train_tokens_seen'] / 1e6:.1f} M training tokens, "
        f"{folder_size_megabytes(folder):.0f} MB on disk"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m study.lm.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model and schedule size")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument(
        "--cache-dir", help="cache folder (default: $CROSSCODER_STUDY_CACHE or ~/.cache/crosscoder-study)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    if args.seed is not None:
        if args.seed < 0:
            raise StudyInputError(f"--seed must be a non-negative integer, got {args.seed}")
        config = replace(config, seed=args.seed)
    started = time.perf_counter()
    folder = build_embedded_trajectory(config, args.cache_dir, progress=not args.quiet)
    print(f"trajectory: {folder}  (ready in {time.perf_counter() - started:.1f} s)")
    print(summary_table(folder))


if __name__ == "__main__":
    run_cli(main)
