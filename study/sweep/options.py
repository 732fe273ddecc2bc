"""How a sweep runs (searcher, scheduler, resources, where things are kept): one typed source that
``study.sweep.run``, the command line's flags and the Tune stage all read."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from study.errors import StudyInputError
from study.record import METRIC, PROGRESS_METRICS

Search = Literal["grid", "optuna"]
Scheduler = Literal["fifo", "asha"]
Mode = Literal["max", "min"]


def option(default: Any, help: str, metavar: str | None = None) -> Any:
    """A sweep option: its default and the line ``--help`` prints for it."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class SweepOptions:
    """The sweep's options besides its axis and its trial keys (``--set``)."""

    search: Search = option("grid", "grid, or optuna over the sampled keys")
    """grid runs the grid num_samples times; optuna draws num_samples trials over the sampled keys."""
    scheduler: Scheduler = option("fifo", "asha stops trials that trail on --metric early")
    """fifo runs every trial to the end; asha stops trials that trail on ``metric`` at a checkpoint."""
    metric: str = option(
        METRIC.explained_variance,
        "what optuna optimises and asha judges, measured on held-out tokens at every checkpoint",
    )
    """A held-out metric reported at every checkpoint (``study.record.PROGRESS_METRICS``)."""
    mode: Mode = option("max", "max or min of --metric")
    """max or min of ``metric``."""
    num_samples: int = option(1, "repeats of the grid, or Optuna trials")
    """Repeats of the grid, or Optuna trials."""
    gpus_per_trial: float = option(0.0, "fraction of a GPU per trial (0 on CPU)")
    """Share of a GPU per trial (0 on CPU)."""
    workers_per_trial: int = option(
        1,
        "split each trial's crosscoder by features over N Ray Train workers (one GPU each with --gpus-per-trial 1, "
        "else one CPU each): for dictionaries larger than one device holds",
    )
    """Ray Train workers that share each trial's crosscoder (split by features); 1 trains it in the trial."""
    max_concurrent: int = option(0, "trials at once (0: as many as resources allow)")
    """Trials at once; 0 lets the cluster's resources decide."""
    storage: str = option(
        "sweeps",
        "Tune's experiment state and the report: a folder every node sees, or a URI such as s3://bucket/sweeps",
    )
    """Tune's experiment state and the report: a folder every node sees or a URI."""
    resume: bool = option(False, "require an earlier run of this sweep to continue")
    """Require an earlier run of this sweep to continue."""
    cache_dir: str | None = option(
        None, "cache of trajectories and activations (a URI such as s3://bucket/cache holds the activations only)"
    )
    """Cache of trajectories and activations (None: $CROSSCODER_STUDY_CACHE or ~/.cache/crosscoder-study)."""
    artifacts: str | None = option(
        None,
        "where a new experiment keeps its MLflow artifacts (crosscoders, plots, report), e.g. s3://bucket/mlflow; "
        "default: beside the tracking store",
    )
    """Where a new experiment keeps its MLflow artifacts (None: beside the tracking store)."""
    local_cache: str | None = option(
        None,
        "a folder on each node's own disk where trials keep copies of the activation files they read, so a shared "
        "folder or object store is read once per node",
        metavar="DIR",
    )
    """A folder on each node's own disk where trials keep copies of the cache files they read."""
    dry_run: bool = option(False, "print the trials and activation sets, run nothing")
    """Print the trials and activation sets, run nothing."""

    @property
    def judged_while_training(self) -> bool:
        """Whether a searcher or scheduler reads ``metric`` at every checkpoint (not so for grid and fifo)."""
        return self.search != "grid" or self.scheduler != "fifo"

    def check(self) -> None:
        """Raise ``StudyInputError`` with the fix for options that cannot run together, before anything runs."""
        for item in fields(self):
            allowed = choices(item.name)
            if allowed and getattr(self, item.name) not in allowed:
                raise StudyInputError(
                    f"--{item.name} {getattr(self, item.name)!r} is unknown; choose one of {', '.join(allowed)}"
                )
        if self.num_samples < 1 or self.gpus_per_trial < 0 or self.max_concurrent < 0:
            raise StudyInputError("--num-samples must be >= 1, --gpus-per-trial >= 0 and --max-concurrent >= 0")
        if self.workers_per_trial < 1:
            raise StudyInputError("--workers-per-trial must be >= 1")
        if self.workers_per_trial > 1 and self.gpus_per_trial not in (0, 1):
            raise StudyInputError(
                "with --workers-per-trial each worker takes one whole GPU: set --gpus-per-trial 1 (or 0 for one CPU each)"
            )
        if self.workers_per_trial > 1 and self.scheduler == "asha":
            raise StudyInputError(
                "--scheduler asha cannot stop a trial split over workers; use fifo or --workers-per-trial 1"
            )
        if self.local_cache is not None and "://" in self.local_cache:
            raise StudyInputError(f"--local-cache {self.local_cache} is a URI; give a folder on each node's own disk")


HINTS = typing.get_type_hints(SweepOptions)
SECRET_QUERY_KEYS = ("secret", "password", "token", "key", "credential", "signature")
"""Query parameters of a location dropped from the record: object-store URIs can carry keys in them."""


def without_credentials(location: str) -> str:
    """``location`` as the record may show it: a URI's user part (``me:password@``, ``KEY:SECRET@``) and
    secret-bearing query parameters removed (``postgresql://me:pw@host/db`` -> ``postgresql://host/db``)."""
    parts = urlsplit(location)
    if not parts.scheme or "://" not in location:
        return location
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode(
        [(key, value) for key, value in parse_qsl(parts.query) if not any(s in key.lower() for s in SECRET_QUERY_KEYS)]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def recorded_options(options: SweepOptions) -> dict[str, str]:
    """Every option as the parent run records it (tags ``option.<name>``): locations without credentials."""
    return {
        item.name: without_credentials(str(value))
        if isinstance(value := getattr(options, item.name), str)
        else str(value)
        for item in fields(SweepOptions)
    }


def choices(name: str) -> tuple[str, ...] | None:
    """The values an option may take, where they are a list: its Literal's, or the progress metrics."""
    if name == "metric":
        return PROGRESS_METRICS
    hint = HINTS[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option (``--num-samples`` for ``num_samples``), typed and documented from the dataclass."""
    for item in fields(SweepOptions):
        flag, hint, default = f"--{item.name.replace('_', '-')}", HINTS[item.name], item.default
        assert default is not MISSING
        if hint is bool:
            parser.add_argument(flag, action="store_true", help=item.metadata["help"])
            continue
        allowed = choices(item.name)
        kind = str if allowed else next(kind for kind in (int, float, str) if kind in (hint, *typing.get_args(hint)))
        parser.add_argument(
            flag,
            type=kind,
            choices=allowed,
            default=default,
            metavar=item.metadata["metavar"],
            help=item.metadata["help"],
        )


def options_of(args: argparse.Namespace) -> SweepOptions:
    """The options parsed by a parser that ``add_flags`` built."""
    return SweepOptions(**{item.name: getattr(args, item.name) for item in fields(SweepOptions)})
