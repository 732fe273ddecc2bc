"""python -m study.sweep on real Ray Tune and a real MLflow store (SQLite), on the tiny trajectory."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import ray
import torch
from conftest import migrated_store
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors import safe_open

from study.analysis import verdicts
from study.errors import run_cli
from study.lm.trajectory import damaged_weight_file, resolve_trajectory
from study.record import FEATURE_BROWSER
from study.sweep.cli import main
from study.sweep.plan import activation_request
from study.sweep.search_space import ACTIVATION_KEYS, grid_points, load_space
from study.tracking import store_lock
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.slow  # starts Ray, a sweep, a server or a browser: not in the fast tier

REPO = Path(__file__).parent.parent


def sweep_arguments(trajectory_folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A small sweep; its activations and model curves go to the tiny trajectory's cache, shared by all tests."""
    return [
        "expansion_ratio",
        "--trajectory",
        str(trajectory_folder),
        "--set",
        "n_snapshots=4",
        "--set",
        "layer=1",
        "--set",
        "context_length=32",
        "--set",
        "n_steps=30",
        "--set",
        "batch_size=128",
        "--tokens",
        "4400",
        "--cache-dir",
        str(trajectory_folder.parent.parent),
        "--storage",
        str(tmp_path / "sweeps"),
        *extra,
    ]


def runs(store: Path, experiment: str):
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    return mlflow.search_runs(experiment_names=[experiment])


def children(frame):
    return frame[frame["tags.mlflow.parentRunId"].notna()]


@pytest.fixture(scope="module")
def finished_sweep(tiny_trajectory_folder, tmp_path_factory, ray_cluster):
    """One expansion_ratio sweep, run in-process, shared by the tests that read what it left."""
    folder = tmp_path_factory.mktemp("finished-sweep")
    store = migrated_store(folder / "mlflow.db")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    try:
        capture = io.StringIO()
        with contextlib.redirect_stdout(capture):
            exit_code = main(sweep_arguments(tiny_trajectory_folder, folder, "--experiment", "er"))
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return SimpleNamespace(exit_code=exit_code, store=store, folder=folder, output=capture.getvalue())


def test_sweep_logs_one_parent_and_a_child_per_trial(finished_sweep):
    assert finished_sweep.exit_code == 0
    frame = runs(finished_sweep.store, "er")
    parent = frame[frame["tags.mlflow.parentRunId"].isna()]
    assert len(parent) == 1 and parent["params.axis"].iloc[0] == "expansion_ratio"
    assert parent["tags.git_commit"].iloc[0] and parent["tags.version.ray"].iloc[0]
    trials = children(frame)
    assert sorted(trials["params.expansion_ratio"].astype(float)) == [4.0, 8.0, 16.0]
    assert (trials["status"] == "FINISHED").all() and (trials["metrics.explained_variance"] > 0).all()
    client = MlflowClient()
    run_id = trials["run_id"].iloc[0]
    curve = client.get_metric_history(run_id, "explained_variance_by_snapshot")
    assert len(curve) == 4 and curve[0].step == 0 and curve[-1].step == 48  # the selected snapshots' steps
    # 30 steps: an entry per step (at least MIN_HISTORY_ENTRIES), so the convergence figure exists.
    assert len(client.get_metric_history(run_id, "train/mse")) == 30
    assert finished_sweep.output.count("[start]") == 3 and finished_sweep.output.count("[done]") == 3
    # 30 steps are far from a flat loss: the closing lines say so, with each trial's figure in the table.
    assert "loss_drop_last_fifth" in finished_sweep.output and "not converged: 3 of 3 trials" in finished_sweep.output


