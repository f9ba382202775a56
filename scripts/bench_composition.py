"""`python scripts/bench_composition.py ARGS` is `vtvc bench composition ARGS` (see `vtvc bench composition --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "composition", *sys.argv[1:]]))
