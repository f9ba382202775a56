"""`python scripts/prepare_data.py ARGS` is `vtvc data check ARGS` (see `vtvc data check --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "check", *sys.argv[1:]]))
