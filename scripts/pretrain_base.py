"""Contrastive image-text pretraining of the tiny open_clip CLIP on the embedded suite's captioned images.

Writes the whole CLIP state dict as safetensors. ``build_bank.py`` does this as its first step;
use this script to pretrain a base on its own (e.g. with another seed or budget).

Usage::

    python scripts/pretrain_base.py --out base.safetensors --steps 1000
"""

import argparse

from vtvc_pyro import backbone, training
from vtvc_pyro.cli import run_main
from vtvc_pyro.data import specs, suite
from vtvc_pyro.task_vectors import atomic_save, fingerprint


def main(args):
    training.seed_everything(args.seed)
    model = backbone.create_clip(args.arch)
    images, keys = suite.pretraining_corpus(args.seed)
    losses = training.pretrain_clip(model, args.arch, images, keys, steps=args.steps, batch_size=args.batch_size,
                                    lr=args.lr, seed=args.seed, progress=not args.quiet)
    fp = fingerprint(backbone.image_tower_params(model))
    atomic_save(model.state_dict(), args.out, {"arch": args.arch, "base_fingerprint": fp})
    print(f"wrote {args.out} (base {fp}); final loss {sum(losses[-20:]) / 20:.3f}")
    for name in (*suite.SOURCES, *suite.TARGETS):
        task = specs.load_dataset(name, args.seed)
        head = backbone.zero_shot_head(model, args.arch, task.class_names, task.templates)
        print(f"  zero-shot {name:20s} {training.accuracy(model, head, *task.split('test')):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="base.safetensors")
    parser.add_argument("--arch", default=backbone.TINY_MODEL)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    run_main(main, parser)
