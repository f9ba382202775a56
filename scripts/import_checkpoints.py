"""`python scripts/import_checkpoints.py ARGS` is `vtvc bank import ARGS` (see `vtvc bank import --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bank", "import", *sys.argv[1:]]))