def test_each_trial_logs_its_claim_statistics(finished_sweep):
    trials = children(runs(finished_sweep.store, "er"))
    client = MlflowClient()
    for run_id in trials["run_id"]:
        metrics = client.get_run(run_id).data.metrics
        assert {
            "transition_found",
            "initial_share",
            "norm_proxy_r",
            "delta_ce_max",
            "token_specificity_r",
            "alignment_overlap",
        } <= set(metrics)
        assert 0 <= metrics["initial_share"] <= 1 and metrics["delta_ce_max"] < 1
        # The probe needs features that fire often on the (small) held-out shard; with none, r is nan, not made up.
        probed = metrics["sampled_features"] >= 2
        assert -1 <= metrics["norm_proxy_r"] <= 1 if probed else math.isnan(metrics["norm_proxy_r"])
        for name in (
            "feature_dimensionality_by_snapshot",
            "delta_ce_by_snapshot",
            "clean_loss_by_snapshot",
            "token_entropy_by_peak_snapshot",
        ):
            assert [m.step for m in client.get_metric_history(run_id, name)] == [0, 2, 16, 48], name
        assert len(client.get_metric_history(run_id, "alignment_overlap_by_snapshot")) == 3  # adjacent pairs
        # Causal analyses: integrated gradients add up (10 steps), RelIE is a share, curves per snapshot.
        gaps = [m.value for m in client.get_metric_history(run_id, "attribution_gap_by_snapshot")]
        assert max(gaps) < 0.05 and 0 <= metrics["relie_top_mean"] <= 1
        # The gate of the causal verdict reads the learned snapshots only: none learned, no figure.
        assert math.isnan(metrics["attribution_gap_max"]) == (metrics["task_learned_snapshots"] == 0)
        assert [m.step for m in client.get_metric_history(run_id, "task_accuracy_by_snapshot")] == [0, 2, 16, 48]
        artifacts = {item.path for item in client.list_artifacts(run_id)}
        assert {
            "decoder_norms.parquet",
            "decoder_norms.png",
            "features.parquet",
            "crosscoder.safetensors",
            "ablation_curves.parquet",
        } <= artifacts
        features = pd.read_parquet(
            client.download_artifacts(run_id, "features.parquet", str(finished_sweep.folder / run_id))
        )
        assert [c for c in features if c.startswith("relie_step")] == ["relie_step0", "relie_step16", "relie_step48"]
        assert features[[f"ie_step{step}" for step in (0, 2, 16, 48)]].abs().to_numpy().sum() > 0


def test_parent_run_holds_model_curves_robustness_and_the_report(finished_sweep):
    frame = runs(finished_sweep.store, "er")
    parent_id = frame[frame["tags.mlflow.parentRunId"].isna()]["run_id"].iloc[0]
    client = MlflowClient()
    parent = client.get_run(parent_id)
    kl = client.get_metric_history(parent_id, "model/unigram_kl")
    assert [m.step for m in kl] == [0, 2, 16, 48] and kl[-1].value < kl[0].value  # the model learns unigram statistics
    assert {
        parent.data.tags[f"verdict.{claim}"] for claim in ("transition", "quality", "stability", "relie", "causal")
    } <= {"holds", "fails", "mixed", "inconclusive"}
    assert 0 <= parent.data.metrics["stability_expansion_ratio_shared_share"] <= 1
    artifacts = {
        item.path
        for folder in ("", "robustness", "report")
        for item in client.list_artifacts(parent_id, folder or None)
    }
    assert {
        "model_curves.parquet",
        "robustness/verdicts.json",
        "robustness/stability.csv",
        "report/report.html",
        "report/summary.md",
    } <= artifacts
    summary = (finished_sweep.folder / "sweeps" / "er-expansion_ratio" / "report" / "summary.md").read_text()
    for claim in (
        "transition",
        "emergence",
        "norm_proxy",
        "quality",
        "stability",
        "token_specificity",
        "relie",
        "causal",
    ):
        assert f"| {claim} |" in summary
    assert "## Top features by indirect effect, with RelIE" in summary and "RelIE step 48" in summary


