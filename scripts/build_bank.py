"""Build the embedded offline task-vector bank (or reuse the one already there).

Pretrains the tiny open_clip CLIP on captioned digits, textures and faces, fine-tunes its image
tower on every source task of the suite and writes base weights, zero-shot heads, task vectors
(safetensors) and ``manifest.json``. About 2.5 minutes on 2 CPU cores.

Usage::

    python scripts/build_bank.py --out banks/embedded
"""

import argparse
import json

from vtvc_pyro.bank import DEFAULT_BANK, BuildConfig, build_embedded_bank
from vtvc_pyro.cli import run_main


def main(args):
    cfg = BuildConfig(seed=args.seed, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                      dtype=args.dtype)
    out = build_embedded_bank(args.out, cfg, progress=not args.quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"bank: {out}  (arch {manifest['arch']}, base {manifest['base_fingerprint']}, built in {manifest['build_seconds']} s)")
    print(f"{'task':20s} {'chance':>7s} {'zero-shot':>10s} {'fine-tuned':>11s}")
    for name, info in manifest["tasks"].items():
        print(f"{name:20s} {info['chance']:7.3f} {info['zeroshot_accuracy']:10.3f} {info['finetuned_accuracy']:11.3f}")
    for name, info in manifest["targets"].items():
        print(f"{name + ' (target)':20s} {0.1:7.3f} {info['zeroshot_accuracy']:10.3f} {'-':>11s}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_BANK), help="bank folder (reused when complete)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=BuildConfig.pretrain_steps)
    parser.add_argument("--finetune-steps", type=int, default=BuildConfig.finetune_steps)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="storage dtype of the task vectors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    run_main(main, parser)
