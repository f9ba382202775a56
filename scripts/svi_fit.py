"""Fit Variational Task Vector Composition by SVI and compare it with the usual baselines.

Runs the embedded offline default with no arguments: the tiny open_clip CLIP bank (built on first
use), held-out target ``mixed``, spike-and-slab prior, amortized gated guide. Writes config.json,
metrics.json, guide.safetensors, predictions.safetensors, posterior.nc, summary.json and figures/
to ``--out``, then prints a results table.

Usage::

    python scripts/svi_fit.py --target mixed --steps 600 --prior spike_slab --prior-arg pi=0.5
"""

import argparse
from pathlib import Path

from vtvc_pyro import distributed
from vtvc_pyro.baselines import BASELINES
from vtvc_pyro.cli import run_main
from vtvc_pyro.composition import GRANULARITIES
from vtvc_pyro.guide import GUIDES
from vtvc_pyro.infer import ELBOS, SVIConfig
from vtvc_pyro.pipeline import FitConfig, default_out, format_table, run_fit
from vtvc_pyro.priors import PRIORS, parse_prior_args
from vtvc_pyro.report import build_report


def main(args):
    if args.list_priors:
        for name, cls in PRIORS.items():
            print(f"{name:22s} {cls.formula}")
        return
    if args.list_guides:
        for name, settings in GUIDES.items():
            print(f"{name:16s} {settings}")
        return
    svi = SVIConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
        kl_reduction=args.kl_reduction, kl_anneal_steps=args.kl_anneal_steps, num_particles=args.num_particles,
        accumulate=args.accumulate,
        elbo=args.elbo,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, skip_nonfinite=args.skip_nonfinite,
        seed=args.seed,
    )
    cfg = FitConfig(
        target=args.target, bank=args.bank, prior=args.prior, prior_args=parse_prior_args(args.prior_arg),
        guide=args.guide, granularity=args.granularity, tau0=args.tau0, beta=args.beta,
        learn_threshold=not args.fixed_threshold, slab_mean_init=args.slab_mean_init,
        gate_logit_init=args.gate_logit_init, eval_samples=args.eval_samples, device=args.device, svi=svi,
        baselines=[b for b in args.baselines.split(",") if b], low_rank=args.low_rank,
    )
    out = Path(args.out) if args.out else default_out(args.target)
    metrics = run_fit(cfg, out, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    if not distributed.is_main():  # under torchrun only rank 0 reports and writes
        return
    print(format_table(metrics))
    print(f"SVI: {metrics['timing']['svi_samples_per_second']} samples/s, best val step {metrics['svi']['best_step']}; "
          f"total {metrics['timing']['total_seconds']} s")
    summary = build_report(out)
    print(f"wrote {out} (and {len(summary['figures'])} figures; rebuild them with scripts/report.py {out})")


if __name__ == "__main__":
    d = FitConfig()
    s = SVIConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=d.target, help="data set spec of the held-out target (default mixed)")
    parser.add_argument("--bank", default=d.bank, help="bank folder (the embedded one is built on first use)")
    parser.add_argument("--prior", default=d.prior, help=f"prior name: {', '.join(PRIORS)}")
    parser.add_argument("--prior-arg", action="append", metavar="KEY=VALUE", help="prior argument, repeatable")
    parser.add_argument("--list-priors", action="store_true", help="list the priors and exit")
    parser.add_argument("--guide", default=d.guide, choices=list(GUIDES))
    parser.add_argument("--list-guides", action="store_true", help="list the guides and exit")
    parser.add_argument("--baselines", default=",".join(d.baselines),
                        help=f"comma-separated baselines to run beside VTVC (default all: {','.join(BASELINES)}; '' for none)")
    parser.add_argument("--granularity", default=d.granularity, choices=GRANULARITIES)
    parser.add_argument("--low-rank", type=int, default=d.low_rank, metavar="R",
                        help="compose rank-R truncated SVDs of the task vectors (0: full rank, the default)")
    parser.add_argument("--steps", type=int, default=s.steps)
    parser.add_argument("--batch-size", type=int, default=s.batch_size)
    parser.add_argument("--num-particles", type=int, default=s.num_particles)
    parser.add_argument("--accumulate", type=int, default=s.accumulate,
                        help="micro-batches per SVI step (gradient accumulation: same ELBO, less memory)")
    parser.add_argument("--lr", type=float, default=s.lr)
    parser.add_argument("--kl-weight", type=float, default=s.kl_weight)
    parser.add_argument("--kl-reduction", default=s.kl_reduction, choices=["mean", "sum"],
                        help="mean: KL averaged over the T·G coefficients (authors' code); sum: the plain ELBO")
    parser.add_argument("--kl-anneal-steps", type=int, default=s.kl_anneal_steps)
    parser.add_argument("--elbo", default=s.elbo, choices=list(ELBOS))
    parser.add_argument("--eval-every", type=int, default=s.eval_every)
    parser.add_argument("--eval-samples", type=int, default=d.eval_samples, help="posterior draws for the predictive")
    parser.add_argument("--tau0", type=float, default=d.tau0, help="gate threshold base")
    parser.add_argument("--beta", type=float, default=d.beta, help="gate threshold uncertainty slope")
    parser.add_argument("--slab-mean-init", type=float, default=d.slab_mean_init,
                        help="initial slab mean of every coefficient (0.3: AdaMerging's start)")
    parser.add_argument("--gate-logit-init", type=float, default=d.gate_logit_init,
                        help="initial gate logit (2.0: components start mostly kept)")
    parser.add_argument("--fixed-threshold", action="store_true", help="do not learn tau0 and beta")
    parser.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=s.seed)
    parser.add_argument("--out", default=None, help="run folder (default runs/<target>-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=s.checkpoint_every,
                        help="steps between checkpoints (also written on SIGINT/SIGTERM)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip SVI steps whose loss or gradient is NaN/Inf instead of stopping")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    run_main(main, parser)
