"""User-facing errors: one line that names the problem and the fix, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class StudyInputError(ValueError):
    """Bad input from the user; the message says what is wrong and how to fix it."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning bad input into one line on stderr and exit 2."""
    from crosscoder.config import InputError  # bad crosscoder settings are bad input too

    try:
        main()
    except (StudyInputError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
