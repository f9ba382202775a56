"""The ``vtvc`` command (also ``python -m vtvc_pyro``): one subcommand per thing the project does.

Flags come from the dataclasses of :mod:`vtvc_pyro.config` through jsonargparse, so every setting
has one, named as its field (``--svi.kl_weight``), with its default and docstring in ``--help``.
jsonargparse also gives ``--config FILE`` (JSON or YAML, e.g. a run's own ``config.json``) and
``--print_config``. List values are YAML/JSON lists everywhere: ``--baselines [atlas,ties]``, ``[]``
for none. Only this module and :mod:`vtvc_pyro.config` are imported before a command runs, so
``--help`` answers at once; the command imports what it needs (:mod:`.commands`).

Usage::

    vtvc fit --target rot-noise --svi.steps 300 --out runs/rot-noise
    vtvc fit --config runs/rot-noise/config.json --out runs/replay
    vtvc bank build --print_config
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import fields, is_dataclass

from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
)

from .. import config
from ..errors import VTVCError
from . import commands

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _parser(description: str, settings: type | None = None) -> ArgumentParser:
    """A subcommand's parser: ``--config`` first (later flags override the file), then ``settings``' fields."""
    parser = ArgumentParser(description=description, formatter_class=DefaultHelpFormatter, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="settings from a JSON or YAML file (later flags win)")
    if settings is not None:
        parser.add_class_arguments(settings, nested_key=None, as_group=True)
    return parser


def _add_out(parser: ArgumentParser, what: str, default: str | None = None, required: bool = False) -> None:
    """``--out`` and ``--overwrite``: the same meaning in every command that writes."""
    parser.add_argument("--out", type=typing.Optional[str], default=default, required=required, help=what)
    parser.add_argument("--overwrite", action="store_true", help="replace what --out already holds (refused without it)")


def _add_quiet(parser: ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _fit_parser() -> ArgumentParser:
    parser = _parser("Fit VTVC by SVI on a held-out target and compare it with the baselines.", config.FitConfig)
    _add_out(parser, "run folder (default runs/<target>-<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--dry_run", action="store_true",
                        help="resolve bank, data, device and the composition plan, print them, write nothing")
    _add_quiet(parser)
    for name in ("priors", "guides", "baselines"):
        parser.add_argument(f"--list_{name}", action="store_true", help=f"list the {name} and exit")
    # what a run recorded (config.json's "run" block): accepted so the file replays, otherwise ignored
    parser.add_argument(f"--{config.RUN_RECORD}", type=typing.Optional[dict], default=None, help=argparse.SUPPRESS)
    return parser


def _ablate_parser() -> ArgumentParser:
    parser = _parser("Run an ablation grid (targets x methods x seeds); resumable, one file per cell.",
                     config.GridConfig)
    parser.add_argument("--quick", action="store_true", help="start from the smoke grid (one seed, 30 steps)")
    _add_out(parser, "grid folder (default runs/ablation, or runs/ablation-quick with --quick)")
    parser.add_argument("--max_cells", type=typing.Optional[int], default=None,
                        help="run at most this many unfinished cells, then stop")
    parser.add_argument("--list_methods", action="store_true", help="list the default grid's methods and exit")
    _add_quiet(parser)
    return parser


def _negate_parser() -> ArgumentParser:
    parser = _parser("Task negation: forget one task's vector while keeping a control task.", config.NegationConfig)
    _add_out(parser, "folder of negation.json", default="runs/negation")
    _add_quiet(parser)
    return parser


def _report_parser() -> ArgumentParser:
    parser = _parser("Rebuild summary.json and the figures of a run folder from its files.")
    parser.add_argument("run_dir", help="a folder written by `vtvc fit`")
    parser.add_argument("--overwrite", action="store_true", help="replace the summary and figures already there")
    return parser


def _predict_parser() -> ArgumentParser:
    parser = _parser("Apply a fitted run to new images: class probabilities, uncertainty and per-image composition (CSV).")
    parser.add_argument("run_dir", help="a folder written by `vtvc fit`")
    parser.add_argument("--data", required=True,
                        help="imagefolder:PATH (any folder of images, read recursively) or a data set spec (its --split)")
    parser.add_argument("--split", type=typing.Literal["train", "val", "test"], default="test",
                        help="split of a data set spec (ignored for imagefolder:)")
    parser.add_argument("--task", type=typing.Optional[str], default=None,
                        help="task-addition runs: the task whose classes to predict")
    parser.add_argument("--num_samples", type=typing.Optional[int], default=None,
                        help="posterior draws (default: the run's eval_samples)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    _add_out(parser, "output CSV file", required=True)
    return parser


def _table_parser() -> ArgumentParser:
    parser = _parser("Results table (methods x tasks, average, normalized average) of run folders, Markdown and CSV.")
    parser.add_argument("run_dirs", nargs="+", help="folders written by `vtvc fit` (one protocol; seeds are averaged)")
    parser.add_argument("--reference", type=typing.Optional[str], default=None,
                        help="add published rows of this model (ViT-B-32, ViT-B-16, ViT-L-14) for the data sets the runs have")
    _add_out(parser, "write OUT.md and OUT.csv (default: print the Markdown only)")
    return parser


def _export_parser() -> ArgumentParser:
    parser = _parser("Export a run's posterior-mean composition as open_clip weights: a local-dir: folder "
                     "(config, weights, model card) or one .safetensors file.")
    parser.add_argument("run_dir", help="a folder written by `vtvc fit`")
    _add_out(parser, "output folder for open_clip.create_model_and_transforms('local-dir:OUT'), "
                     "or a .safetensors file (state dict only)", required=True)
    parser.add_argument("--split", type=typing.Literal["train", "val", "test"], default="test",
                        help="split whose posterior mean is exported")
    parser.add_argument("--evaluate", type=bool, default=True,
                        help="folder export: score the exported model on the test split for the model card")
    _add_quiet(parser)
    return parser


def _bank_build_parser() -> ArgumentParser:
    parser = _parser("Build the embedded bank: pretrain the tiny CLIP, fine-tune the suite's sources.",
                     config.BuildConfig)
    _add_out(parser, "bank folder (a complete one is reused unless --overwrite)", default=config.DEFAULT_BANK)
    _add_quiet(parser)
    return parser


def _bank_import_parser() -> ArgumentParser:
    parser = _parser("Import published fine-tuned checkpoints (task_vectors/aTLAS, open_clip) as a bank.")
    parser.add_argument("--arch", type=str, required=True, help="open_clip architecture, e.g. ViT-B-32-quickgelu")
    parser.add_argument("--base", type=typing.Optional[str], default=None,
                        help="open_clip weights of the pre-trained CLIP (.pt/.bin/.safetensors)")
    parser.add_argument("--checkpoints", type=typing.Optional[str], default=None,
                        help="task_vectors/aTLAS folder: zeroshot.pt and <Task>[Val]/[nonlinear_]finetuned.pt")
    parser.add_argument("--finetuned", type=dict[str, str], default={}, help="more checkpoints, {NAME: PATH, ...}")
    parser.add_argument("--zeroshot", type=typing.Optional[str], default=None,
                        help="the zero-shot image encoder the vectors are relative to")
    parser.add_argument("--hf_vision", type=list[str], default=[],
                        help="Hugging Face CLIPVisionModel folders or cached hub ids, one per task (NAME=DIR_OR_ID to "
                             "name one; safetensors only); repeat the flag or give a list")
    parser.add_argument("--hf_base", type=typing.Optional[str], default=None,
                        help="the Hugging Face CLIP (folder or cached hub id) the --hf_vision vectors are relative to")
    parser.add_argument("--tasks", type=typing.Optional[list[str]], default=None, help="import only these tasks")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="allow reading pickled checkpoints (runs code from the file: only for sources you trust)")
    parser.add_argument("--dtype", type=config.StorageDtype, default="float32", help="task-vector storage dtype")
    _add_out(parser, "bank folder to write", required=True)
    _add_quiet(parser)
    return parser


def _bank_truncate_parser() -> ArgumentParser:
    parser = _parser("Truncate a bank's task vectors to low rank, and/or report what truncation costs.")
    parser.add_argument("--bank", type=str, default=config.DEFAULT_BANK, help="bank folder")
    parser.add_argument("--rank", type=typing.Optional[int], default=None, help="singular directions kept per matrix")
    parser.add_argument("--energy", type=typing.Optional[float], default=None,
                        help="or the fraction of squared singular values kept")
    parser.add_argument("--dtype", type=typing.Optional[config.StorageDtype], default=None, help="storage dtype")
    _add_out(parser, "write the low-rank bank here (.safetensors)")
    parser.add_argument("--report", type=list[int], default=[], help="ranks to evaluate, e.g. [2,4,8,16]")
    parser.add_argument("--report_energy", type=list[float], default=[], help="kept energies to evaluate, e.g. [0.5,0.9]")
    parser.add_argument("--report_out", type=typing.Optional[str], default=None, help="write the report here (JSON)")
    return parser


def _bank_finetune_parser() -> ArgumentParser:
    parser = _parser("Fine-tune the image tower of a base CLIP on one data set and save its task vector.")
    parser.add_argument("--base", type=str, required=True, help="base CLIP weights (.safetensors, .pt) or an open_clip tag")
    parser.add_argument("--arch", type=str, default=config.TINY_MODEL, help="open_clip architecture")
    parser.add_argument("--data", type=str, required=True, help="data set spec (suite name or imagefolder:PATH)")
    parser.add_argument("--name", type=typing.Optional[str], default=None, help="task name stored in the file")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--dtype", type=config.StorageDtype, default="float32", help="storage dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data pools and the optimiser")
    _add_out(parser, "task-vector file (.safetensors)", required=True)
    _add_quiet(parser)
    return parser


def _bank_pretrain_parser() -> ArgumentParser:
    parser = _parser("Pretrain the tiny open_clip CLIP on the offline corpus (the embedded bank's base).")
    parser.add_argument("--arch", type=str, default=config.TINY_MODEL, help="open_clip architecture")
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and the optimiser")
    _add_out(parser, "weights file (.safetensors)", default="base.safetensors")
    _add_quiet(parser)
    return parser


def _data_check_parser() -> ArgumentParser:
    parser = _parser("Check that the 8 standard data sets are in place under a root folder.")
    parser.add_argument("--root", type=str, required=True, help="data root")
    parser.add_argument("--datasets", type=typing.Optional[list[str]], default=None, help="only these (default all 8)")
    parser.add_argument("--download", action="store_true", help="let torchvision download what it can")
    return parser


def _bench_composition_parser() -> ArgumentParser:
    return _parser("Benchmark per-sample composition against a base pass and the naive loop.",
                   config.BenchCompositionConfig)


def _bench_memory_parser() -> ArgumentParser:
    return _parser("Peak memory of one SVI step at real scale (random weights).", config.BenchMemoryConfig)


def _bench_addition_parser() -> ArgumentParser:
    return _parser("One SVI step of task addition against one aTLAS step on the same batch (random weights).",
                   config.BenchAdditionConfig)


COMMANDS = {
    "fit": _fit_parser, "ablate": _ablate_parser, "negate": _negate_parser, "report": _report_parser,
    "export": _export_parser, "table": _table_parser, "predict": _predict_parser,
    "bank": {"build": _bank_build_parser, "import": _bank_import_parser, "truncate": _bank_truncate_parser,
             "finetune": _bank_finetune_parser, "pretrain": _bank_pretrain_parser},
    "data": {"check": _data_check_parser},
    "bench": {"composition": _bench_composition_parser, "memory": _bench_memory_parser,
              "addition": _bench_addition_parser},
}
"""Subcommand name -> parser factory, or a group of them (``vtvc bank build``)."""


def _add_commands(parser: ArgumentParser, table: dict, dest: str) -> None:
    sub = parser.add_subcommands(dest=dest)
    for name, entry in table.items():
        if isinstance(entry, dict):
            group = ArgumentParser(description=f"vtvc {name} subcommands", formatter_class=DefaultHelpFormatter,
                                   exit_on_error=False)
            sub.add_subcommand(name, group, help=f"{name}: {', '.join(entry)}")  # jsonargparse: parents first
            _add_commands(group, entry, f"{name}_command")
        else:
            child = entry()
            sub.add_subcommand(name, child, help=child.description)


def build_parser() -> ArgumentParser:
    """The whole ``vtvc`` parser (cheap: no heavy import)."""
    parser = ArgumentParser(prog="vtvc", description="Variational Task Vector Composition over open_clip CLIP models.",
                            formatter_class=DefaultHelpFormatter, exit_on_error=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (the same as --log_level INFO)")
    parser.add_argument("--log_level", type=typing.Literal[LOG_LEVELS], default="WARNING", help="logging level")
    _add_commands(parser, COMMANDS, "command")
    return parser


def build_settings(cls: type, ns: Namespace):
    """The ``cls`` dataclass (nested ones too) from the fields of a parsed namespace."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        value = ns[f.name]
        values[f.name] = build_settings(hints[f.name], value) if is_dataclass(hints[f.name]) else value
    return cls(**values)


