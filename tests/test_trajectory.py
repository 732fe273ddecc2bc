"""Trajectories load through one code path from a hub id, a local folder and the embedded build."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from conftest import mirror_as_hub_cache

from study.errors import StudyInputError
from study.lm.trajectory import (
    directory_trajectory,
    hub_trajectory,
    load_model,
    load_tokenizer,
    pythia_revisions,
    resolve_trajectory,
)
from study.sweep.cli import main


def test_hub_revision_and_local_folder_load_the_same_weights(tiny_trajectory_folder):
    mirror_as_hub_cache(tiny_trajectory_folder, "toy/tiny-neox", [0, 16])

    from_hub = hub_trajectory("toy/tiny-neox", ["step16", "step0"])
    from_folder = directory_trajectory(tiny_trajectory_folder)
    assert from_hub.steps == [0, 16]
    from_hub.check()
    for step in from_hub.steps:
        hub_weights = load_model(from_hub.snapshot(step)).state_dict()
        folder_weights = load_model(from_folder.snapshot(step)).state_dict()
        assert hub_weights.keys() == folder_weights.keys()
        for name in hub_weights:
            assert torch.equal(hub_weights[name], folder_weights[name]), name
    assert load_tokenizer(from_hub.snapshot(16)).get_vocab() == load_tokenizer(from_folder.snapshot(16)).get_vocab()
    # Two snapshots of one run differ: the loader did not return one checkpoint twice.
    assert not torch.equal(
        load_model(from_hub.snapshot(0)).gpt_neox.embed_in.weight,
        load_model(from_hub.snapshot(16)).gpt_neox.embed_in.weight,
    )


def test_embedded_spec_resolves_through_the_cache(tiny_trajectory_folder):
    trajectory = directory_trajectory(tiny_trajectory_folder)
    assert trajectory.steps == [0, 1, 2, 4, 8, 16, 32, 48]
    assert resolve_trajectory(str(tiny_trajectory_folder)).steps == trajectory.steps


def test_pythia_revisions_follow_the_published_schedule():
    revisions = pythia_revisions()
    assert len(revisions) == 154
    assert revisions[:11] == [
        "step0",
        "step1",
        "step2",
        "step4",
        "step8",
        "step16",
        "step32",
        "step64",
        "step128",
        "step256",
        "step512",
    ]
    assert revisions[11:13] == ["step1000", "step2000"] and revisions[-1] == "step143000"


def test_unknown_model_id_names_the_fix():
    trajectory = hub_trajectory("nobody/no-such-model", ["step0"])
    with pytest.raises(StudyInputError, match="nobody/no-such-model@step0.*check the model id and revision"):
        trajectory.check()


def test_missing_revision_names_the_revision(tiny_trajectory_folder):
    mirror_as_hub_cache(tiny_trajectory_folder, "toy/partial-neox", [0])
    trajectory = hub_trajectory("toy/partial-neox", ["step0", "step8"])
    load_model(trajectory.snapshot(0))
    with pytest.raises(StudyInputError, match="toy/partial-neox@step8"):
        load_model(trajectory.snapshot(8))


def test_revision_without_a_step_is_refused():
    with pytest.raises(StudyInputError, match="step<N>"):
        hub_trajectory("EleutherAI/pythia-160m", ["main"])


def test_folder_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "step5").mkdir()  # no config.json: not a checkpoint
    with pytest.raises(StudyInputError, match="holds no checkpoints"):
        directory_trajectory(tmp_path)
    with pytest.raises(StudyInputError, match="is not a directory"):
        directory_trajectory(tmp_path / "missing")


def test_a_snapshot_is_loaded_once_until_its_checkpoint_changes(tiny_trajectory_folder, tmp_path):
    source = tiny_trajectory_folder / "step16"
    copy = tmp_path / "step16"
    shutil.copytree(source, copy)
    snapshot = directory_trajectory(tmp_path).snapshot(16)
    first = load_model(snapshot)
    assert load_model(snapshot) is first  # the trial's second visit costs nothing
    assert load_model(snapshot, dtype=torch.bfloat16) is not first

    # The checkpoint is re-written in place: the next load reads it.
    model = load_model(directory_trajectory(tiny_trajectory_folder).snapshot(0))
    time.sleep(0.01)  # a modification time the file system can tell apart
    model.save_pretrained(copy)
    reloaded = load_model(directory_trajectory(tmp_path).snapshot(16))
    assert reloaded is not first
    assert torch.equal(reloaded.gpt_neox.embed_in.weight, model.gpt_neox.embed_in.weight)


def test_a_checkpoint_cut_short_names_its_file_before_ray_starts(tiny_trajectory_folder, tmp_path):
    """A trajectory folder whose step's weights were cut short: the sweep stops at planning (bad input: one line,
    exit 2, through study.errors.run_cli) with the file's name, before Ray starts (a fast test that started it
    would fail, tests/conftest.py); the intact folder passes the same check."""
    folder = tmp_path / "trajectory"
    shutil.copytree(tiny_trajectory_folder, folder)
    arguments = ["seed", "--trajectory", str(folder), "--set", "n_snapshots=3", "--dry-run"]
    assert main(arguments) == 0
    weights = sorted(folder.glob("step*/model.safetensors"))[-1]
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StudyInputError) as error:
        main(arguments)
    assert str(weights) in str(error.value) and "cut short" in str(error.value) and "\n" not in str(error.value)
    weights.write_bytes(whole[:4])
    with pytest.raises(StudyInputError, match="too short"):
        main(arguments)
