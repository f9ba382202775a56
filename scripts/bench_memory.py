"""`python scripts/bench_memory.py ARGS` is `vtvc bench memory ARGS` (see `vtvc bench memory --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "memory", *sys.argv[1:]]))
