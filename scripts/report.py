"""`python scripts/report.py ARGS` is `vtvc report ARGS` (see `vtvc report --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
