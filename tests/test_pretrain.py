"""The embedded trajectory: Pythia's schedule, determinism, caching, and a build that fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from safetensors.torch import load_file

from study.errors import StudyInputError
from study.lm.pretrain import build_embedded_trajectory, trajectory_folder
from study.lm.pretrain_config import TINY, PretrainConfig


def weights(folder, step):
    return load_file(folder / f"step{step}" / "model.safetensors")


def test_default_schedule_is_pythia_log_spaced_then_even():
    steps = PretrainConfig().checkpoint_steps()
    assert steps[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert steps[11:] == [750, 1000, 1250, 1500, 1750, 2000]


def test_same_seed_same_weights_other_seed_other_weights(tiny_trajectory_folder, tmp_path):
    again = build_embedded_trajectory(TINY, tmp_path / "again", progress=False)
    other_seed = build_embedded_trajectory(replace(TINY, seed=1), tmp_path / "other", progress=False)
    for step in TINY.checkpoint_steps():
        first, second = weights(tiny_trajectory_folder, step), weights(again, step)
        assert first.keys() == second.keys()
        assert all((first[name] == second[name]).all() for name in first), f"step {step} differs between two builds"
    # The vocabulary itself can differ with the seed, so compare a block's weights, whose shape cannot.
    block = "gpt_neox.layers.0.attention.query_key_value.weight"
    last = TINY.total_steps
    assert not (weights(tiny_trajectory_folder, last)[block] == weights(other_seed, last)[block]).all()


def test_training_moves_past_initialisation(tiny_trajectory_folder):
    records = json.loads((tiny_trajectory_folder / "manifest.json").read_text())["checkpoints"]
    assert [record["step"] for record in records] == TINY.checkpoint_steps()
    # A uniform guess over the tiny corpus's ~1090-token vocabulary costs about 7.0 nats.
    assert records[0]["eval_loss"] > 6.8
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 1.0


def test_second_build_reuses_the_cache(tiny_trajectory_folder):
    manifest = tiny_trajectory_folder / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert (
        build_embedded_trajectory(TINY, tiny_trajectory_folder.parent.parent, progress=False) == tiny_trajectory_folder
    )
    assert manifest.stat().st_mtime_ns == written


def test_failed_build_leaves_the_cache_as_it_was(tiny_trajectory_folder, tmp_path):
    cache = tiny_trajectory_folder.parent.parent
    before = sorted(path.name for path in (cache / "trajectories").iterdir())
    # Fails after the corpus is written: 300 tokens cannot hold the verbs whole.
    broken = replace(TINY, vocab_size=300)
    with pytest.raises(StudyInputError, match="single-token verbs"):
        build_embedded_trajectory(broken, cache, progress=False)
    after = sorted(path.name for path in (cache / "trajectories").iterdir())
    assert not trajectory_folder(broken, cache).exists()
    assert [name for name in after if "partial" in name] == []
    assert set(before) <= set(after) and (tiny_trajectory_folder / "manifest.json").is_file()


def test_cli_rejects_a_negative_seed_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "study.lm.pretrain", "--preset", "tiny", "--seed", "-3", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --seed must be a non-negative integer, got -3"]
    assert not (tmp_path / "trajectories").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 30, "n_heads": 4}, "divisible"),
        ({"total_steps": 0}, "total_steps"),
        ({"vocab_size": 10}, "vocab_size"),
    ],
)
def test_inconsistent_config_is_refused_before_building(change, message):
    with pytest.raises(StudyInputError, match=message):
        replace(TINY, **change)