def test_large_pairs_are_matched_in_ray_tasks_with_the_figures_of_the_local_match(
    finished_sweep, ray_cluster, monkeypatch
):
    """The sweep's crosscoders are small, so its pairs were matched in the driver; forced above the
    threshold, the same pairs run as Ray tasks (which download the crosscoders themselves)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{finished_sweep.store}")
    frame = runs(finished_sweep.store, "er")
    parent_id = frame[frame["tags.mlflow.parentRunId"].isna()]["run_id"].iloc[0]
    trials = verdicts.finished_trials(MlflowClient(), parent_id)
    local = verdicts.feature_stability(trials)
    monkeypatch.setattr(verdicts, "LOCAL_PAIR_BYTES", 0)
    in_tasks = verdicts.feature_stability(trials)
    assert len(local.figures) == 3 and (local.figures["kind"] == "expansion_ratio").all()
    pd.testing.assert_frame_equal(local.figures, in_tasks.figures)
    pd.testing.assert_frame_equal(local.partners, in_tasks.partners)
    assert set(local.partners["run_a"]) | set(local.partners["run_b"]) == set(trials.frame["run_id"])


def test_the_mlflow_ui_opens_the_sweep_on_its_runs_named_by_their_values(finished_sweep, tmp_path):
    """Through the REST API of a real ``mlflow server``, as the UI reads it."""
    with mlflow_server(f"sqlite:///{finished_sweep.store}", tmp_path) as url:
        experiment = rest(url, "experiments/get-by-name?experiment_name=er")["experiment"]
        tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # the runs view, not GenAI's overview
        found = rest(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    names = {run["info"]["run_name"]: run for run in found}
    assert {"expansion_ratio=4", "expansion_ratio=8", "expansion_ratio=16"} <= set(names), sorted(names)
    assert "er-expansion_ratio" in names  # the parent, named by the sweep
    for ratio in (4, 8, 16):
        metrics = {metric["key"] for metric in names[f"expansion_ratio={ratio}"]["data"]["metrics"]}
        assert {"explained_variance", "l0", "dead_fraction", "transition_step", "control_initial_share"} <= metrics
    assert f"mlflow ui --backend-store-uri sqlite:///{finished_sweep.store}" in finished_sweep.output
    page = f"http://127.0.0.1:5000/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
    assert page in finished_sweep.output


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_report_command_rewrites_the_report_from_mlflow_alone(finished_sweep, tmp_path):
    environment = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{finished_sweep.store}")
    before = finished_sweep.store.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "reports.robustness", "--experiment", "er", "--out", str(tmp_path / "again")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "again" / "report.html").read_text()
    assert page.count("<img") >= 6 and "data:image/png;base64," in page and "verdict" in page
    assert finished_sweep.store.read_bytes() == before  # without --log it only reads
    bad = subprocess.run(
        [sys.executable, "-m", "reports.robustness", "--experiment", "nope", "--out", str(tmp_path / "x")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().count("\n") == 0
        and "no MLflow experiment 'nope'" in bad.stderr
        and "er" in bad.stderr
    )
    assert not (tmp_path / "x").exists() and finished_sweep.store.read_bytes() == before


def headless_chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (.ci/run does, from Debian's packages)")
        pytest.skip("chromium is not installed")
    return browser


def chromium(*arguments: str) -> subprocess.CompletedProcess:
    command = [headless_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_headless_chromium(finished_sweep, tmp_path):
    page = finished_sweep.folder / "sweeps" / "er-expansion_ratio" / "report" / "report.html"
    screenshot = tmp_path / "report.png"
    chromium("--window-size=1400,4000", f"--screenshot={screenshot}", page.as_uri())
    with Image.open(screenshot) as image:
        pixels = image.convert("RGB").resize((350, 1000))
        colours = len(pixels.getcolors(maxcolors=1 << 24))
        # A blank or broken page is one or two colours; text, tables and plots give hundreds.
        assert colours > 200, colours


def test_the_feature_browser_shows_a_features_profile_contexts_and_logit_effects(finished_sweep, tmp_path):
    """Each trial's features.html, opened in a real browser at a feature the report's RelIE table links to: the
    script drew the feature's page (the file holds only data and the script that draws it)."""
    report = finished_sweep.folder / "sweeps" / "er-expansion_ratio" / "report"
    links = sorted(set(re.findall(r"href='(features/[^'#]+#feature-\d+)'", (report / "report.html").read_text())))
    assert links, "the report links no feature page"
    target = report / links[0].split("#")[0]
    feature = links[0].split("#feature-")[1]
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", f"{target.as_uri()}#feature-{feature}").stdout
    assert f"Feature {feature}" in dom
    profile = re.search(r'<svg[^>]*id="profile-plot".*?</svg>', dom, re.S)
    assert profile and profile.group(0).count("<circle") == 4  # a point per snapshot
    contexts = re.search(r'<section id="contexts">.*?</section>', dom, re.S)
    assert contexts and contexts.group(0).count("<mark>") >= 1  # the firing token highlighted in its context
    logits = re.search(r'<section id="logit-effects">.*?</section>', dom, re.S)
    assert logits and logits.group(0).count("<tr>") == 1 + 3  # a header and the first, middle and last snapshot
    client = MlflowClient(f"sqlite:///{finished_sweep.store}")
    for run_id in children(runs(finished_sweep.store, "er"))["run_id"]:
        assert FEATURE_BROWSER in {artifact.path for artifact in client.list_artifacts(run_id)}


