"""`python scripts/ablate.py ARGS` is `vtvc ablate ARGS` (see `vtvc ablate --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
