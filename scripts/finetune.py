"""`python scripts/finetune.py ARGS` is `vtvc bank finetune ARGS` (see `vtvc bank finetune --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bank", "finetune", *sys.argv[1:]]))
