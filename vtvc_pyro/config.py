"""Every setting of every command, as dataclasses: the one source of the command line's flags.

This module imports nothing heavy (no torch), so that ``vtvc --help`` answers at once: the command
line (:mod:`vtvc_pyro.cli`) generates its flags, defaults and help from these classes, and a run's
``config.json`` is one of them written as JSON, which ``vtvc fit --config`` reads back.

The library's settings (:class:`FitConfig`, :class:`GridConfig`, ...) come first; each subcommand's
settings (:class:`FitCommand`, :class:`ReportCommand`, ...) follow: a library class plus what only the
command line has (``--out``, ``--overwrite``, ``--quiet``, ...). A field's help is its line under
``Args:`` in its class's docstring (base classes included). Field metadata says how the command line
takes a field when it is not a plain ``--name VALUE`` flag: :func:`switch` (a bare ``--quiet``),
:func:`positional` (``vtvc report RUN_DIR``) or :func:`unlisted` (accepted, not in ``--help``).

Names that live in registries (priors, guides, baselines) are plain strings here and are checked
where the registry is, when a command runs; ``vtvc fit --list_priors`` etc. list them.

Usage::

    from vtvc_pyro.config import FitConfig, SVIConfig
    cfg = FitConfig(target="rot-noise", svi=SVIConfig(steps=300))
"""

from __future__ import annotations

import importlib.util
import typing
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from .errors import ConfigError


def home() -> str:
    """The folder for banks and their feature caches: ``$VTVC_HOME``, else the per-user cache folder
    (platformdirs: ``~/.cache/vtvc_pyro`` on Linux), so an installed user builds the embedded bank once."""
    import platformdirs

    return os.environ.get("VTVC_HOME") or platformdirs.user_cache_dir("vtvc_pyro", appauthor=False)


def default_bank() -> str:
    """``$VTVC_BANK``, else ``<home()>/banks/embedded``: where the embedded bank is built on first use."""
    return os.environ.get("VTVC_BANK") or os.path.join(home(), "banks", "embedded")


DEFAULT_BANK = default_bank()
"""Where the embedded bank is built on first use: ``$VTVC_BANK``, else ``<home()>/banks/embedded``
(``--bank`` overrides it per command)."""

RUN_RECORD = "run"
"""The block of a run's ``config.json`` that holds what the run recorded (argv, device, versions), not settings."""

TINY_MODEL = "vtvc-tiny"
"""The embedded open_clip architecture (``vtvc_pyro/model_configs/vtvc-tiny.json``)."""

Granularity = Literal["block", "layer", "task"]
StorageDtype = Literal["float32", "bfloat16", "float16"]

ALL_BASELINES = "all"
"""In a list of baselines: every registered baseline (``vtvc fit --list_baselines``)."""

TWIN = "twin"
"""In a list of baselines: VTVC's deterministic twin, the same network trained as a point estimate
(``router`` for the hierarchical model, ``flat_twin`` for the flat one)."""

DEFAULT_BASELINES = ("zeroshot", "finetuned", "task_arithmetic", "atlas", TWIN)
"""What a fit runs beside VTVC unless told otherwise: what reading its result needs (``[all]``: every one)."""

VTVC_VARIANTS = (
    # priors under the default guide
    *(f"vtvc/{p}/amortized_gated" for p in ("spike_slab", "spike_slab_continuous", "task_spike_slab", "gaussian",
                                            "laplace", "horseshoe")),
    # guides under the default prior
    "vtvc/spike_slab/amortized", "vtvc/spike_slab/global",
    # the flat model (every coefficient per image) under the default prior and guide
    "vtvc/flat/spike_slab/amortized_gated",
)
DEFAULT_METHODS = (ALL_BASELINES, *VTVC_VARIANTS)
QUICK_METHODS = ("zeroshot", "task_arithmetic", "ties", "atlas", "adamerging", "vtvc/spike_slab/amortized_gated",
                 "vtvc/gaussian/global")


def _positive(obj, names: tuple[str, ...], strict: bool = True) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (value > 0 if strict else value >= 0):
            raise ConfigError(f"{name} must be {'>' if strict else '>='} 0, got {value}")


