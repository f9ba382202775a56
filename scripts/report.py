"""Rebuild the summaries and figures of a saved run, without refitting.

Writes ``RUN_DIR/summary.json`` and PNG figures in ``RUN_DIR/figures/``: ELBO trace, inclusion
heatmap (task × layer), λ per task, per-sample profiles, reliability, accuracy vs coverage,
uncertainty of correct vs wrong predictions.

Usage::

    python scripts/report.py runs/mixed-20261123-140000
"""

import argparse

from vtvc_pyro.cli import run_main
from vtvc_pyro.report import build_report


def main(args):
    summary = build_report(args.run_dir)
    print(f"target {summary['target']}: {summary['draws']} posterior draws, "
          f"{100 * summary['kept_fraction']:.1f} % of components kept")
    print(f"{'task':20s} {'inclusion':>9s} {'mean λ':>8s}")
    for task, row in sorted(summary["per_task"].items(), key=lambda kv: -kv[1]["inclusion"]):
        print(f"{task:20s} {row['inclusion']:9.3f} {row['lam_mean']:8.3f}")
    for fig in summary["figures"]:
        print(f"wrote {args.run_dir}/{fig}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a folder written by scripts/svi_fit.py")
    run_main(main, parser)
