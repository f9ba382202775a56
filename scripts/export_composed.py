"""`python scripts/export_composed.py ARGS` is `vtvc export ARGS` (see `vtvc export --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
