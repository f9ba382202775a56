"""Convert published task_vectors / aTLAS checkpoints and open_clip state dicts into a safetensors bank.

The bank has the layout of the embedded one (base.safetensors, task_vectors/<task>.safetensors,
manifest.json), so ``scripts/svi_fit.py --bank OUT`` uses it. task_vectors and aTLAS publish pickled
``ImageEncoder`` modules: reading them runs pickled code, so they load only with --trust-pickle
(plain state dicts and .safetensors need no flag). The conversion happens once; nothing the bank
holds is a pickle.

Usage::

    python scripts/import_checkpoints.py --arch ViT-B-32-quickgelu --base /data/ViT-B-32-openai.pt \\
        --checkpoints /data/checkpoints/ViT-B-32 --trust-pickle --dtype bfloat16 --out banks/vit-b-32
"""

import argparse
from pathlib import Path

from vtvc_pyro.bank import discover_checkpoints, import_bank, load_bank
from vtvc_pyro.cli import run_main
from vtvc_pyro.errors import ConfigError
from vtvc_pyro.task_vectors import DTYPES


def main(args):
    finetuned, zeroshot = {}, args.zeroshot
    if args.checkpoints:
        found_zs, finetuned = discover_checkpoints(args.checkpoints)
        zeroshot = zeroshot or found_zs
    for item in args.finetuned or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--finetuned takes NAME=PATH, got {item!r}")
        finetuned[name] = path
    if args.tasks:
        unknown = sorted(set(args.tasks) - set(finetuned))
        if unknown:
            raise ConfigError(f"--tasks {unknown[0]} has no checkpoint; found {sorted(finetuned)}")
        finetuned = {k: v for k, v in finetuned.items() if k in args.tasks}
    out = import_bank(Path(args.out), args.arch, args.base, finetuned, zeroshot, trust_pickle=args.trust_pickle,
                      dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    bank = load_bank(out)  # re-read: every vector is checked against the base
    print(f"bank: {out}  (arch {bank.arch}, base {bank.manifest['base_fingerprint']}, "
          f"{len(bank.vectors.blocks)} blocks, storage {args.dtype})")
    for name, info in bank.manifest["tasks"].items():
        print(f"  {name:12s} |τ| = {info['norm']:.4f}   from {info['source']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="open_clip architecture, e.g. ViT-B-32-quickgelu (OpenAI weights)")
    parser.add_argument("--base", default=None, help="open_clip weights of the pre-trained CLIP (.pt/.bin/.safetensors)")
    parser.add_argument("--checkpoints", default=None,
                        help="task_vectors/aTLAS folder: zeroshot.pt and <Task>[Val]/[nonlinear_]finetuned.pt")
    parser.add_argument("--finetuned", action="append", metavar="NAME=PATH", help="one fine-tuned checkpoint, repeatable")
    parser.add_argument("--zeroshot", default=None, help="the zero-shot image encoder the vectors are relative to")
    parser.add_argument("--tasks", nargs="+", default=None, help="import only these tasks")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow reading pickled checkpoints (runs code from the file: only for sources you trust)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="task-vector storage dtype")
    parser.add_argument("--out", required=True, help="bank folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a bank already at --out")
    parser.add_argument("--quiet", action="store_true")
    run_main(main, parser)
