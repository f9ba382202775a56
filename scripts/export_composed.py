"""Export a fitted run's composed model as an open_clip state dict (.safetensors).

The image tower is θ0 + Σ_t λ̄_t τ_t with λ̄ the posterior mean of the run's guide over a split of
its target (default test); the text tower is the base's. Load it with
``open_clip.create_model(ARCH, pretrained=OUT)``.

Usage::

    python scripts/export_composed.py runs/DTD-20261123 --out composed-dtd.safetensors
"""

import argparse

from vtvc_pyro.cli import run_main
from vtvc_pyro.export import export_run


def main(args):
    info = export_run(args.run, args.out, split=args.split)
    print(f"wrote {info['path']}: load with open_clip.create_model({info['arch']!r}, pretrained={info['path']!r})")
    lam = info["lam"]
    for t, name in enumerate(info["tasks"]):
        print(f"  {name:12s} mean λ̄ = {float(lam[t].mean()):+.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder of scripts/svi_fit.py")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="split whose posterior mean is exported")
    run_main(main, parser)
