"""Sweeps: ``python -m study.sweep AXIS`` on the command line, ``study.sweep.run(AXIS, ...)`` from Python."""

from study.sweep.cli import SweepResult, run
from study.sweep.options import SweepOptions

__all__ = ["SweepOptions", "SweepResult", "run"]
