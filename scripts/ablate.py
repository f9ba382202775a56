"""Run an ablation grid (targets × methods × seeds) on the embedded bank; resumable.

Writes ``ablation.csv`` (one row per cell), ``ablation.md`` (mean ± sd over seeds) and
``ablation.png`` to ``--out``; finished cells are skipped when the command runs again.

Usage::

    python scripts/ablate.py                       # default grid, runs/ablation (about 20 min on 2 cores)
    python scripts/ablate.py --quick               # smoke grid, runs/ablation-quick (under a minute)
    python scripts/ablate.py --targets mixed,rot-noise --methods atlas,vtvc/laplace/amortized_gated --seeds 0,1
"""

import argparse
from dataclasses import replace

from vtvc_pyro.ablation import DEFAULT_METHODS, GridConfig, run_grid
from vtvc_pyro.cli import run_main
from vtvc_pyro.errors import ConfigError


def _list(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(item) for item in text.split(",") if item.strip()]
    except ValueError as err:
        raise ConfigError(f"{text!r} is not a comma-separated list of {cast.__name__} ({err})") from err


def main(args):
    if args.list_methods:
        print("\n".join(DEFAULT_METHODS))
        return
    grid = GridConfig.quick() if args.quick else GridConfig()
    overrides = {"targets": _list(args.targets), "methods": _list(args.methods), "seeds": _list(args.seeds, int),
                 "steps": args.steps, "bank": args.bank, "device": args.device}
    grid = replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or ("runs/ablation-quick" if args.quick else "runs/ablation")
    _, left = run_grid(grid, out, overwrite=args.overwrite, progress=not args.quiet, max_cells=args.max_cells)
    print(open(f"{out}/ablation.md").read())
    print(f"wrote {out}/ablation.csv, ablation.md, ablation.png; {left} cells left" + (" (run again)" if left else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke grid: one target, one seed, 30 steps")
    parser.add_argument("--targets", help="comma-separated data set specs (default mixed)")
    parser.add_argument("--methods", help="comma-separated baselines and vtvc/PRIOR/GUIDE (see --list-methods)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, help="steps of every learned method (default 600)")
    parser.add_argument("--bank", help="bank folder (default: the embedded bank)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", help="grid folder (default runs/ablation or runs/ablation-quick)")
    parser.add_argument("--max-cells", type=int, help="run at most this many unfinished cells, then stop")
    parser.add_argument("--overwrite", action="store_true", help="recompute every cell of an existing --out")
    parser.add_argument("--list-methods", action="store_true", help="list the default grid's methods and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    run_main(main, parser)
