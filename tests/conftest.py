"""Shared fixtures: a tiny embedded trajectory built once per test session, in a private cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The hub library reads these when first imported: set them before any test imports it, so that
# no test reaches the network or the user's own cache, and tests can place "hub" revisions here.
HUB_CACHE = Path(tempfile.mkdtemp(prefix="hub-cache-"))
os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"

# An S3 endpoint on loopback (moto's server, started by the s3_bucket fixture when a test needs it). Set
# here, before Ray starts, so that Ray's workers inherit it: pyarrow and boto3 both read AWS_ENDPOINT_URL.
# A real endpoint given in the environment is used as it is. Test processes started by pytest-xdist
# inherit the endpoint their parent chose here, but not its server: each starts its own.
if "AWS_ENDPOINT_URL" not in os.environ or os.environ.get("CROSSCODER_TESTS_OWN_S3"):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        S3_PORT = probe.getsockname()[1]
    os.environ.update(
        CROSSCODER_TESTS_OWN_S3="1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
    )
else:
    S3_PORT = None

import pytest  # noqa: E402

from study.lm.pretrain import build_embedded_trajectory  # noqa: E402
from study.lm.pretrain_config import TINY  # noqa: E402


def shared_cache(tmp_path_factory) -> Path:
    """The cache folder of this test run. Under pytest-xdist (README's test command runs two processes)
    every process shares one, beside their own temporary folders: the cache's locks and leases make one
    process build the tiny trajectory and each activation set, and the others read them."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp("cache")
    folder = tmp_path_factory.getbasetemp().parent / "cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_trajectory_folder(tmp_path_factory) -> Path:
    return build_embedded_trajectory(TINY, shared_cache(tmp_path_factory), progress=False)


def mirror_as_hub_cache(trajectory_folder: Path, model_id: str, steps: list[int]) -> None:
    """Lay out ``step<N>/`` folders as the Hugging Face cache holds a hub repo's revisions.

    Offline, ``from_pretrained(model_id, revision="step<N>")`` then resolves exactly as it would
    for a downloaded Pythia revision.
    """
    repo = HUB_CACHE / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for step in steps:
        commit = hashlib.sha1(f"{model_id}@step{step}".encode()).hexdigest()
        shutil.copytree(trajectory_folder / f"step{step}", repo / "snapshots" / commit)
        (repo / "refs" / f"step{step}").write_text(commit)


MIGRATED_STORE = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"


def migrated_store(path: Path) -> Path:
    """An empty SQLite MLflow store at ``path``, copied from one migrated once per test process: creating a
    store runs MLflow's schema migrations (about a second each time), a copy takes milliseconds."""
    if not MIGRATED_STORE.exists():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(f"sqlite:///{MIGRATED_STORE}", str(MIGRATED_STORE.parent / "artifacts"))
    shutil.copyfile(MIGRATED_STORE, path)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A fresh, empty SQLite MLflow store for one test, as MLFLOW_TRACKING_URI."""
    path = migrated_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, sized for a 2-core machine (Ray's defaults oversubscribe it), its workers started
    as the sweep starts them."""
    import ray

    from study.ray_runtime import RUNTIME_ENVIRONMENT

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(
        address="local",  # without it ray.init joins the newest cluster on the machine (another test's)
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 1024**2,
        runtime_env=RUNTIME_ENVIRONMENT,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket():
    """A fresh bucket on the S3 endpoint, as an ``s3://`` URI: moto's server on loopback unless the
    environment names a real endpoint."""
    import boto3

    server = None
    if S3_PORT is not None:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    bucket = f"crosscoder-{uuid.uuid4().hex[:8]}"
    deadline = time.time() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket=bucket)
            break
        except Exception:  # the server is still starting
            if time.time() > deadline or (server is not None and server.poll() is not None):
                raise
            time.sleep(0.3)
    yield f"s3://{bucket}"
    if server is not None:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(autouse=True)
def fast_tests_start_no_ray(request):
    """The fast tier (``-m "not slow"``) must stay fast: a test not marked slow that starts Ray fails."""
    before = ray_started()
    yield
    if request.node.get_closest_marker("slow") is None and ray_started() and not before:
        pytest.fail("this test starts Ray: mark it (or its file) pytest.mark.slow")


def ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()
