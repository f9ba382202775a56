"""`python scripts/negate.py ARGS` is `vtvc negate ARGS` (see `vtvc negate --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["negate", *sys.argv[1:]]))