@dataclass
class SVIConfig:
    """SVI settings (defaults: the embedded default run).

    Args:
        steps: optimiser steps.
        batch_size: images per step.
        lr: AdamW learning rate of the inference networks (cosine schedule to 0).
        global_lr: learning rate of the global posterior's constants (the hierarchical model's λ̄ and ρ).
        weight_decay: AdamW weight decay of the guide's weight matrices.
        kl_weight: scale of every KL term (1 with kl_reduction=sum: the plain ELBO of the model).
        local_kl_weight: scale of the per-image latents' KL instead (the hierarchical model's component and routes; every latent of the flat model); null: kl_weight.
        kl_reduction: mean divides kl_weight by the T·G coefficients per image (authors' code); sum does not.
        kl_anneal_steps: ramp the KL weight linearly from 0 over this many steps (0: no annealing).
        num_particles: ELBO particles per step (vectorized when > 1).
        accumulate: micro-batches per step (gradient accumulation: same ELBO, less memory).
        elbo: trace (Monte Carlo KL) or meanfield (analytic KL where Pyro has one).
        clip_norm: gradient-norm clipping.
        train_temperature: relaxed-Bernoulli temperature of the gates in training.
        eval_temperature: relaxed-Bernoulli temperature of the gates in the predictive.
        eval_every: steps between val scores (the state with the lowest val NLL of the predictive is kept).
        val_samples: posterior draws of the predictive scored on val.
        checkpoint_every: steps between checkpoints (also written on SIGINT/SIGTERM).
        skip_nonfinite: skip steps whose loss or gradient is NaN/Inf instead of stopping.
    """

    steps: int = 600
    batch_size: int = 64
    lr: float = 5e-3
    global_lr: float = 0.1
    weight_decay: float = 0.01
    kl_weight: float = 0.01
    local_kl_weight: Optional[float] = None
    kl_reduction: Literal["mean", "sum"] = "sum"
    kl_anneal_steps: int = 0
    num_particles: int = 1
    accumulate: int = 1
    elbo: Literal["trace", "meanfield"] = "trace"
    clip_norm: float = 1.0
    train_temperature: float = 0.5
    eval_temperature: float = 0.01
    eval_every: int = 50
    val_samples: int = 10
    checkpoint_every: int = 100
    skip_nonfinite: bool = False

    def validate(self) -> None:
        _positive(self, ("steps", "batch_size", "num_particles", "eval_every", "checkpoint_every", "accumulate", "lr",
                         "global_lr", "val_samples",
                         "train_temperature", "eval_temperature", "clip_norm"))
        _positive(self, ("weight_decay", "kl_anneal_steps"), strict=False)
        if self.elbo not in ("trace", "meanfield"):
            raise ConfigError(f"unknown ELBO {self.elbo!r}: use trace or meanfield")
        if self.kl_reduction not in ("mean", "sum"):
            raise ConfigError(f"kl_reduction must be 'mean' or 'sum', got {self.kl_reduction!r}")
        if not self.kl_weight > 0:
            raise ConfigError(f"kl_weight must be > 0 (Pyro cannot scale a site by 0), got {self.kl_weight}")
        if self.local_kl_weight is not None and not self.local_kl_weight > 0:
            raise ConfigError(f"local_kl_weight must be > 0 or null, got {self.local_kl_weight}")


LEGACY_SETTINGS: dict[str, Any] = {"model": "flat", "fit_split": "train", "gating": "drop"}
"""What a run recorded before the setting existed meant: the flat model, learning on train, every
gate drawn in training (a run's ``config.json`` read by ``predict``/``export``, replayed by
``vtvc fit --config``, or resumed)."""

PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "transfer": {},
    "addition": {"model": "flat", "svi.steps": 1500, "svi.lr": 1e-2, "gating": "expect"},
}
"""Each protocol's own defaults where they differ from :class:`FitConfig`'s (the transfer
protocol's), chosen on val (docs/results.md): task addition fits the flat model for 1,500 steps at
lr 1e-2 (val NLL 0.275 / 0.281 / 0.288 against the hierarchical model's best 0.367 / 0.352 / 0.321
over seeds 0-2; best val steps 650-1,250) with gated sampling in training (``gating expect``: val
NLL 0.250 / 0.252 / 0.258). Transfer keeps ``gating drop``: with few images per class the held
gates lost on val (``mixed``, 4 and 16 per class). The command line applies them where neither a
``--config`` file nor a flag sets the field; in Python, :meth:`FitConfig.for_protocol`."""


