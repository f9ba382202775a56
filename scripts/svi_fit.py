"""`python scripts/svi_fit.py ARGS` is `vtvc fit ARGS` (see `vtvc fit --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
