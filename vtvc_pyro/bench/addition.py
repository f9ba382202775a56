"""Benchmark task addition: one VTVC SVI step against one aTLAS step on the same batch.

In one process and on the same inputs, for ViT-B/32 geometry (random weights, ``--layers`` of its
12 blocks) or the tiny model: T tasks with the class counts of the 8 standard ones (SUN397 397,
Cars 196, RESISC45 45, EuroSAT 10, SVHN 10, GTSRB 43, MNIST 10, DTD 47; repeated past 8), their
random unit-norm heads (× 100 logit scale) stacked into one ``[C, D]`` matrix, and a batch whose
images belong to the tasks round robin, each scored against its own task's columns
(:mod:`vtvc_pyro.compose.heads`). Per bank (dense ``[T, *shape]`` and rank ``--rank`` factors,
as in :mod:`vtvc_pyro.bench.composition`) and batch size it times

- ``atlas``: one shared λ ``[T, G]`` for the batch, masked cross-entropy, backward (the aTLAS step);
- ``vtvc K=k``: the hierarchical model with the amortized gated guide, routing, spike-and-slab
  prior and K = k global compositions; the ELBO (``TraceEnum_ELBO`` for K > 1, which runs the
  composed tower once per component and image) and its backward (the SVI step without the
  optimiser update).

and, once per model and batch, the two base passes that a step's cost is read against: ``base``
(open_clip's module with θ0, forward and backward to the input) and ``engine base`` (the same
through the engine's functional forward, which is faster than open_clip's attention on CPU, so
"× base" alone would flatter every engine step).

Each row reports the median of ``--repeats`` steps after ``--warmup`` untimed ones, its ratio to
the aTLAS step of the same bank and batch and to both base passes, and the peak memory growth
during the timed steps (:class:`~vtvc_pyro.bench.composition.PeakMemory`; weights and task vectors
are resident before).

Usage::

    vtvc bench addition --models '[vit-b-32]' --batch '[8]' --components '[1,4]' --out addition.json
"""

import json
import statistics
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

from ..bank.task_vectors import DTYPES
from ..bayes.priors import make_prior
from ..bayes.registry import make_vtvc
from ..bayes.svi import image_only
from ..compose.engine import Composer
from ..compose.heads import TaskHeads, class_logits
from ..errors import ConfigError
from ..io import write_json
from .composition import PeakMemory, build_visual, machine, measure, passes, random_banks

TASK_CLASSES = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10,
                "DTD": 47}
"""The 8 standard tasks of task addition and their class counts."""

NUM_DATA = 1000  # the ELBO's data-set size (scales the likelihood; the cost does not depend on it)
KL_WEIGHT = 0.01
TEMPERATURE = 0.5


def task_heads(tasks: int, dim: int, device: torch.device) -> TaskHeads:
    """Random unit-norm heads × 100 of ``tasks`` tasks with the standard class counts (cycled past 8)."""
    gen = torch.Generator().manual_seed(3)
    names = [list(TASK_CLASSES)[t % len(TASK_CLASSES)] for t in range(tasks)]
    heads = [F.normalize(torch.randn(TASK_CLASSES[n], dim, generator=gen), dim=-1) * 100 for n in names]
    return TaskHeads([f"{n}#{t}" for t, n in enumerate(names)], heads).to(device)


