"""Task negation on the embedded bank: remove a task's ability, keep a control task's.

Compares zero-shot, task-arithmetic negation (one λ ≤ 0 chosen on val, control kept at ≥ 95 % of
zero-shot) and VTVC with per-sample negative coefficients (prior ``spike_slab_negative``); writes
``negation.json`` to ``--out`` and prints forget/control test accuracies.

Usage::

    python scripts/negate.py --forget digits --control textures --steps 300
"""

import argparse
import json
from pathlib import Path

from vtvc_pyro.bank import DEFAULT_BANK, write_json
from vtvc_pyro.cli import run_main
from vtvc_pyro.errors import ConfigError
from vtvc_pyro.infer import SVIConfig
from vtvc_pyro.negation import run_negation
from vtvc_pyro.priors import parse_prior_args


def main(args):
    out = Path(args.out)
    if (out / "negation.json").exists() and not args.overwrite:
        raise ConfigError(f"{out / 'negation.json'} exists: pass another --out or --overwrite")
    svi = SVIConfig(steps=args.steps, eval_every=args.eval_every, seed=args.seed)
    result = run_negation(args.forget, args.control, args.bank, svi, parse_prior_args(args.prior_arg),
                          args.granularity, args.device, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "negation.json", result)
    print(f"forget {args.forget}, control {args.control} (test accuracy)")
    print(f"{'method':16s} {'forget':>8s} {'control':>8s}")
    for name, acc in result["methods"].items():
        print(f"{name:16s} {acc['forget']:8.3f} {acc['control']:8.3f}")
    print(f"task arithmetic λ = {result['task_arithmetic_lambda']}; VTVC mean λ: "
          + json.dumps({k: round(v, 3) for k, v in result["vtvc_mean_lambda"].items()}))


if __name__ == "__main__":
    s = SVIConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget", default="digits", help="source task whose vector is negated (default digits)")
    parser.add_argument("--control", default="textures", help="task whose accuracy must be kept (default textures)")
    parser.add_argument("--bank", default=str(DEFAULT_BANK))
    parser.add_argument("--granularity", default="block", choices=["block", "layer", "task"])
    parser.add_argument("--prior-arg", action="append", metavar="KEY=VALUE", help="spike_slab_negative argument")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=s.eval_every)
    parser.add_argument("--seed", type=int, default=s.seed)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/negation")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    run_main(main, parser)
