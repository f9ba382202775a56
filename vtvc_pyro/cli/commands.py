"""Every ``vtvc`` subcommand: its handler (parse nothing, call the library, print the result) and its
line in :data:`COMMANDS`, the one table the parser is built from.

A handler takes the subcommand's settings, an instance of its dataclass in :mod:`vtvc_pyro.config`.
Heavy packages (torch, pyro, open_clip, arviz) are imported inside the handlers, so that building
the parser and ``--help`` stay fast.

Adding a subcommand: a settings dataclass in :mod:`vtvc_pyro.config` (if it has settings), a handler
here, and one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from .. import config
from ..errors import ConfigError


def _refuse_existing(path: Path, overwrite: bool, fix: str = "pass another --out, or --overwrite to replace it") -> None:
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: {fix}")


def fit(opts: config.FitCommand) -> None:
    if opts.list_priors or opts.list_guides or opts.list_baselines:
        return _list_registries(opts)
    from .. import distributed
    from ..protocols.fit import default_out, format_table, plan_fit, run_fit, run_notes
    from ..report import build_report

    cfg = config.settings_of(opts, config.FitConfig)
    if opts.dry_run:
        print(json.dumps(plan_fit(cfg), indent=2))
        return
    out = Path(opts.out) if opts.out else default_out(cfg)
    metrics = run_fit(cfg, out, overwrite=opts.overwrite, resume=opts.resume, progress=not opts.quiet)
    if not distributed.is_main():  # under torchrun only rank 0 reports and writes
        return
    print(format_table(metrics))
    print("\n".join(run_notes(metrics)))
    print(f"SVI: {metrics['timing']['svi_samples_per_second']} samples/s, best val step {metrics['svi']['best_step']}; "
          f"total {metrics['timing']['total_seconds']} s")
    summary = build_report(out)
    print(f"wrote {out} (and {len(summary['figures'])} figures; rebuild them with `vtvc report {out} --overwrite`)")


def _list_registries(opts: config.FitCommand) -> None:
    from ..bayes.guide import GUIDES
    from ..bayes.priors import PRIORS
    from ..methods.baselines import KNOWN_BASELINES

    if opts.list_priors:
        for name, cls in PRIORS.items():
            print(f"{name:22s} {cls.formula}")
    if opts.list_guides:
        for name, settings in GUIDES.items():
            print(f"{name:16s} {settings}")
    if opts.list_baselines:
        print("\n".join(KNOWN_BASELINES))


def ablate(opts: config.AblateCommand) -> None:
    from ..protocols.ablation import expand_methods, run_grid

    grid = config.settings_of(opts, config.GridConfig)
    if opts.quick:  # the smoke grid's settings where the command line left the defaults
        quick, default = config.GridConfig.quick(), config.GridConfig()
        grid = replace(grid, **{k: getattr(quick, k) for k in ("methods", "seeds", "steps", "eval_every", "eval_samples")
                                if getattr(grid, k) == getattr(default, k)})
    if opts.list_methods:
        print("\n".join(expand_methods(grid.methods)))
        return
    out = opts.out or ("runs/ablation-quick" if opts.quick else "runs/ablation")
    _, left = run_grid(grid, out, overwrite=opts.overwrite, progress=not opts.quiet, max_cells=opts.max_cells)
    print(Path(out, "ablation.md").read_text())
    print(f"wrote {out}/ablation.csv, ablation.md, ablation.png; {left} cells left" + (" (run again)" if left else ""))


def negate(opts: config.NegateCommand) -> None:
    from ..io import write_json
    from ..protocols.negation import run_negation

    cfg = config.settings_of(opts, config.NegationConfig)
    path = Path(opts.out) / "negation.json"
    _refuse_existing(path, opts.overwrite)
    result = run_negation(cfg, progress=not opts.quiet)
    write_json(path, result)
    print(f"forget {cfg.forget}, control {cfg.control} (test accuracy)")
    print(f"{'method':16s} {'forget':>8s} {'control':>8s}")
    for name, acc in result["methods"].items():
        print(f"{name:16s} {acc['forget']:8.3f} {acc['control']:8.3f}")
    print(f"task arithmetic λ = {result['task_arithmetic_lambda']}; VTVC mean λ: "
          + json.dumps({k: round(v, 3) for k, v in result["vtvc_mean_lambda"].items()}))
    print(f"wrote {path}")


def report(opts: config.ReportCommand) -> None:
    from ..report import build_report
    from ..run_folder import RunFolder

    _refuse_existing(RunFolder(opts.run_dir).summary, opts.overwrite, "pass --overwrite to rebuild it and the figures")
    summary = build_report(opts.run_dir)
    print(f"target {summary['target']}: {summary['draws']} posterior draws, "
          f"{100 * summary['kept_fraction']:.1f} % of components kept")
    print(f"{'task':20s} {'inclusion':>9s} {'mean λ':>8s}")
    for task, row in sorted(summary["per_task"].items(), key=lambda kv: -kv[1]["inclusion"]):
        print(f"{task:20s} {row['inclusion']:9.3f} {row['lam_mean']:8.3f}")
    for fig in summary["figures"]:
        print(f"wrote {opts.run_dir}/{fig}")


def predict(opts: config.PredictCommand) -> None:
    from ..protocols.predict import Predictor

    out = Path(opts.out)
    _refuse_existing(out, opts.overwrite)
    result = Predictor.from_run(opts.run_dir, task=opts.task, device=opts.device).predict(
        opts.data, num_samples=opts.num_samples, split=opts.split)
    result.to_csv(out)
    wrong = "" if result.labels is None else \
        f", accuracy {float((result.probs.argmax(-1) == result.labels).float().mean()):.4f}"
    print(f"wrote {out}: {len(result.names)} images, mean entropy {float(result.entropy.mean()):.3f} nats, "
          f"mean mutual information {float(result.mutual_information.mean()):.3f}{wrong}")


def table(opts: config.TableCommand) -> None:
    from ..io import atomic_write
    from ..tables import results_table, to_csv, to_markdown

    result = results_table(opts.run_dirs, reference=opts.reference)
    markdown = to_markdown(result)
    print(markdown)
    if opts.out:
        for suffix, text in ((".md", markdown + "\n"), (".csv", to_csv(result))):
            path = Path(opts.out).with_suffix(suffix)
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
            print(f"wrote {path}")


def curves(opts: config.CurvesCommand) -> None:
    from ..io import atomic_write
    from ..report import plot_shot_curves
    from ..tables import curves_markdown, shot_curves

    rows = shot_curves(opts.root)
    markdown = curves_markdown(rows)
    print(markdown)
    if opts.out:
        md, png = Path(opts.out).with_suffix(".md"), Path(opts.out).with_suffix(".png")
        for path in (md, png):
            _refuse_existing(path, opts.overwrite)
        atomic_write(md, lambda tmp: Path(tmp).write_text(markdown + "\n"))
        plot_shot_curves(rows, png)
        print(f"wrote {md} and {png}")


def export(opts: config.ExportCommand) -> None:
    from ..protocols.export import command_line, export_run

    if Path(opts.out).suffix == ".safetensors":
        _refuse_existing(Path(opts.out), opts.overwrite)  # a folder: export_run refuses a non-empty one
    info = export_run(opts.run_dir, opts.out, split=opts.split, overwrite=opts.overwrite, command=command_line(),
                      evaluate=opts.evaluate, progress=not opts.quiet)
    if info["folder"]:
        print(f"wrote {info['path']}/: load with open_clip.create_model_and_transforms('local-dir:{info['path']}')")
        if info["exported"]:
            print(f"  exported model test accuracy {info['exported']['accuracy']:.4f} (one shared λ̄)")
    else:
        print(f"wrote {info['path']}: load with open_clip.create_model({info['arch']!r}, pretrained={info['path']!r})")
    for t, name in enumerate(info["tasks"]):
        print(f"  {name:12s} mean λ̄ = {float(info['lam'][t].mean()):+.4f}")


def bank_build(opts: config.BankBuildCommand) -> None:
    from ..bank.store import build_embedded_bank

    out = build_embedded_bank(opts.out, config.settings_of(opts, config.BuildConfig), progress=not opts.quiet,
                              overwrite=opts.overwrite)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"bank: {out}  (arch {manifest['arch']}, base {manifest['base_fingerprint']}, built in {manifest['build_seconds']} s)")
    print(f"{'task':20s} {'chance':>7s} {'zero-shot':>10s} {'fine-tuned':>11s}")
    for name, info in manifest["tasks"].items():
        print(f"{name:20s} {info['chance']:7.3f} {info['zeroshot_accuracy']:10.3f} {info['finetuned_accuracy']:11.3f}")
    for name, info in manifest["targets"].items():
        print(f"{name + ' (target)':20s} {0.1:7.3f} {info['zeroshot_accuracy']:10.3f} {'-':>11s}")


def bank_import(opts: config.BankImportCommand) -> None:
    from ..bank.store import discover_checkpoints, import_bank, load_bank

    finetuned, zeroshot = {}, opts.zeroshot
    if opts.hf_vision:
        from ..bank.hf import task_names

        if opts.checkpoints or opts.finetuned or opts.zeroshot:
            raise ConfigError("--hf_vision imports Hugging Face folders only: pass --checkpoints/--finetuned/--zeroshot "
                              "in a separate import")
        finetuned = task_names(opts.hf_vision, opts.hf_base)
    elif opts.hf_base:
        raise ConfigError("--hf_base needs --hf_vision [DIR_OR_ID,...]: the fine-tuned Hugging Face checkpoints")
    if opts.checkpoints:
        found_zs, finetuned = discover_checkpoints(opts.checkpoints)
        zeroshot = zeroshot or found_zs
    finetuned.update(opts.finetuned or {})
    if opts.tasks:
        unknown = sorted(set(opts.tasks) - set(finetuned))
        if unknown:
            raise ConfigError(f"--tasks {unknown[0]} has no checkpoint; found {sorted(finetuned)}")
        finetuned = {k: v for k, v in finetuned.items() if k in opts.tasks}
    if opts.hf_vision:
        from ..bank.hf import import_hf_bank

        out = import_hf_bank(Path(opts.out), opts.arch, finetuned, opts.hf_base, opts.base, dtype=opts.dtype,
                             overwrite=opts.overwrite, progress=not opts.quiet)
    else:
        out = import_bank(Path(opts.out), opts.arch, opts.base, finetuned, zeroshot, trust_pickle=opts.trust_pickle,
                          dtype=opts.dtype, overwrite=opts.overwrite, progress=not opts.quiet)
    bank = load_bank(out)  # re-read: every vector is checked against the base
    print(f"bank: {out}  (arch {bank.arch}, base {bank.manifest['base_fingerprint']}, "
          f"{len(bank.vectors.blocks)} blocks, storage {opts.dtype})")
    for name, info in bank.manifest["tasks"].items():
        print(f"  {name:12s} |τ| = {info['norm']:.4f}   from {info['source']}")


def bank_truncate(opts: config.BankTruncateCommand) -> None:
    from ..bank.low_rank import relative_error, save_low_rank, truncate_bank
    from ..bank.store import load_bank
    from ..io import write_json
    from ..protocols.truncation import truncation_report

    if not opts.out and not opts.report:
        raise ConfigError("nothing to do: pass --out FILE with --rank/--energy, and/or --report [RANKS]")
    if opts.out:
        if (opts.rank is None) == (opts.energy is None):
            raise ConfigError("--out needs exactly one of --rank R or --energy E")
        _refuse_existing(Path(opts.out), opts.overwrite)
    if opts.report_out:
        _refuse_existing(Path(opts.report_out), opts.overwrite)
    loaded = load_bank(opts.bank)
    if opts.out:
        low = truncate_bank(loaded.vectors, rank=opts.rank, energy=opts.energy, dtype=opts.dtype)
        save_low_rank(low, opts.out)
        print(f"wrote {opts.out}: {len(low.factors)} factored blocks, {low.storage_bytes() / 2**20:.2f} MiB "
              f"(dense {loaded.vectors.storage_bytes() / 2**20:.2f} MiB), relative error {relative_error(low, loaded.vectors):.4f}")
    if opts.report:
        rows = truncation_report(loaded, opts.report, opts.report_energy)
        targets = list(rows[0]["task_arithmetic_accuracy"])
        print(f"{'setting':12s} {'MiB':>6s} {'rel.err':>8s} {'mean source acc':>15s} "
              + " ".join(f"{'TA ' + t:>14s}" for t in targets))
        for r in rows:
            print(f"{r['setting']:12s} {r['storage_mib']:6.2f} {r['relative_error']:8.4f} {r['mean_source_accuracy']:15.4f} "
                  + " ".join(f"{r['task_arithmetic_accuracy'][t]:14.4f}" for t in targets))
        if opts.report_out:
            write_json(opts.report_out, rows)
            print(f"wrote {opts.report_out}")


def bank_finetune(opts: config.BankFinetuneCommand) -> None:
    import copy

    from .. import backbone
    from ..bank import training
    from ..bank.task_vectors import TaskVector
    from ..data import specs

    if opts.steps <= 0 or opts.batch_size <= 0 or not opts.lr > 0:
        raise ConfigError("--steps, --batch_size and --lr must be > 0")
    _refuse_existing(Path(opts.out), opts.overwrite)
    model = backbone.create_clip(opts.arch, opts.base)
    task = specs.load_dataset(opts.data, opts.seed)
    head = backbone.zero_shot_head(model, opts.arch, task.class_names, task.templates)
    tuned = copy.deepcopy(model)
    training.finetune_image_tower(tuned, head, *task.split("train"), steps=opts.steps, batch_size=opts.batch_size,
                                  lr=opts.lr, seed=opts.seed, progress=not opts.quiet, desc=opts.data)
    base = backbone.image_tower_params(model)
    tv = TaskVector.from_state_dicts(tuned.visual.state_dict(), base, opts.arch, opts.name or opts.data, task.class_names)
    tv.save(opts.out, opts.dtype)
    test = task.split("test")
    print(f"{opts.data}: zero-shot {training.accuracy(model, head, *test):.3f}, "
          f"fine-tuned {training.accuracy(tuned, head, *test):.3f}; wrote {opts.out}")


def bank_pretrain(opts: config.BankPretrainCommand) -> None:
    from .. import backbone
    from ..bank import training
    from ..data import specs, suite
    from ..io import fingerprint, save_safetensors

    _refuse_existing(Path(opts.out), opts.overwrite)
    training.seed_everything(opts.seed)
    model = backbone.create_clip(opts.arch)
    images, keys = suite.pretraining_corpus(opts.seed)
    losses = training.pretrain_clip(model, opts.arch, images, keys, steps=opts.steps, batch_size=opts.batch_size,
                                    lr=opts.lr, seed=opts.seed, progress=not opts.quiet)
    fp = fingerprint(backbone.image_tower_params(model))
    save_safetensors(model.state_dict(), opts.out, {"arch": opts.arch, "base_fingerprint": fp})
    print(f"wrote {opts.out} (base {fp}); final loss {sum(losses[-20:]) / 20:.3f}")
    for name in (*suite.SOURCES, *suite.TARGETS):
        task = specs.load_dataset(name, opts.seed)
        head = backbone.zero_shot_head(model, opts.arch, task.class_names, task.templates)
        print(f"  zero-shot {name:20s} {training.accuracy(model, head, *task.split('test')):.3f}")


def data_check(opts: config.DataCheckCommand) -> None:
    from ..data.benchmarks import BENCHMARKS, load_benchmark
    from ..errors import DataError

    names = opts.datasets or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown data set {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in names:
        try:
            task = load_benchmark(name, opts.root, download=opts.download and BENCHMARKS[name].downloadable)
        except DataError as err:
            failed.append(name)
            print(f"{name:9s} MISSING  {err}")
            continue
        sizes = ", ".join(f"{k} {len(v[1])}" for k, v in task.splits.items())
        print(f"{name:9s} ok       {len(task.class_names)} classes; {sizes}")
    if failed:
        raise DataError(f"{len(failed)} data set(s) missing under {opts.root}: {', '.join(failed)} (layouts above)")


def bench_composition(opts: config.BenchCompositionConfig) -> None:
    from ..bench import composition

    composition.main(opts)


def bench_memory(opts: config.BenchMemoryConfig) -> None:
    from ..bench import memory

    memory.main(opts)


def bench_addition(opts: config.BenchAdditionConfig) -> None:
    from ..bench import addition

    addition.main(opts)


def bench_gradients(opts: config.BenchGradientsConfig) -> None:
    from ..io import write_json
    from ..protocols import gradients

    if opts.batch < 1 or opts.seeds < 2:
        raise ConfigError(f"--batch must be >= 1 and --seeds >= 2 (got batch {opts.batch}, seeds {opts.seeds})")
    result = gradients.gradient_bench(opts.run_dir, opts.gatings, opts.batch, opts.seeds, opts.device, opts.at)
    print(gradients.markdown(result))
    if opts.out:
        print(f"wrote {write_json(opts.out, result)}")


@dataclass(frozen=True)
class Command:
    """One subcommand: its path (``("bank", "build")`` is ``vtvc bank build``), its one-line description,
    its settings dataclass (every flag; None: no settings) and its handler (called with an instance of it)."""

    path: tuple[str, ...]
    help: str
    settings: Optional[type]
    handler: Callable


COMMANDS = (
    Command(("fit",), "Fit VTVC by SVI on a held-out target and compare it with the baselines.", config.FitCommand, fit),
    Command(("ablate",), "Run an ablation grid (targets x methods x seeds); resumable, one file per cell.",
            config.AblateCommand, ablate),
    Command(("negate",), "Task negation: forget one task's vector while keeping a control task.", config.NegateCommand,
            negate),
    Command(("report",), "Rebuild summary.json and the figures of a run folder from its files.", config.ReportCommand,
            report),
    Command(("export",), "Export a run's posterior-mean composition as open_clip weights: a local-dir: folder "
            "(config, weights, model card) or one .safetensors file.", config.ExportCommand, export),
    Command(("curves",), "Data-efficiency curves (accuracy against learning images, paired against VTVC) of few-shot runs.",
            config.CurvesCommand, curves),
    Command(("table",), "Results table (methods x tasks, average, normalized average) of run folders, Markdown and CSV.",
            config.TableCommand, table),
    Command(("predict",), "Apply a fitted run to new images: class probabilities, uncertainty and per-image "
            "composition (CSV).", config.PredictCommand, predict),
    Command(("bank", "build"), "Build the embedded bank: pretrain the tiny CLIP, fine-tune the suite's sources.",
            config.BankBuildCommand, bank_build),
    Command(("bank", "import"), "Import published fine-tuned checkpoints (task_vectors/aTLAS, open_clip) as a bank.",
            config.BankImportCommand, bank_import),
    Command(("bank", "truncate"), "Truncate a bank's task vectors to low rank, and/or report what truncation costs.",
            config.BankTruncateCommand, bank_truncate),
    Command(("bank", "finetune"), "Fine-tune the image tower of a base CLIP on one data set and save its task vector.",
            config.BankFinetuneCommand, bank_finetune),
    Command(("bank", "pretrain"), "Pretrain the tiny open_clip CLIP on the offline corpus (the embedded bank's base).",
            config.BankPretrainCommand, bank_pretrain),
    Command(("data", "check"), "Check that the 8 standard data sets are in place under a root folder.",
            config.DataCheckCommand, data_check),
    Command(("bench", "composition"), "Benchmark per-sample composition against a base pass and the naive loop.",
            config.BenchCompositionConfig, bench_composition),
    Command(("bench", "memory"), "Peak memory of one SVI step at real scale (random weights).", config.BenchMemoryConfig,
            bench_memory),
    Command(("bench", "addition"), "One SVI step of task addition against one aTLAS step on the same batch "
            "(random weights).", config.BenchAdditionConfig, bench_addition),
    Command(("bench", "gradients"), "The ELBO gradient's variance of a fitted run on one fixed batch, gated "
            "sampling in training on and off.", config.BenchGradientsConfig, bench_gradients),
)
"""Every subcommand, in the order ``vtvc --help`` lists them."""
