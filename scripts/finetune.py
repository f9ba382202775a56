"""Fine-tune the image tower of a base CLIP on one data set spec and write its task vector.

The zero-shot head (text tower, class names, templates) stays frozen, as in task_vectors/aTLAS.

Usage::

    python scripts/finetune.py --base banks/embedded/base.safetensors --data digits-rotated \
        --out digits-rotated.safetensors
"""

import argparse
import copy

from vtvc_pyro import backbone, training
from vtvc_pyro.cli import run_main
from vtvc_pyro.data import specs
from vtvc_pyro.errors import ConfigError
from vtvc_pyro.task_vectors import TaskVector


def main(args):
    if args.steps <= 0 or args.batch_size <= 0 or not args.lr > 0:
        raise ConfigError("--steps, --batch-size and --lr must be > 0")
    model = backbone.create_clip(args.arch, args.base)
    task = specs.load_dataset(args.data, args.seed)
    head = backbone.zero_shot_head(model, args.arch, task.class_names, task.templates)
    tuned = copy.deepcopy(model)
    training.finetune_image_tower(tuned, head, *task.split("train"), steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed, progress=not args.quiet, desc=args.data)
    base = backbone.image_tower_params(model)
    tv = TaskVector.from_state_dicts(tuned.visual.state_dict(), base, args.arch, args.name or args.data, task.class_names)
    tv.save(args.out, args.dtype)
    test = task.split("test")
    print(f"{args.data}: zero-shot {training.accuracy(model, head, *test):.3f}, "
          f"fine-tuned {training.accuracy(tuned, head, *test):.3f}; wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base CLIP weights (.safetensors, .pt) or an open_clip tag")
    parser.add_argument("--arch", default=backbone.TINY_MODEL)
    parser.add_argument("--data", required=True, help="data set spec (suite name or imagefolder:PATH)")
    parser.add_argument("--out", required=True, help="task-vector file (.safetensors)")
    parser.add_argument("--name", default=None, help="task name stored in the file (default: the spec)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    run_main(main, parser)