@dataclass
class FitConfig:
    """Every setting of a fit (written to the run's ``config.json``).

    Args:
        protocol: transfer (compose the bank's other vectors for one held-out target) or addition (compose every task's vector; one model scores every task's test split with its own head).
        target: transfer: data set spec of the held-out target (suite name, imagefolder:PATH or benchmark:NAME@ROOT).
        tasks: addition: data set specs of the tasks, each matched to the bank's vector of the same name ([]: every vector of the bank, as suite tasks).
        fit_split: addition: the data the learned methods learn from: val (aTLAS's protocol: learn on 90 % of each task's held-out val split, select on the rest; the images the task vectors were fine-tuned on are never seen), or train (learn on those fine-tuning images, select on val).
        shots: few-shot learning: keep this many learning images per class (transfer) or per task (addition), drawn with the fit's seed, and shrink val in proportion (at least 2 images per class); null: every learning image.
        bank: bank folder (the embedded one is built on first use).
        model: hierarchical (a global sparse composition routed per image) or flat (every coefficient per image).
        prior: prior of the composition (vtvc fit --list_priors).
        prior_args: prior arguments, e.g. {pi: 0.3, slab_scale: 1.0}.
        guide: guide name (vtvc fit --list_guides); global: task-level VI (hierarchical model without routing).
        components: hierarchical model: candidate numbers K of global compositions (each image follows one); each candidate is fitted and the lowest val NLL wins (the flat model and the global guide have K = 1).
        lr_factors: the learning-rate grid of every supervised learned method, as factors of its base rate (VTVC and its deterministic twins: svi.lr and svi.global_lr; aTLAS: 5e-2): each is fitted at every factor (and every K) and the lowest val NLL wins, so all get the same search; [0.5,1,2] triples the fits.
        routing: hierarchical model: per-image Beta-Bernoulli routing of the task vectors.
        route_a: hierarchical model: Beta(a, b) prior of each task vector's use rate, a.
        route_b: hierarchical model: Beta(a, b) prior of each task vector's use rate, b.
        granularity: one coefficient per (task, block), per (task, layer) or per task.
        gating: what the keep rule does: expect holds the gates of reliable components at their expectation in training and prediction (less gradient variance; task addition's default); drop draws every gate in training and drops unreliable components at prediction.
        tau0: keep-rule threshold: the smallest |μ| (gating expect: |γ·μ|, the expected coefficient) on a task vector of its block's mean size.
        beta: keep-rule threshold slope in the uncertainty.
        slab_mean_init: initial slab mean of every coefficient (0.3: AdaMerging's start).
        gate_logit_init: initial gate logit (null: the prior's inclusion logit).
        slab_logvar_init: initial slab log-variance.
        hidden: hidden width of the guide's heads (null: max(D // 4, T·G), the authors' rule).
        baselines: baselines to run beside VTVC (default: zero-shot, the fine-tuned vector where the target has one, task arithmetic, aTLAS and VTVC's deterministic twin; twin: router for the hierarchical model, flat_twin for the flat one; [all]: every registered one; []: none).
        low_rank: compose rank-R truncated SVDs of the task vectors (0: full rank).
        eval_samples: posterior draws of the Monte Carlo predictive.
        posterior_samples: test images whose per-image posterior posterior.nc keeps.
        device: auto, cpu or cuda[:N].
        seed: seed of the guide's initialisation, the mini-batches, the posterior draws and the learned baselines.
        logger: none (history.csv only) or tensorboard (also TensorBoard event files in the run's tensorboard/; needs pip install 'vtvc-pyro[tensorboard]').
        svi: SVI settings.
    """

    protocol: Literal["transfer", "addition"] = "transfer"
    target: str = "mixed"
    tasks: list[str] = field(default_factory=list)
    fit_split: Literal["train", "val"] = "val"
    shots: Optional[int] = None
    bank: str = DEFAULT_BANK
    model: Literal["hierarchical", "flat"] = "hierarchical"
    prior: str = "spike_slab"
    prior_args: dict = field(default_factory=dict)
    guide: str = "amortized_gated"
    components: list[int] = field(default_factory=lambda: [1, 4])
    lr_factors: list[float] = field(default_factory=lambda: [1.0])
    routing: bool = True
    route_a: float = 1.0
    route_b: float = 1.0
    granularity: Granularity = "block"
    gating: Literal["expect", "drop"] = "drop"
    tau0: float = 0.05
    beta: float = 1.0
    slab_mean_init: float = 0.3
    gate_logit_init: Optional[float] = 3.0
    slab_logvar_init: float = -4.0
    hidden: Optional[int] = None
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    low_rank: int = 0
    eval_samples: int = 20
    posterior_samples: int = 128
    device: str = "auto"
    seed: int = 0
    logger: Literal["none", "tensorboard"] = "none"
    svi: SVIConfig = field(default_factory=SVIConfig)

    @classmethod
    def for_protocol(cls, protocol: str, **overrides) -> FitConfig:
        """The settings of ``protocol`` with its :data:`PROTOCOL_DEFAULTS`, then ``overrides`` by field
        name (``svi`` fields as ``svi={"steps": 300}``, applied over the protocol's; an
        :class:`SVIConfig` is taken whole)."""
        if protocol not in PROTOCOL_DEFAULTS:
            raise ConfigError(f"unknown protocol {protocol!r}: use {' or '.join(PROTOCOL_DEFAULTS)}")
        preset = PROTOCOL_DEFAULTS[protocol]
        svi = {k.split(".", 1)[1]: v for k, v in preset.items() if k.startswith("svi.")}
        top = {k: v for k, v in preset.items() if not k.startswith("svi.")}
        given = overrides.pop("svi", None)
        if isinstance(given, SVIConfig):
            return cls(**{**top, "protocol": protocol, **overrides, "svi": given})
        return cls(**{**top, "protocol": protocol, **overrides, "svi": SVIConfig(**{**svi, **(given or {})})})

    def validate(self) -> None:
        self.svi.validate()
        if self.logger not in ("none", "tensorboard"):
            raise ConfigError(f"unknown logger {self.logger!r}: use none or tensorboard")
        if self.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--logger tensorboard needs the tensorboard package: "
                              "pip install 'vtvc-pyro[tensorboard]' (or pip install tensorboard)")
        protocols = typing.get_args(typing.get_type_hints(FitConfig)["protocol"])  # the registry's names
        if self.protocol not in protocols:
            raise ConfigError(f"unknown protocol {self.protocol!r}: use {' or '.join(protocols)}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots must be a positive number of images (or null for all), got {self.shots}")
        if self.fit_split not in ("train", "val"):
            raise ConfigError(f"fit_split must be train or val, got {self.fit_split!r}")
        if self.gating not in ("expect", "drop"):
            raise ConfigError(f"unknown gating {self.gating!r}: use expect or drop")
        if self.granularity not in ("block", "layer", "task"):
            raise ConfigError(f"unknown granularity {self.granularity!r}: use block, layer or task")
        if self.eval_samples <= 0 or self.posterior_samples < 0:
            raise ConfigError("eval_samples must be > 0 and posterior_samples >= 0")
        if self.low_rank < 0:
            raise ConfigError(f"low_rank must be >= 0 (0: full rank), got {self.low_rank}")
        _positive(self, ("route_a", "route_b", "tau0"))
        if self.model == "flat" and self.guide == "global":
            raise ConfigError("the global guide is task-level inference, which the flat model has no latent for: "
                              "use --model hierarchical --guide global")
        if not self.components or min(self.components) < 1:
            raise ConfigError(f"components must be a non-empty list of integers >= 1, got {self.components}")
        if not self.lr_factors or min(self.lr_factors) <= 0 or len(set(self.lr_factors)) < len(self.lr_factors):
            raise ConfigError(f"lr_factors must be distinct positive numbers, e.g. [0.5,1,2], got {self.lr_factors}")
        if self.model == "hierarchical" and max(self.components) > 1 and self.svi.num_particles > 1:
            raise ConfigError("components > 1 enumerates each image's component: use svi.num_particles 1")
        _positive(self, ("beta",), strict=False)
        if self.hidden is not None and self.hidden <= 0:
            raise ConfigError(f"hidden must be > 0 (or null for the default), got {self.hidden}")