def addition_batch(heads: TaskHeads, batch: int, size: int, dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of task addition: ``images [B, 3, S, S]``, base ``features [B, D]``, labels ``[B]`` (columns
    of the stacked head) and ``classes [B, C]`` (each image's own task's columns); tasks round robin."""
    gen = torch.Generator().manual_seed(0)
    task = torch.arange(batch) % len(heads.heads)
    local = torch.stack([torch.randint(heads.heads[t].shape[0], (), generator=gen) for t in task.tolist()])
    return {"images": torch.randn(batch, 3, size, size, generator=gen).to(device),
            "features": F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(device),
            "labels": heads.global_labels(task, local).to(device),
            "classes": heads.classes_for(task).to(device)}


def atlas_step(composer: Composer, heads: TaskHeads, data: dict):
    """The aTLAS step: one λ ``[T, G]`` for the batch, masked cross-entropy, backward."""
    lam = torch.zeros(composer.num_tasks, composer.num_groups, device=data["images"].device, requires_grad=True)
    head = heads.weight

    def step():
        lam.grad = None
        logits = class_logits(composer.shared(data["images"], lam), head, data["classes"])
        F.cross_entropy(logits, data["labels"]).backward()
    return step, lam.numel()


def vtvc_step(composer: Composer, heads: TaskHeads, data: dict, components: int):
    """The SVI step of task addition: the hierarchical model's ELBO and its backward (no optimiser update)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dim = data["features"].shape[1]
    model, guide = make_vtvc("hierarchical", "amortized_gated", composer, heads.weight, make_prior("spike_slab"), dim,
                             components=components, routing=True, slab_mean_init=0.3, gate_logit_init=3.0)
    guide.to(data["images"].device)
    elbo = pyro.infer.TraceEnum_ELBO if components > 1 else pyro.infer.Trace_ELBO
    loss_fn = elbo(max_plate_nesting=1)(model, image_only(guide))

    def step():
        guide.zero_grad(set_to_none=True)
        loss_fn(data["images"], data["features"], data["labels"], num_data=NUM_DATA, kl_weight=KL_WEIGHT,
                temperature=TEMPERATURE, classes=data["classes"]).backward()
    return step, sum(p.numel() for p in guide.parameters())  # the guide's: what SVI learns


def bench(args) -> dict:
    device = torch.device(args.device)
    memory = PeakMemory(device)  # first: it pins glibc's mmap threshold before the big allocations
    steps = ["atlas", *[f"vtvc K={k}" for k in args.components]]
    rows = []
    for model in args.models:
        visual = build_visual(model, args.layers, device)
        size, dim = visual.image_size[0], visual.output_dim
        dense_all, low_all = random_banks(visual, args.tasks, args.rank, DTYPES[args.dtype])
        heads = task_heads(args.tasks, dim, device)
        for batch in args.batch:
            data = addition_batch(heads, batch, size, dim, device)
            bases = {}
            for name, strategy in (("base", "base"), ("engine base", "functional")):
                _, fwd_bwd, _ = passes(strategy, visual, None, None, data["images"], args.tasks)
                bases[name], peak = measure(fwd_bwd, device, args.repeats, args.warmup, memory, reduce=statistics.median)
                rows.append(_row(args, model, visual, heads, batch, "-", None, name, None, bases[name], None, bases, peak, 0))
            for kind in args.banks:
                bank = low_all if kind == "lowrank" else dense_all
                composer = Composer(visual, bank, "block")
                atlas = None
                for name in steps:
                    k = int(name.split("=")[1]) if name.startswith("vtvc") else None
                    step, learned = atlas_step(composer, heads, data) if k is None else vtvc_step(composer, heads, data, k)
                    seconds, peak = measure(step, device, args.repeats, args.warmup, memory, reduce=statistics.median)
                    atlas = atlas or seconds
                    rows.append(_row(args, model, visual, heads, batch, kind, bank, name, k, seconds, atlas, bases, peak,
                                     learned))
                del composer
            if not args.quiet:
                for row in rows[-(2 + len(args.banks) * len(steps)):]:
                    print(format_row(row), flush=True)
        del dense_all, low_all
    return {"meta": environment(args), "rows": rows}


def _row(args, model: str, visual, heads: TaskHeads, batch: int, kind: str, bank, step: str, k: int | None,
         seconds: float, atlas: float | None, bases: dict[str, float], peak: float | None, learned: int) -> dict:
    """One row: a step (or a base pass: ``bank`` ``-``) and its ratios to aTLAS and to both base passes."""
    def ratio(ref):
        return None if ref is None else round(seconds / ref, 2)
    return {
        "model": model, "layers": len(visual.transformer.resblocks), "tasks": args.tasks,
        "classes": heads.weight.shape[0], "batch": batch, "bank": kind,
        "rank": args.rank if kind == "lowrank" else None, "dtype": args.dtype, "step": step,
        "components": k, "step_s": round(seconds, 4), "ratio_to_atlas": ratio(atlas),
        "ratio_to_base": ratio(bases.get("base")), "ratio_to_engine_base": ratio(bases.get("engine base")),
        "peak_mib": None if peak is None else round(peak, 1),
        "task_vectors_mib": 0.0 if bank is None else round(bank.storage_bytes() / 2**20, 1), "learned_params": learned,
    }


# ---------------------------------------------------------------- reporting
HEADER = (f"{'model':9s} {'L':>2s} {'T':>2s} {'C':>4s} {'B':>3s} {'bank':8s} {'step':11s} {'step s':>8s} "
          f"{'×aTLAS':>6s} {'×base':>6s} {'×engine':>7s} {'peak MiB':>9s} {'TV MiB':>7s}")


def _fmt(value, spec: str, dash: str = "-") -> str:
    return dash if value is None else format(value, spec)


def format_row(r: dict) -> str:
    return (f"{r['model']:9s} {r['layers']:2d} {r['tasks']:2d} {r['classes']:4d} {r['batch']:3d} {r['bank']:8s} "
            f"{r['step']:11s} {r['step_s']:8.3f} {_fmt(r['ratio_to_atlas'], '.2f'):>6s} "
            f"{_fmt(r.get('ratio_to_base'), '.2f'):>6s} {_fmt(r.get('ratio_to_engine_base'), '.2f'):>7s} "
            f"{_fmt(r['peak_mib'], '.0f'):>9s} {r['task_vectors_mib']:7.0f}")


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (for docs/benchmarks.md)."""
    lines = ["| model | blocks | T | classes | batch | bank | step | s / step | × aTLAS | × base (open_clip) | "
             "× base (engine) | peak growth MiB | task vectors MiB |",
             "|---|--:|--:|--:|--:|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        bank = {"lowrank": f"low-rank r = {r['rank']}", "-": "–"}.get(r["bank"], f"dense {r['dtype']}")
        lines.append(f"| {r['model']} | {r['layers']} | {r['tasks']} | {r['classes']} | {r['batch']} | {bank} | "
                     f"{r['step']} | {r['step_s']:.3f} | {_fmt(r['ratio_to_atlas'], '.2f', '–')} | "
                     f"{_fmt(r.get('ratio_to_base'), '.2f', '–')} | {_fmt(r.get('ratio_to_engine_base'), '.2f', '–')} | "
                     f"{_fmt(r['peak_mib'], '.0f', '–')} | {r['task_vectors_mib']:.0f} |")
    return "\n".join(lines)


def environment(args) -> dict:
    return {**machine(args.device), "pyro": pyro.__version__, "repeats": args.repeats, "warmup": args.warmup,
            "dtype": args.dtype, "rank": args.rank, "num_data": NUM_DATA, "kl_weight": KL_WEIGHT,
            "temperature": TEMPERATURE}


def main(args):
    unknown = [b for b in args.banks if b not in ("dense", "lowrank")]
    if unknown:
        raise ConfigError(f"unknown bank {unknown[0]!r}: use dense and/or lowrank")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} but CUDA is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:  # re-render a saved run
        print(markdown(json.loads(Path(args.from_json).read_text())["rows"]))
        return
    if not args.quiet:
        print(HEADER, flush=True)
    result = bench(args)
    if args.markdown:
        print(markdown(result["rows"]))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
