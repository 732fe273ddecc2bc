"""``python -m study.sweep AXIS ...``: see ``study.sweep.cli``."""

import sys

from study.errors import run_cli
from study.sweep.cli import main

run_cli(lambda: sys.exit(main()))