def _selected(ns: Namespace) -> tuple[list[str], Namespace]:
    """``(["bank", "build"], that command's namespace)`` for a parsed command line."""
    path, table, node = [], COMMANDS, ns
    key = "command"
    while True:
        name = node[key]
        path.append(name)
        node = node[name]
        if not isinstance(table[name], dict):
            return path, node
        table, key = table[name], f"{name}_command"


REPEATABLE = ("--sweep", "--hf_vision")
"""List flags that may be given once per item (``--sweep a=1,2 --sweep b=3``) as well as as a YAML list."""


def _repeated_flags(argv: list[str]) -> list[str]:
    """``--sweep X`` -> ``--sweep+ X`` (jsonargparse's append) unless X is a YAML list."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in REPEATABLE and not out[i + 1].lstrip().startswith("["):
            out[i] = f"{arg}+"
    return out


def main(argv: list[str] | None = None) -> int:
    """Run ``vtvc ARGV``; a :class:`VTVCError` becomes one line on stderr and exit status 2."""
    parser = build_parser()
    try:
        ns = parser.parse_args(_repeated_flags(sys.argv[1:] if argv is None else argv))
    except argparse.ArgumentError as err:  # one line, as for every other bad input
        message = " ".join(str(err).split())
        print(f"error: {message} (see --help)", file=sys.stderr)
        return 2
    level = "INFO" if ns.verbose and ns.log_level == "WARNING" else ns.log_level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    path, options = _selected(ns)
    try:
        commands.run(path, options, build_settings)
    except VTVCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry_point() -> None:
    """The installed ``vtvc`` script."""
    sys.exit(main())
