"""`python scripts/table.py RUN_DIR... [--reference ViT-B-32] [--out table]` is `vtvc table ...` (see `vtvc table --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["table", *sys.argv[1:]]))
