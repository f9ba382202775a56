"""`python scripts/pretrain_base.py ARGS` is `vtvc bank pretrain ARGS` (see `vtvc bank pretrain --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bank", "pretrain", *sys.argv[1:]]))
