"""A lease on an object store: one builder of a cache at a time where there is no file lock.

Object stores (S3, GCS) have no locks, and pyarrow offers no conditional write, so the lease is a
small object written, left to settle, and read back: a builder holds it only if the object still
names it then. S3 and GCS read their own writes, so two builders that start within the settling
time both read the last one's name and only that one builds; a builder starting later sees a live
lease before writing its own, and waits. The holder renews the lease while it builds; a builder
that dies stops renewing, and the lease expires after ``LEASE_SECONDS``, so a killed build is taken
over (and continued from its finished units) by the next request. Expiry is read against the
waiter's clock: nodes' clocks must agree to well within ``LEASE_SECONDS``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from types import TracebackType

from study.storage import Location

LEASE_SECONDS = 60.0
"""How long a lease lives without renewal; the holder renews it every third of that."""
SETTLE_SECONDS = 2.0
"""How long a builder waits between writing its lease and reading it back."""
POLL_SECONDS = 1.0
"""How often a waiting builder looks at the lease again."""


def read_lease(location: Location) -> dict | None:
    """The lease's contents, None where there is none (or it is unreadable: a torn write)."""
    try:
        return json.loads(location.read_text())
    except (FileNotFoundError, OSError, ValueError):
        return None


class ObjectLease:
    """``with ObjectLease(location):`` holds the lease at ``location`` for the block."""

    def __init__(self, location: Location):
        self.location = location
        self.owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None

    def write(self) -> None:
        self.location.write_text(json.dumps({"owner": self.owner, "expires": time.time() + LEASE_SECONDS}))

    def __enter__(self) -> ObjectLease:
        while True:
            lease = read_lease(self.location)
            if lease is not None and lease["owner"] != self.owner and lease["expires"] > time.time():
                time.sleep(POLL_SECONDS)
                continue
            self.write()
            time.sleep(SETTLE_SECONDS)
            lease = read_lease(self.location)
            if lease is not None and lease["owner"] == self.owner:
                break
        self.renewer = threading.Thread(target=self.renew, daemon=True)
        self.renewer.start()
        return self

    def renew(self) -> None:
        while not self.stop.wait(LEASE_SECONDS / 3):
            self.write()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop.set()
        if self.renewer is not None:
            self.renewer.join()
        lease = read_lease(self.location)
        if lease is not None and lease["owner"] == self.owner:
            self.location.filesystem.delete_file(self.location.path)