@dataclass
class GridConfig:
    """What an ablation grid runs; ``steps`` etc. apply to every learned method (VTVC, aTLAS, AdaMerging).

    Args:
        targets: data set specs.
        methods: baselines and vtvc/PRIOR/GUIDE ([all, ...]: every registered baseline); see vtvc ablate --list_methods.
        seeds: seeds of every seeded method (seed-independent baselines run once).
        sweep: FIELD=V1,V2,... entries; every VTVC method runs at every combination (svi.X: SVI settings, prior.X: prior arguments).
        steps: steps of every learned method.
        eval_every: steps between val scores.
        eval_samples: posterior draws of VTVC's predictive.
        bank: bank folder.
        device: auto, cpu or cuda[:N].
    """

    targets: list[str] = field(default_factory=lambda: ["mixed"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sweep: list[str] = field(default_factory=list)
    steps: int = 600
    eval_every: int = 50
    eval_samples: int = 20
    bank: str = DEFAULT_BANK
    device: str = "auto"

    @classmethod
    def quick(cls, **overrides) -> GridConfig:
        """The smoke grid (under a minute on 2 cores): one target, one seed, 30 steps."""
        return cls(**{"methods": list(QUICK_METHODS), "seeds": [0], "steps": 30, "eval_every": 15,
                      "eval_samples": 4, **overrides})

    def validate(self) -> None:
        if not self.targets or not self.seeds or not self.methods:
            raise ConfigError("the grid needs at least one target, method and seed")
        _positive(self, ("steps", "eval_every", "eval_samples"))


@dataclass
class NegationConfig:
    """Task negation: forget one source task, keep a control task.

    Args:
        forget: source task whose vector is negated.
        control: task whose accuracy must be kept.
        bank: bank folder.
        granularity: coefficient granularity.
        prior_args: arguments of the spike_slab_negative prior.
        device: auto, cpu or cuda[:N].
        seed: seed of the guide and the mini-batches.
        svi: SVI settings.
    """

    forget: str = "digits"
    control: str = "textures"
    bank: str = DEFAULT_BANK
    granularity: Granularity = "block"
    prior_args: dict = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0
    # negation keeps the flat model's KL convention (the authors' mean over coefficients)
    svi: SVIConfig = field(default_factory=lambda: SVIConfig(steps=300, kl_weight=0.1, kl_reduction="mean"))


@dataclass
class BuildConfig:
    """Settings of the embedded bank (defaults build in about 2.5 minutes on 2 CPU cores).

    Args:
        arch: open_clip architecture of the base model.
        seed: seed of the data pools, pretraining and fine-tuning.
        pretrain_steps: CLIP pretraining steps of the base model.
        pretrain_lr: pretraining learning rate.
        finetune_steps: fine-tuning steps of each source task.
        finetune_lr: fine-tuning learning rate.
        batch_size: images per step.
        tasks: source tasks to fine-tune ([]: every suite source).
        dtype: storage dtype of the task vectors.
    """

    arch: str = TINY_MODEL
    seed: int = 0
    pretrain_steps: int = 1000
    pretrain_lr: float = 2e-3
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    batch_size: int = 128
    tasks: list[str] = field(default_factory=list)
    dtype: StorageDtype = "float32"


@dataclass
class BenchCompositionConfig:
    """Per-sample composition against one base pass and the naive per-sample loop.

    Args:
        models: geometries to measure (vit-b-32, tiny).
        layers: ViT-B/32 blocks (12: the whole tower).
        tasks: numbers of task vectors.
        batch: batch sizes.
        strategies: strategies to measure (base, functional, lowrank, materialize, linear, auto, shared, naive, naive-lowrank; predict: VTVC's one-pass prediction on the low-rank bank, base features + guide + one composed pass, forward only).
        rank: rank of the low-rank task vectors.
        dtype: task-vector storage dtype.
        repeats: timed runs of ViT-B/32.
        tiny_repeats: timed runs of the tiny model (milliseconds each).
        warmup: untimed runs before the timed ones.
        naive_backward: the naive loop's backward: one sample at a time (memory of one tower) or batched (memory of M towers).
        device: cpu or cuda[:N].
        threads: torch threads (0: torch's default).
        out: write the rows, the environment and the target checks to this JSON file.
        markdown: also print the table as Markdown.
        from_json: print the Markdown table of a saved run and exit.
        quiet: no table header before the rows.
    """

    models: list[str] = field(default_factory=lambda: ["vit-b-32", "tiny"])
    layers: int = 12
    tasks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    batch: list[int] = field(default_factory=lambda: [8, 32])
    strategies: list[str] = field(default_factory=lambda: ["base", "functional", "lowrank", "materialize", "linear",
                                                           "auto", "shared", "naive", "naive-lowrank"])
    rank: int = 16
    dtype: StorageDtype = "float32"
    repeats: int = 1
    tiny_repeats: int = 20
    warmup: int = 1
    naive_backward: Literal["per-sample", "batched"] = "per-sample"
    device: str = "cpu"
    threads: int = 0
    out: Optional[str] = None
    markdown: bool = False
    from_json: Optional[str] = None
    quiet: bool = False


@dataclass
class BenchMemoryConfig:
    """Peak memory of one SVI step (or of the shared aTLAS-style step) at real scale, random weights.

    Args:
        arch: open_clip architecture.
        tasks: number of task vectors.
        micro_batch: images per step.
        granularity: coefficient granularity.
        dtype: task-vector storage dtype.
        shared: measure the batch-shared (aTLAS-style) step instead of the per-sample one.
    """

    arch: str = "ViT-B-32"
    tasks: int = 7
    micro_batch: int = 1
    granularity: Granularity = "block"
    dtype: StorageDtype = "bfloat16"
    shared: bool = False


@dataclass
class BenchAdditionConfig:
    """One SVI step of the task-addition protocol against one aTLAS step on the same batch, random weights.

    Args:
        models: geometries to measure (vit-b-32, tiny).
        layers: ViT-B/32 blocks (12: the whole tower).
        tasks: number of tasks, one task vector and one head each (the 8 standard tasks' class counts, repeated past 8).
        batch: batch sizes (images round robin over the tasks).
        components: the hierarchical model's numbers of global compositions K to measure (the fit's default candidates: 1 and 4).
        banks: task-vector banks to measure: dense and/or lowrank.
        rank: rank of the low-rank task vectors.
        dtype: task-vector storage dtype.
        repeats: timed steps per configuration (the median is reported).
        warmup: untimed steps before the timed ones.
        device: cpu or cuda[:N].
        threads: torch threads (0: torch's default).
        out: write the rows and the environment to this JSON file.
        markdown: also print the table as Markdown.
        from_json: print the Markdown table of a saved run and exit.
        quiet: no table header before the rows.
    """

    models: list[str] = field(default_factory=lambda: ["vit-b-32"])
    layers: int = 12
    tasks: int = 8
    batch: list[int] = field(default_factory=lambda: [8])
    components: list[int] = field(default_factory=lambda: [1, 4])
    banks: list[Literal["dense", "lowrank"]] = field(default_factory=lambda: ["dense", "lowrank"])
    rank: int = 16
    dtype: StorageDtype = "float32"
    repeats: int = 1
    warmup: int = 1
    device: str = "cpu"
    threads: int = 0
    out: Optional[str] = None
    markdown: bool = False
    from_json: Optional[str] = None
    quiet: bool = False

    def __post_init__(self):
        _positive(self, ("layers", "tasks", "rank", "repeats"))
        _positive(self, ("warmup", "threads"), strict=False)
        for name in ("batch", "components"):
            if not all(v > 0 for v in getattr(self, name)):
                raise ConfigError(f"every {name} must be > 0, got {getattr(self, name)}")


# ---------------------------------------------------------------- the command line's own settings

CLI = "cli"
"""Field metadata key: how the command line takes a field that is not a plain ``--name VALUE`` flag."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def switch(*aliases: str) -> Any:
    """A bool field given as a bare flag (``--quiet``, or an alias such as ``-v``): false unless present."""
    return field(default=False, metadata={CLI: "switch", "aliases": aliases})


def positional(**kwargs) -> Any:
    """A field the command line takes by position (``vtvc report RUN_DIR``; a list takes one or more)."""
    return field(metadata={CLI: "positional"}, **kwargs)


def unlisted(default=None) -> Any:
    """A field the command line accepts (from ``--config`` files too) but leaves out of ``--help``."""
    return field(default=default, metadata={CLI: "unlisted"})


def cli_kind(f) -> str:
    """``flag`` (``--name VALUE``), ``switch``, ``positional`` or ``unlisted`` for a dataclass field."""
    return f.metadata.get(CLI, "flag")


def settings_of(settings, cls: type):
    """The ``cls`` part of a command's settings: ``settings_of(FitCommand(...), FitConfig)`` is the
    ``FitConfig`` that ``run_fit`` takes and ``config.json`` holds (no ``--out``, no ``--quiet``)."""
    return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass(kw_only=True)
class MainOptions:
    """Options of ``vtvc`` itself, before the subcommand.

    Args:
        verbose: log progress (the same as --log_level INFO).
        log_level: logging level.
    """

    verbose: bool = switch("-v")
    log_level: Literal[LOG_LEVELS] = "WARNING"


@dataclass(kw_only=True)
class _Overwrite:
    """``--overwrite``: the same meaning in every command that writes.

    Args:
        overwrite: replace what --out already holds (refused without it).
    """

    overwrite: bool = switch()


@dataclass(kw_only=True)
class _Quiet:
    """``--quiet``: the same meaning in every command that shows progress.

    Args:
        quiet: no progress bars.
    """

    quiet: bool = switch()


@dataclass(kw_only=True)
class FitCommand(_Quiet, _Overwrite, FitConfig):
    """Every setting of a fit (``config.json`` holds those of FitConfig) and the command line's own.

    Args:
        out: run folder (default runs/<target>-<timestamp>).
        resume: continue the run in --out from its last checkpoint.
        dry_run: resolve bank, data, device and the composition plan, print them, write nothing.
        list_priors: list the priors and exit.
        list_guides: list the guides and exit.
        list_baselines: list the baselines and exit.
        run: what a run recorded (config.json's "run" block): accepted so that the file replays, otherwise ignored.
    """

    out: Optional[str] = None
    resume: bool = switch()
    dry_run: bool = switch()
    list_priors: bool = switch()
    list_guides: bool = switch()
    list_baselines: bool = switch()
    run: Optional[dict] = unlisted()


@dataclass(kw_only=True)
class AblateCommand(_Quiet, _Overwrite, GridConfig):
    """What an ablation grid runs (GridConfig) and where it writes.

    Args:
        quick: start from the smoke grid (one seed, 30 steps).
        out: grid folder (default runs/ablation, or runs/ablation-quick with --quick).
        max_cells: run at most this many unfinished cells, then stop.
        list_methods: list the default grid's methods and exit.
    """

    quick: bool = switch()
    out: Optional[str] = None
    max_cells: Optional[int] = None
    list_methods: bool = switch()


@dataclass(kw_only=True)
class NegateCommand(_Quiet, _Overwrite, NegationConfig):
    """Task negation's settings (NegationConfig) and where it writes.

    Args:
        out: folder of negation.json.
    """

    out: Optional[str] = "runs/negation"


@dataclass(kw_only=True)
class BenchGradientsConfig:
    """The ELBO gradient's variance of a fitted run on one fixed batch, under each gating.

    Args:
        run_dir: a folder written by `vtvc fit` (its guide's parameters are used as fitted).
        gatings: gatings to measure (expect: reliable gates held at their expectation; drop: every gate drawn in training); the first is the reference of the ratio.
        batch: images in the fixed batch (drawn from the learning split with the run's seed).
        seeds: independent posterior draws per gating (the same seeds for each).
        at: fitted (the run's parameters) or init (the initial state a fit of the run's settings starts from, where neither gating's objective was fitted).
        device: auto, cpu or cuda[:N].
        out: also write the result to this JSON file.
    """

    run_dir: str = positional()
    gatings: list[Literal["expect", "drop"]] = field(default_factory=lambda: ["drop", "expect"])
    batch: int = 64
    seeds: int = 40
    at: Literal["fitted", "init"] = "fitted"
    device: str = "auto"
    out: Optional[str] = None


@dataclass(kw_only=True)
class ReportCommand:
    """Which run folder to report on.

    Args:
        run_dir: a folder written by `vtvc fit`.
        overwrite: replace the summary and figures already there.
    """

    run_dir: str = positional()
    overwrite: bool = switch()


SplitName = Literal["train", "val", "test"]


@dataclass(kw_only=True)
class PredictCommand(_Overwrite):
    """Which run predicts what, and where the CSV goes.

    Args:
        run_dir: a folder written by `vtvc fit`.
        data: imagefolder:PATH (any folder of images, read recursively) or a data set spec (its --split).
        split: split of a data set spec (ignored for imagefolder:).
        task: task-addition runs: the task whose classes to predict.
        num_samples: posterior draws for the uncertainty columns (default: the run's eval_samples; 0: none, one composed pass per image where the run reports the one-pass prediction).
        device: cpu, cuda[:N] or auto.
        out: output CSV file.
    """

    run_dir: str = positional()
    data: str
    split: SplitName = "test"
    task: Optional[str] = None
    num_samples: Optional[int] = None
    device: str = "cpu"
    out: str


@dataclass(kw_only=True)
class CurvesCommand(_Overwrite):
    """Where the few-shot runs are, and where their curves go.

    Args:
        root: run folders laid out ROOT/<target>/k<K>/s<seed> (kall: every learning image), from vtvc fit --shots K.
        out: write OUT.md and OUT.png (default: print the Markdown only).
    """

    root: str = positional()
    out: Optional[str] = None


@dataclass(kw_only=True)
class TableCommand(_Overwrite):
    """Which run folders to tabulate, and where.

    Args:
        run_dirs: folders written by `vtvc fit` (one protocol; seeds are averaged).
        reference: add published rows of this model (ViT-B-32, ViT-B-16, ViT-L-14) for the data sets the runs have.
        out: write OUT.md and OUT.csv (default: print the Markdown only).
    """

    run_dirs: list[str] = positional()
    reference: Optional[str] = None
    out: Optional[str] = None


@dataclass(kw_only=True)
class ExportCommand(_Quiet, _Overwrite):
    """Which run to export, and where.

    Args:
        run_dir: a folder written by `vtvc fit`.
        out: output folder for open_clip.create_model_and_transforms('local-dir:OUT'), or a .safetensors file (state dict only).
        split: split whose posterior mean is exported.
        evaluate: folder export: score the exported model on the test split for the model card.
    """

    run_dir: str = positional()
    out: str
    split: SplitName = "test"
    evaluate: bool = True


@dataclass(kw_only=True)
class BankBuildCommand(_Quiet, _Overwrite, BuildConfig):
    """Settings of the embedded bank (BuildConfig) and where it goes.

    Args:
        out: bank folder (a complete one is reused unless --overwrite).
    """

    out: Optional[str] = DEFAULT_BANK


@dataclass(kw_only=True)
class BankImportCommand(_Quiet, _Overwrite):
    """What to import, and where the bank goes.

    Args:
        arch: open_clip architecture, e.g. ViT-B-32-quickgelu.
        base: open_clip weights of the pre-trained CLIP (.pt/.bin/.safetensors).
        checkpoints: task_vectors/aTLAS folder: zeroshot.pt and <Task>[Val]/[nonlinear_]finetuned.pt.
        finetuned: more checkpoints, {NAME: PATH, ...}.
        zeroshot: the zero-shot image encoder the vectors are relative to.
        hf_vision: Hugging Face CLIPVisionModel folders or cached hub ids, one per task (NAME=DIR_OR_ID to name one; safetensors only); repeat the flag or give a list.
        hf_base: the Hugging Face CLIP (folder or cached hub id) the --hf_vision vectors are relative to.
        tasks: import only these tasks.
        trust_pickle: allow reading pickled checkpoints (runs code from the file: only for sources you trust).
        dtype: task-vector storage dtype.
        out: bank folder to write.
    """

    arch: str
    base: Optional[str] = None
    checkpoints: Optional[str] = None
    finetuned: dict[str, str] = field(default_factory=dict)
    zeroshot: Optional[str] = None
    hf_vision: list[str] = field(default_factory=list)
    hf_base: Optional[str] = None
    tasks: Optional[list[str]] = None
    trust_pickle: bool = switch()
    dtype: StorageDtype = "float32"
    out: str


@dataclass(kw_only=True)
class BankTruncateCommand(_Overwrite):
    """How to truncate a bank, and what to report.

    Args:
        bank: bank folder.
        rank: singular directions kept per matrix.
        energy: or the fraction of squared singular values kept.
        dtype: storage dtype.
        out: write the low-rank bank here (.safetensors).
        report: ranks to evaluate, e.g. [2,4,8,16].
        report_energy: kept energies to evaluate, e.g. [0.5,0.9].
        report_out: write the report here (JSON).
    """

    bank: str = DEFAULT_BANK
    rank: Optional[int] = None
    energy: Optional[float] = None
    dtype: Optional[StorageDtype] = None
    out: Optional[str] = None
    report: list[int] = field(default_factory=list)
    report_energy: list[float] = field(default_factory=list)
    report_out: Optional[str] = None


# `bank finetune` and `bank pretrain` are the embedded bank's two stages one at a time: their defaults are BuildConfig's
@dataclass(kw_only=True)
class BankFinetuneCommand(_Quiet, _Overwrite):
    """One fine-tuning run (defaults: the embedded bank's, BuildConfig).

    Args:
        base: base CLIP weights (.safetensors, .pt) or an open_clip tag.
        arch: open_clip architecture.
        data: data set spec (suite name or imagefolder:PATH).
        name: task name stored in the file.
        steps: fine-tuning steps.
        batch_size: images per step.
        lr: learning rate.
        dtype: storage dtype.
        seed: seed of the data pools and the optimiser.
        out: task-vector file (.safetensors).
    """

    base: str
    arch: str = BuildConfig.arch
    data: str
    name: Optional[str] = None
    steps: int = BuildConfig.finetune_steps
    batch_size: int = BuildConfig.batch_size
    lr: float = BuildConfig.finetune_lr
    dtype: StorageDtype = BuildConfig.dtype
    seed: int = BuildConfig.seed
    out: str


@dataclass(kw_only=True)
class BankPretrainCommand(_Quiet, _Overwrite):
    """The pretraining run (defaults: the embedded bank's, BuildConfig).

    Args:
        arch: open_clip architecture.
        steps: pretraining steps.
        batch_size: images per step.
        lr: learning rate.
        seed: seed of the corpus and the optimiser.
        out: weights file (.safetensors).
    """

    arch: str = BuildConfig.arch
    steps: int = BuildConfig.pretrain_steps
    batch_size: int = BuildConfig.batch_size
    lr: float = BuildConfig.pretrain_lr
    seed: int = BuildConfig.seed
    out: Optional[str] = "base.safetensors"


@dataclass(kw_only=True)
class DataCheckCommand:
    """Which data sets to check, and where.

    Args:
        root: data root.
        datasets: only these (default all 8).
        download: let torchvision download what it can.
    """

    root: str
    datasets: Optional[list[str]] = None
    download: bool = switch()