def test_two_sweeps_at_once_one_killed_and_resumed_one_with_a_diverging_trial(
    tiny_trajectory_folder, tmp_path, store, ray_cluster
):
    """Two sweeps write one SQLite store at the same time (one Ray, as two users' would share it). The
    first is killed once a trial has finished, then resumed: nothing is run twice, no run duplicated.
    The second has a trial whose loss diverges: that trial is FAILED, the other finishes, the exit
    status is 1, and its run and its row in the final table say why."""
    killed = sweep_arguments(
        tiny_trajectory_folder,
        tmp_path,
        *("--experiment", "resumed", "--set", "expansion_ratio={grid_search: [4, 8]}"),
        *("--set", "n_steps=300", "--max-concurrent", "1"),
    )
    diverging = sweep_arguments(
        tiny_trajectory_folder,
        tmp_path,
        *("--experiment", "diverge", "--set", "expansion_ratio=4"),
        *("--set", "learning_rate={grid_search: [0.001, 1.0e+30]}"),
    )
    environment = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    logs = {name: tmp_path / f"{name}.log" for name in ("killed", "diverging")}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "study.sweep", *arguments],
            cwd=REPO,
            env=environment,
            stdout=logs[name].open("w"),
            stderr=subprocess.STDOUT if name == "killed" else subprocess.DEVNULL,
        )
        for name, arguments in (("killed", killed), ("diverging", diverging))
    }
    deadline = time.time() + 240
    finished = []
    while time.time() < deadline and processes["killed"].poll() is None and not finished:
        time.sleep(0.5)
        if store.exists():
            try:
                # Under the sweeps' own lock: reading a store whose schema is being created races it.
                with store_lock(f"sqlite:///{store}"):
                    frame = runs(store, "resumed")
            except Exception:
                continue  # the experiment is not created yet
            if len(frame) and "tags.mlflow.parentRunId" in frame:
                finished = list(children(frame).query("status == 'FINISHED'")["run_id"])
    processes["killed"].send_signal(signal.SIGKILL)
    processes["killed"].wait()
    assert finished, "no trial finished before the kill:\n" + logs["killed"].read_text()[-3000:]
    before = children(runs(store, "resumed"))
    assert len(before.query("status == 'FINISHED'")) < 2, "the sweep finished before it could be killed"
    end_time = before.set_index("run_id").loc[finished[0], "end_time"]

    # The other sweep went on through the kill and lost nothing.
    assert processes["diverging"].wait(timeout=400) == 1, logs["diverging"].read_text()[-3000:]
    trials = children(runs(store, "diverge")).set_index("params.learning_rate")
    assert len(runs(store, "diverge")) == 3
    assert trials.loc["0.001", "status"] == "FINISHED"
    assert trials.loc["1e+30", "status"] == "FAILED"
    assert "loss became" in trials.loc["1e+30", "tags.error"]
    output = logs["diverging"].read_text()
    assert "[FAILED]" in output
    # The final table marks the diverged trial, not only the progress line.
    table_rows = [line for line in output.splitlines() if not line.startswith("[") and "e+30" in line]
    assert table_rows and all("FAILED" in row for row in table_rows)

    assert main(killed) == 0
    after = children(runs(store, "resumed"))
    assert len(after) == 2 and after["tags.tune_trial_id"].nunique() == 2
    assert (after["status"] == "FINISHED").all()
    assert after.set_index("run_id").loc[finished[0], "end_time"] == end_time  # not run again
    assert len(runs(store, "resumed")) == 3


