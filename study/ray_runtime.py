"""Joining Ray: the cluster named by ``RAY_ADDRESS``, or a local one, whose workers train as the sweep needs."""

from __future__ import annotations

import os

import ray

from crosscoder.cpu_memory import SINGLE_ARENA_ENVIRONMENT

RUNTIME_ENVIRONMENT = {"env_vars": SINGLE_ARENA_ENVIRONMENT}
"""The Ray job's environment: Tune trials and Ray Train workers train in a thread of their worker process,
where a crosscoder's large step temporaries would otherwise be mapped afresh at every step
(``crosscoder.cpu_memory``)."""


def ensure_ray() -> None:
    """Join ``$RAY_ADDRESS`` or start a local Ray, unless one is already up."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            # Without an address, ray.init would join whichever cluster was started last on this machine.
            address=os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=RUNTIME_ENVIRONMENT,
        )
