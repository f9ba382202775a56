"""`python scripts/truncate_bank.py ARGS` is `vtvc bank truncate ARGS` (see `vtvc bank truncate --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bank", "truncate", *sys.argv[1:]]))
