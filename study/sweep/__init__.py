"""Sweeps: ``python -m study.sweep AXIS`` on the command line, ``study.sweep.run(AXIS, ...)`` from Python."""

from study.sweep.cli import SweepResult, run

__all__ = ["SweepResult", "run"]
