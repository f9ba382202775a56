"""Truncate a bank's task vectors to low rank: write the factors, and/or report the accuracy cost.

Usage::

    python scripts/truncate_bank.py --bank banks/embedded --rank 8 --out banks/embedded-r8.safetensors
    python scripts/truncate_bank.py --bank banks/embedded --report 2,4,8,16 --json truncation.json
"""

import argparse
import json
from pathlib import Path

from vtvc_pyro.bank import DEFAULT_BANK, load_bank
from vtvc_pyro.cli import run_main
from vtvc_pyro.errors import ConfigError
from vtvc_pyro.low_rank import (
    relative_error,
    save_low_rank,
    truncate_bank,
    truncation_report,
)


def main(args):
    loaded = load_bank(args.bank)
    if args.out:
        if (args.rank is None) == (args.energy is None):
            raise ConfigError("--out needs exactly one of --rank R or --energy E")
        low = truncate_bank(loaded.vectors, rank=args.rank, energy=args.energy, dtype=args.dtype)
        save_low_rank(low, args.out)
        print(f"wrote {args.out}: {len(low.factors)} factored blocks, {low.storage_bytes() / 2**20:.2f} MiB "
              f"(dense {loaded.vectors.storage_bytes() / 2**20:.2f} MiB), relative error {relative_error(low, loaded.vectors):.4f}")
    if args.report:
        ranks = [int(r) for r in args.report.split(",") if r]
        energies = [float(e) for e in (args.report_energy or "").split(",") if e]
        rows = truncation_report(loaded, ranks, energies)
        targets = list(rows[0]["task_arithmetic_accuracy"])
        print(f"{'setting':12s} {'MiB':>6s} {'rel.err':>8s} {'mean source acc':>15s} " + " ".join(f"{'TA ' + t:>14s}" for t in targets))
        for r in rows:
            print(f"{r['setting']:12s} {r['storage_mib']:6.2f} {r['relative_error']:8.4f} {r['mean_source_accuracy']:15.4f} "
                  + " ".join(f"{r['task_arithmetic_accuracy'][t]:14.4f}" for t in targets))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
            print(f"wrote {args.json}")
    if not args.out and not args.report:
        raise ConfigError("nothing to do: pass --out FILE with --rank/--energy, and/or --report RANKS")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default=str(DEFAULT_BANK), help="bank folder")
    parser.add_argument("--rank", type=int, default=None, help="keep this many singular directions per matrix")
    parser.add_argument("--energy", type=float, default=None, help="or keep this fraction of squared singular values")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="storage dtype")
    parser.add_argument("--out", default=None, help="write the low-rank bank here (safetensors)")
    parser.add_argument("--report", default=None, help="ranks to evaluate, e.g. 2,4,8,16")
    parser.add_argument("--report-energy", default=None, help="kept energies to evaluate, e.g. 0.5,0.9")
    parser.add_argument("--json", default=None, help="write the report here")
    run_main(main, parser)
