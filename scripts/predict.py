"""`python scripts/predict.py RUN --data imagefolder:PATH --out predictions.csv` is `vtvc predict ...` (see `vtvc predict --help`)."""

import sys

from vtvc_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