def interrupt(arguments: list[str], log: Path, wait_for, second_after: float | None = None) -> float:
    """Start ``python -m study.sweep`` in its own process group, send it Ctrl-C's SIGINT once ``wait_for()`` holds
    (and again ``second_after`` seconds later); its exit code must be 130. Returns the seconds it took to exit."""
    environment = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "study.sweep", *arguments],
            cwd=REPO,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the whole foreground group
        )
        deadline = time.time() + 240
        while not wait_for() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "the sweep ended before it could be interrupted:\n" + log.read_text()[-3000:]
        sent = time.time()
        os.killpg(process.pid, signal.SIGINT)
        if second_after is not None:
            time.sleep(second_after)
            os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    return time.time() - sent


def test_ctrl_c_mid_trial_keeps_every_run_and_the_same_command_continues(
    tiny_trajectory_folder, tmp_path, store, ray_cluster
):
    """Ctrl-C once: Tune stops the trial in flight, which keeps its checkpoints; its run ends KILLED (none left
    RUNNING), the parent says the sweep was interrupted, the command says how to continue, exit 130. Twice: it
    exits at once. The same command again ends with exactly one FINISHED run per trial, the stopped one continued
    from its last checkpoint."""
    arguments = sweep_arguments(
        tiny_trajectory_folder,
        tmp_path,
        *("--experiment", "ctrl-c", "--set", "expansion_ratio={grid_search: [4, 8]}"),
        *("--set", "n_steps=2000", "--max-concurrent", "1"),
    )
    log = tmp_path / "sweep.log"
    seconds = interrupt(arguments, log, lambda: "[start]" in log.read_text(), second_after=0.5)
    assert "interrupted again: exiting now" in log.read_text() and seconds < 15, seconds

    storage = tmp_path / "sweeps" / "ctrl-c-expansion_ratio"
    earlier = len(list(storage.glob("*/checkpoint_*")))
    interrupt(
        arguments, log, lambda: "[start]" in log.read_text() and len(list(storage.glob("*/checkpoint_*"))) > earlier + 2
    )
    output = log.read_text()
    assert "interrupted: 0 of 2 trial(s) finished and are kept, 1 stopped in flight" in output, output[-3000:]
    assert "Run the same command again to continue" in output
    frame = runs(store, "ctrl-c")
    assert not (frame["status"] == "RUNNING").any(), frame[["status", "tags.mlflow.runName"]]
    parent = frame[frame["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["status"] == "KILLED" and parent["tags.sweep_interrupted"] == "true"
    assert set(children(frame)["status"]) == {"KILLED"}

    # Then every checkpoint Tune keeps of the stopped trial but its first is cut short: it resumes from that one.
    newest = max(storage.glob("*/checkpoint_*/step*.safetensors"), key=lambda path: path.stat().st_mtime)
    first, *later = sorted(newest.parent.parent.glob("checkpoint_*/step*.safetensors"))
    for path in later:
        path.write_bytes(path.read_bytes()[:1000])

    assert main(arguments) == 0
    frame = runs(store, "ctrl-c")
    trials = children(frame)
    assert len(trials) == 2 and trials["tags.tune_trial_id"].nunique() == 2 and len(frame) == 3
    assert (trials["status"] == "FINISHED").all()
    resumed = trials[trials["tags.resumed_from_step"].notna()].iloc[0]  # continued from a checkpoint, not step 0
    assert resumed["tags.resumed_from_step"] == first.stem.removeprefix("step")
    skipped = resumed["tags.skipped_checkpoints"].split("; ")
    assert skipped and set(skipped) <= {f"{path.parent.name}: {damaged_weight_file(path)}" for path in later}
    parent = frame[frame["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["status"] == "FINISHED" and parent["tags.sweep_interrupted"] == "false"


def test_a_trial_split_over_two_workers_on_streamed_activations_trains_the_same_crosscoder(
    finished_sweep, tiny_trajectory_folder, tmp_path, monkeypatch
):
    """--workers-per-trial 2: two Ray Train workers (gloo) each hold half the features of the trial's
    crosscoder; with activation_mode stream each computes the activations itself and nothing is
    extracted. The trial logs one MLflow run whose crosscoder is the one-process cached trial's."""
    arguments = sweep_arguments(
        tiny_trajectory_folder,
        tmp_path,
        "--experiment",
        "er-workers",
        "--set",
        "expansion_ratio=4",
        "--set",
        "activation_mode=stream",
        "--workers-per-trial",
        "2",
        "--cache-dir",
        str(tmp_path / "fresh-cache"),
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{finished_sweep.store}")  # beside the one-process sweep
    assert main(arguments) == 0
    client = MlflowClient(f"sqlite:///{finished_sweep.store}")
    frame = runs(finished_sweep.store, "er-workers")
    split = children(frame)
    assert len(split) == 1 and split["status"].iloc[0] == "FINISHED"
    # The record says how it ran: a one-value axis names the run by its value (never Tune's trial id), the child
    # its workers, the parent every option and where the cache and the storage lived.
    assert split["tags.mlflow.runName"].iloc[0] == "expansion_ratio=4" and split["tags.trial_workers"].iloc[0] == "2"
    parent = frame[frame["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["tags.option.workers_per_trial"] == "2" and parent["tags.option.max_concurrent"] == "0"
    assert parent["tags.option.search"] == "grid" and parent["tags.option.gpus_per_trial"] == "0.0"
    assert "fresh-cache" in parent["tags.cache_location"]
    assert parent["tags.storage_location"].endswith("sweeps/er-workers-expansion_ratio")
    assert {"transition_found", "initial_share", "explained_variance"} <= set(
        client.get_run(split["run_id"].iloc[0]).data.metrics
    )
    single = children(runs(finished_sweep.store, "er"))
    single = single[single["params.expansion_ratio"].astype(float) == 4.0]
    weights = {}
    for name, frame in (("split", split), ("single", single)):
        path = client.download_artifacts(frame["run_id"].iloc[0], "crosscoder.safetensors", str(tmp_path / name))
        with safe_open(path, framework="pt") as handle:
            weights[name] = {key: handle.get_tensor(key) for key in handle.keys()}
    assert weights["split"].keys() == weights["single"].keys()
    # The axis holds target_l0 at 8: the split crosscoder's controller read the global L0 and settled where the
    # single one did (its state is the sparsity_control buffer compared below, the L0 reached the same).
    assert split["params.target_l0"].iloc[0] == single["params.target_l0"].iloc[0] == "8"
    assert split["metrics.l0"].iloc[0] == pytest.approx(single["metrics.l0"].iloc[0], rel=1e-3)
    assert "sparsity_control" in weights["single"]
    for key, value in weights["single"].items():
        # Two ranks sum their halves of each reconstruction: float32 reduction order, no more.
        torch.testing.assert_close(weights["split"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    # Each worker kept its own half of every sharded checkpoint in the sweep's storage.
    shard_files = sorted((tmp_path / "sweeps" / "er-workers-expansion_ratio" / "workers").rglob("step*.rank*"))
    sizes = {path.name.split(".")[1]: path.stat().st_size for path in shard_files}
    assert set(sizes) == {"rank0", "rank1"} and 0.9 < sizes["rank0"] / sizes["rank1"] < 1.1
    assert not (tmp_path / "fresh-cache" / "activations").exists()  # streamed: no cache was built


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["no_such_axis"], "unknown axis 'no_such_axis'; choose one of: attribution_baseline, expansion_ratio"),
        (["seed", "--set", "expansion_ratio={grid_search: [4"], "--set expansion_ratio"),
        (["seed", "--set", "expansion_ratio=0"], "expansion_ratio = 0 is invalid; expansion_ratio must be > 0"),
        (["seed", "--set", "layer=7", "--set", "n_snapshots=4"], "layer 7 is beyond"),
        (["seed", "--set", "learning_rate={loguniform: [1]}"], "learning_rate.loguniform needs [low, high]"),
        (["seed", "--set", "layer={uniform: [0, 2]}"], "layer changes the activations"),
        (["seed", "--tokens", "3000"], "leaves 1512 held-out tokens in 1 shard(s), fewer than 2048; raise n_tokens to"),
        (
            [
                "seed",
                "--set",
                "n_snapshots=4",
                "--set",
                "sparsity=topk",
                "--set",
                "k=16",
                "--set",
                "expansion_ratio={grid_search: [8, 0.25]}",
            ],
            "k = 16 is not below n_features = 8 (expansion_ratio 0.25 x d_model 32) for topk; lower k or raise",
        ),
        (["seed", "--revisions", "step0,step16"], "revisions name hub commits, but trajectory"),
        (["seed", "--search", "optuna", "--num-samples", "0"], "--num-samples must be >= 1"),
        (["./no/such/axis.yaml"], "axis file ./no/such/axis.yaml does not exist"),
        (["seed", "--workers-per-trial", "0"], "--workers-per-trial must be >= 1"),
        (
            [
                "seed",
                "--set",
                "n_snapshots=4",
                "--set",
                "sparsity=topk",
                "--set",
                "k=16",
                "--set",
                "expansion_ratio=1",
                "--workers-per-trial",
                "4",
            ],
            "k = 16 is more than the 8 features each of 4 workers holds; lower k or --workers-per-trial",
        ),
        (
            ["seed", "--workers-per-trial", "2", "--scheduler", "asha"],
            "--scheduler asha cannot stop a trial split over workers",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_the_store_alone(
    tiny_trajectory_folder, tmp_path, arguments, message, capsys, monkeypatch
):
    store = tmp_path / "mlflow.db"
    arguments = [*arguments, "--trajectory", str(tiny_trajectory_folder), "--storage", str(tmp_path / "sweeps")]
    if arguments[0] == "no_such_axis":
        # The real command line once, in its own process; the other cases take the same path in this one.
        environment = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
        result = subprocess.run(
            [sys.executable, "-m", "study.sweep", *arguments],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        exit_code, errors = result.returncode, result.stderr
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exited:
            run_cli(lambda: sys.exit(main(arguments)))
        exit_code, errors = exited.value.code, capsys.readouterr().err
    assert exit_code == 2, errors
    lines = [line for line in errors.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not store.exists() and not (tmp_path / "sweeps").exists()


def test_a_store_that_is_no_database_is_one_line_and_left_as_it_was(
    tiny_trajectory_folder, tmp_path, capsys, monkeypatch
):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"notes I kept here, not a database\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    arguments = ["seed", "--trajectory", str(tiny_trajectory_folder), "--storage", str(tmp_path / "sweeps")]
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: sys.exit(main(arguments)))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: ") and "is not an SQLite database; move it aside" in errors[0]
    assert store.read_bytes() == b"notes I kept here, not a database\n"
    assert not (tmp_path / "sweeps").exists()


def test_artifacts_elsewhere_for_an_existing_experiment_is_one_line_and_its_runs_stay(
    tiny_trajectory_folder, tmp_path, store, capsys
):
    client = MlflowClient(f"sqlite:///{store}")
    experiment_id = client.create_experiment("placed")
    kept = client.create_run(experiment_id).info.run_id
    capsys.readouterr()  # MLflow's own log of creating the store
    arguments = ["seed", "--experiment", "placed", "--artifacts", "s3://elsewhere/mlflow", "--set", "n_snapshots=4"]
    arguments += ["--trajectory", str(tiny_trajectory_folder), "--storage", str(tmp_path / "sweeps")]
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: sys.exit(main(arguments)))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(errors) == 1, errors
    assert "experiment 'placed' keeps its artifacts at" in errors[0] and "drop --artifacts" in errors[0]
    assert [run.info.run_id for run in client.search_runs([experiment_id])] == [kept]
    assert not (tmp_path / "sweeps").exists()


def test_shards_are_nearly_equal_so_the_held_out_shard_is_not_a_remainder(tiny_trajectory_folder):
    space = load_space(
        "expansion_ratio", [f"trajectory={tiny_trajectory_folder}", "n_snapshots=4", "layer=1", "n_tokens=60000"]
    )
    (point,) = grid_points(space, ACTIVATION_KEYS)
    request = activation_request(point, resolve_trajectory(point["trajectory"], None))
    n_contexts = -(-60000 // (point["context_length"] - 1))
    contexts_in_last_shard = (
        n_contexts - (-(-n_contexts // request.contexts_per_shard) - 1) * request.contexts_per_shard
    )
    assert contexts_in_last_shard >= 0.9 * request.contexts_per_shard
