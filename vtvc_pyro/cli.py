"""Helpers shared by the scripts: error handling and logging."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .errors import VTVCError


def run_main(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser) -> None:
    """Parse arguments and run ``main``; a :class:`VTVCError` becomes one line on stderr, exit status 2."""
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(args)
    except VTVCError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
