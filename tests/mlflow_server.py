"""A real `mlflow server` process on loopback, for the tests that talk to MLflow as a browser or a team would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server(
    backend: str,
    folder: Path,
    app_name: str | None = None,
    environment: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """``mlflow server`` on ``backend`` (artifacts proxied into ``folder``), as ``app_name`` (e.g. basic-auth) with
    ``environment`` added to this process's, on ``port`` (a free one by default); yields its URL once it answers."""
    port = port or free_port()
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend),
            *("--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", "1"),
            *(("--app-name", app_name) if app_name else ()),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(environment or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
