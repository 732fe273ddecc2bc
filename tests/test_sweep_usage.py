"""How a researcher meets the sweep beyond the main command: Optuna and ASHA, their own axis file
from Python, a wheel in a fresh environment, GPUs shared between trials."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import migrated_store
from mlflow.tracking import MlflowClient

from study.sweep import run
from tests.test_sweep import REPO, children, runs, sweep_arguments

pytestmark = pytest.mark.slow  # starts Ray, a sweep, a server or a browser: not in the fast tier


def parent_tags(store: Path, experiment: str) -> dict[str, str]:
    frame = runs(store, experiment)
    parent_id = frame[frame["tags.mlflow.parentRunId"].isna()]["run_id"].iloc[0]
    return MlflowClient(f"sqlite:///{store}").get_run(parent_id).data.tags


def test_your_own_axis_file_from_python_with_optuna_and_asha(tiny_trajectory_folder, tmp_path, store, ray_cluster):
    """An axis file outside the checkout, run through ``study.sweep.run``; Optuna samples its continuous
    key and ASHA judges the trials at every checkpoint, to the end."""
    axis = tmp_path / "elsewhere" / "my_axis.yaml"
    axis.parent.mkdir()
    axis.write_text("# my own question\nsparsity_coefficient: {loguniform: [0.0001, 0.01]}\n")
    overrides = {"trajectory": str(tiny_trajectory_folder), "n_snapshots": 4, "layer": 1, "context_length": 32}
    overrides |= {"n_steps": 30, "batch_size": 128, "n_tokens": 4400, "task_items": 4}
    with contextlib.redirect_stdout(io.StringIO()):
        result = run(
            str(axis),
            overrides,
            search="optuna",
            scheduler="asha",
            num_samples=3,
            cache_dir=str(tiny_trajectory_folder.parent.parent),
            storage=str(tmp_path / "sweeps"),
        )
    assert result.trials["sparsity_coefficient"].nunique() == 3  # Optuna drew three values
    assert set(result.trials["status"]) <= {"done", "stopped early"} and (result.trials["status"] == "done").any()
    assert {verdict.claim for verdict in result.verdicts} >= {"transition", "emergence", "quality", "stability"}
    assert result.report and Path(result.report).is_file()
    trials = children(runs(store, "crosscoder-my_axis"))
    # ASHA may stop a trailing trial at a checkpoint: its run then ends KILLED, tagged, never left RUNNING.
    finished = trials["status"] == "FINISHED"
    stopped = (trials["status"] == "KILLED") & (trials.get("tags.stopped_early") == "true")
    assert len(trials) == 3 and (finished | stopped).all(), trials[["status", "params.sparsity_coefficient"]]
    assert trials.loc[finished, "metrics.explained_variance"].notna().all()
    assert all(name.startswith("sparsity_coefficient=") for name in trials["tags.mlflow.runName"])
    tags = parent_tags(store, "crosscoder-my_axis")
    assert (tags["search"], tags["scheduler"], tags["search_metric"]) == ("optuna", "asha", "explained_variance (max)")


def test_a_wheel_in_a_fresh_environment_carries_the_axes(tiny_trajectory_folder, tmp_path):
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "mlruns", "sweeps", "*.db")
    )
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", tmp_path / "dist", source], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("crosscoder_study-*.whl")
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], check=True, capture_output=True)
    # The dependencies are this environment's (installing torch and Ray again would take minutes);
    # the project itself is only the wheel's copy, as the check of study.__file__ shows.
    (Path(site_packages(python)) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = subprocess.run(
        [python, "-c", "import search_spaces, study; print(study.__file__); print(search_spaces.__file__)"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(fresh)) for path in where), where
    dry = subprocess.run(
        [
            python,
            "-m",
            "study.sweep",
            "expansion_ratio",
            "--dry-run",
            "--set",
            "n_snapshots=4",
            "--trajectory",
            str(tiny_trajectory_folder),
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "axis expansion_ratio, 3 trial(s)" in dry.stdout
    assert not (tmp_path / "mlflow.db").exists()  # a dry run writes nothing


def site_packages(python: Path) -> str:
    return subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


GPU_SWEEP = """
import os, sys
import ray
os.environ["RAY_AUTH_MODE"] = "disabled"
# Two GPUs declared as resources on a CPU machine, as Ray allows: placement is Ray's, whatever the hardware.
# A Ray of its own: without an address, ray.init joins the newest cluster on the machine (another test's).
ray.init(
    address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
    object_store_memory=200 * 1024**2,
)
from study.sweep.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_four_trials_at_half_a_gpu_share_two_declared_gpus_two_by_two(tiny_trajectory_folder, tmp_path):
    store = migrated_store(tmp_path / "mlflow.db")
    arguments = sweep_arguments(tiny_trajectory_folder, tmp_path, "--experiment", "gpus", "--gpus-per-trial", "0.5")
    arguments[0] = "seed"
    arguments += ["--set", "seed={grid_search: [0, 1, 2, 3]}", "--set", "task_items=4"]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    sweep = subprocess.run(
        [sys.executable, "-c", GPU_SWEEP, *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    trials = children(runs(store, "gpus"))
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    assert (trials["tags.gpu_share"] == "0.5").all()
    by_gpu = trials.groupby("tags.ray_gpu_ids")
    assert sorted(by_gpu.size().items()) == [("0", 2), ("1", 2)]  # two trials on each GPU
    for _, pair in by_gpu:
        first, second = pair.sort_values("start_time").itertuples()
        assert second.start_time < first.end_time  # and they ran at the same time
