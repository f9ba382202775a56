"""Check (or, with --download, fetch) the 8 benchmark data sets under a data root.

Without --download nothing touches the network: each data set is opened from ROOT and its split
sizes are printed, or the expected folder layout and how to obtain it. With --download
torchvision's downloaders fetch what they can (DTD, EuroSAT, GTSRB, MNIST, SUN397, SVHN); Stanford
Cars and RESISC45 have to be placed by hand.

Usage::

    python scripts/prepare_data.py --root /data                 # check
    python scripts/prepare_data.py --root /data --download      # fetch the downloadable ones
"""

import argparse

from vtvc_pyro.cli import run_main
from vtvc_pyro.data.benchmarks import BENCHMARKS, load_benchmark
from vtvc_pyro.errors import DataError


def main(args):
    failed = []
    for name in args.datasets or list(BENCHMARKS):
        bench = BENCHMARKS[name]
        try:
            task = load_benchmark(name, args.root, download=args.download and bench.downloadable)
        except DataError as err:
            failed.append(name)
            print(f"{name:9s} MISSING  {err}")
            continue
        sizes = ", ".join(f"{k} {len(v[1])}" for k, v in task.splits.items())
        print(f"{name:9s} ok       {len(task.class_names)} classes; {sizes}")
    if failed:
        raise DataError(f"{len(failed)} data set(s) missing under {args.root}: {', '.join(failed)} (layouts above)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data root")
    parser.add_argument("--datasets", nargs="+", choices=list(BENCHMARKS), help="only these (default all 8)")
    parser.add_argument("--download", action="store_true", help="let torchvision download what it can")
    run_main(main, parser)
