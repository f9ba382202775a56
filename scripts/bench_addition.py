"""`python scripts/bench_addition.py ARGS` is `vtvc bench addition ARGS` (see `vtvc bench addition --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "addition", *sys.argv[1:]]))
