"""`python scripts/build_bank.py ARGS` is `vtvc bank build ARGS` (see `vtvc bank build --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bank", "build", *sys.argv[1:]]))
