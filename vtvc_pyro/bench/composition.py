"""Benchmark per-sample composition: every strategy against one base pass and the naive per-sample loop.

In one process and on the same inputs, for ViT-B/32 geometry (random weights, ``--layers`` of
its 12 blocks) and the tiny model: the base forward and forward+backward (gradient to the input),
then every strategy's forward (no grad) and forward+backward (gradient to λ), for each number of
tasks ``T`` and batch size. Task vectors are random: dense ``[T, *shape]`` for the full-rank
strategies and the naive loop, rank ``--rank`` factors for ``lowrank`` (and ``naive-lowrank``,
the naive loop on that low-rank bank). Coefficients are per (sample, task, block).

Peak memory is the growth of the process's resident set during a measurement (CPU: Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with glibc's mmap threshold pinned
at 1 MiB so freed tensors leave the resident set; CUDA: ``torch.cuda.max_memory_allocated``).
Weights and task vectors are resident before and not counted.

Usage::

    vtvc bench composition --models '[vit-b-32]' --tasks '[8]' --batch '[32]' --out bench.json
"""

import ctypes
import datetime
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from .. import backbone
from ..bank.low_rank import LowRankBank, is_matrix_block
from ..bayes.guide import AmortizedGatedGuide
from ..bayes.priors import make_prior
from ..bank.task_vectors import DTYPES, TaskVectorBank
from ..compose.engine import Composer, vit_forward
from ..errors import ConfigError
from ..io import write_json

STRATEGIES = ("base", "functional", "lowrank", "materialize", "linear", "auto", "shared", "naive", "naive-lowrank",
              "predict")
SCALE = 0.01  # task-vector entries, about what fine-tuning moves ViT weights


# ---------------------------------------------------------------- memory
class PeakMemory:
    """Growth of memory in use during a block of code, on CPU (Linux) or CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = device.type == "cpu" and Path("/proc/self/clear_refs").exists()
        if self.cpu_ok:
            try:  # glibc: large frees go back to the OS, so the resident set follows the live tensors
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
            except OSError:
                self.cpu_ok = False

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            gc.collect()
            self.libc.malloc_trim(0)  # hand back free heap pages, or the next run reuses them unseen
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
            self.before = self._status("VmRSS")

    def stop(self) -> float | None:
        """Peak growth in MiB (``None`` where it cannot be measured)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20
        if self.cpu_ok:
            return (self._status("VmHWM") - self.before) / 2**20
        return None


# ---------------------------------------------------------------- models and banks
def build_visual(model: str, layers: int, device: torch.device) -> torch.nn.Module:
    """A random-weight image tower: ViT-B/32 geometry with ``layers`` blocks, or the tiny model."""
    torch.manual_seed(0)
    if model == "tiny":
        clip = backbone.create_clip(backbone.TINY_MODEL)
    else:
        vision = {"image_size": 224, "patch_size": 32, "width": 768, "layers": layers, "head_width": 64}
        text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
        clip = open_clip.CLIP(embed_dim=512, vision_cfg=vision, text_cfg=text)
    visual = clip.visual.float().eval().to(device)
    for p in visual.parameters():  # the base pass differentiates to the input only, like the strategies to λ
        p.requires_grad_(False)
    return visual


def random_banks(visual: torch.nn.Module, tasks: int, rank: int, dtype: torch.dtype) -> tuple[TaskVectorBank, LowRankBank]:
    """Dense ``[T, *shape]`` task vectors and independent rank-``rank`` factors of the same tower."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    device = next(visual.parameters()).device
    base = {n: p.detach() for n, p in visual.named_parameters()}
    dense, low_dense, factors = {}, {}, {}
    for name, p in base.items():
        dense[name] = (SCALE * torch.randn(tasks, *p.shape, generator=gen)).to(device, dtype)
        if is_matrix_block(name, p.shape):
            out, inn = p.shape[0], p[0].numel()
            r = min(rank, out, inn)
            # U V has entries of about SCALE, like the dense vectors
            u = torch.randn(tasks, out, r, generator=gen) * (SCALE / r**0.5)
            factors[name] = (u.to(device, dtype), torch.randn(tasks, r, inn, generator=gen).to(device, dtype))
        else:
            low_dense[name] = dense[name]
    shapes = {n: tuple(p.shape) for n, p in base.items()}
    return (TaskVectorBank("bench", [f"t{i}" for i in range(tasks)], base, dense),
            LowRankBank("bench", [f"t{i}" for i in range(tasks)], base, low_dense, factors, shapes))


def sliced(bank, tasks: int):
    """The first ``tasks`` vectors of a bank (views, no copies)."""
    if isinstance(bank, LowRankBank):
        return LowRankBank(bank.arch, bank.tasks[:tasks], bank.base, {k: v[:tasks] for k, v in bank.dense.items()},
                           {k: (u[:tasks], v[:tasks]) for k, (u, v) in bank.factors.items()}, bank.shapes)
    return TaskVectorBank(bank.arch, bank.tasks[:tasks], bank.base, {k: v[:tasks] for k, v in bank.deltas.items()})


# ---------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int, warmup: int, memory: PeakMemory,
            reduce: Callable[[list[float]], float] = min) -> tuple[float, float | None]:
    """``reduce`` of ``repeats`` timed runs of ``fn()`` after ``warmup`` runs (seconds; by default the
    fastest, as the machine may be shared), and the peak memory growth."""
    for _ in range(warmup):
        fn()
    times = []
    memory.start()
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return reduce(times), memory.stop()


def passes(strategy: str, visual, dense, low, images: torch.Tensor, tasks: int, naive_backward: str = "per-sample"):
    """``(forward, forward+backward, composer)`` of one strategy (``composer`` is ``None`` for the base)."""
    m = images.shape[0]
    if strategy == "base":
        def fwd():
            with torch.no_grad():
                visual(images)

        def fwd_bwd():
            x = images.detach().requires_grad_(True)
            visual(x).sum().backward()
        return fwd, fwd_bwd, None
    if strategy == "functional":  # the engine's own forward with θ0 alone: its overhead over open_clip's module
        params = dict(visual.named_parameters())

        def fwd():
            with torch.no_grad():
                vit_forward(visual, params, images)

        def fwd_bwd():
            x = images.detach().requires_grad_(True)
            vit_forward(visual, params, x).sum().backward()
        return fwd, fwd_bwd, None
    if strategy == "predict":
        return (*prediction_pass(visual, low, images, tasks), None)
    bank = low if strategy in ("lowrank", "naive-lowrank") else dense
    composer = Composer(visual, bank, "block")
    gen = torch.Generator(device="cpu").manual_seed(2)
    lam = torch.randn(m, tasks, composer.num_groups, generator=gen).to(images.device)
    if strategy == "shared":
        lam = lam[0]

        def run(c):
            return composer.shared(images, c)
    elif strategy.startswith("naive"):
        def run(c):
            return composer.naive_per_sample(images, c)
    else:
        how = "lowrank" if strategy == "lowrank" else strategy

        def run(c):
            return composer.per_sample(images, c, strategy=how)

    def fwd():
        with torch.no_grad():
            run(lam)

    def fwd_bwd():
        c = lam.detach().requires_grad_(True)
        if strategy.startswith("naive") and naive_backward == "per-sample":
            # compose, forward and backward one sample at a time (gradients accumulate in c.grad):
            # a batched backward would keep every sample's composed tower alive at once
            for i in range(m):
                composer.shared(images[i : i + 1], c[i]).sum().backward()
        else:
            run(c).sum().backward()
    return fwd, fwd_bwd, composer


def prediction_pass(visual, low, images: torch.Tensor, tasks: int):
    """``(forward, forward)`` of VTVC's one-pass prediction on the low-rank bank: the base features
    the guide reads, the flat guide's gated posterior mean (its MLP), and one per-sample composed
    pass. There is no backward at prediction: both timings are the forward."""
    composer = Composer(visual, low, "block")
    guide = AmortizedGatedGuide(visual.output_dim, tasks, composer.num_groups, make_prior("spike_slab"),
                                component_scale=composer.component_scales()).to(images.device).eval()

    def fwd():
        with torch.no_grad():
            features = visual(images)
            composer.per_sample(images, guide.mean_coefficients(features), strategy="lowrank")
    return fwd, fwd


def bench(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    memory = PeakMemory(device)
    rows = []
    for model in args.models:
        visual = build_visual(model, args.layers, device)
        size = visual.image_size[0]
        dense_all, low_all = random_banks(visual, max(args.tasks), args.rank, dtype)
        weights_mb = sum(p.numel() * 4 for p in visual.parameters()) / 2**20
        for batch in args.batch:
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            for tasks in args.tasks:
                dense, low = sliced(dense_all, tasks), sliced(low_all, tasks)
                base = None
                for strategy in ["base", *[s for s in args.strategies if s != "base"]]:
                    # the naive loops run M small passes: long enough that a warm-up run changes nothing
                    warmup = 0 if strategy.startswith("naive") else args.warmup
                    f, fb, composer = passes(strategy, visual, dense, low, images, tasks, args.naive_backward)
                    repeats = args.tiny_repeats if model == "tiny" else args.repeats
                    fwd_t = measure(f, device, repeats, warmup, memory)
                    fwd_bwd_t = measure(fb, device, repeats, warmup, memory)
                    base = base or {"fwd": fwd_t, "fwd_bwd": fwd_bwd_t}  # measured again per cell: ratios stay local in time
                    if strategy not in args.strategies:
                        continue
                    # kept across calls: resident, so not in the growth; counted apart
                    workspace = composer._workspace.numel() * 4 / 2**20 if composer is not None and composer._workspace is not None else 0.0
                    bank = low if strategy in ("lowrank", "naive-lowrank", "predict") else dense
                    row = {
                        "model": model, "layers": len(visual.transformer.resblocks), "tasks": tasks, "batch": batch,
                        "strategy": strategy, "rank": args.rank if bank is low else None,
                        "fwd_s": round(fwd_t[0], 5), "fwd_ratio": round(fwd_t[0] / base["fwd"][0], 3),
                        "fwd_bwd_s": round(fwd_bwd_t[0], 5),
                        "fwd_bwd_ratio": round(fwd_bwd_t[0] / base["fwd_bwd"][0], 3),
                        "fwd_peak_mib": None if fwd_t[1] is None else round(fwd_t[1], 1),
                        "fwd_bwd_peak_mib": None if fwd_bwd_t[1] is None else round(fwd_bwd_t[1], 1),
                        "weights_mib": round(weights_mb, 1),
                        "task_vectors_mib": 0.0 if strategy in ("base", "functional") else round(bank.storage_bytes() / 2**20, 1),
                        "workspace_mib": round(workspace, 1),
                    }
                    rows.append(row)
                    if not args.quiet:
                        print(format_row(row), flush=True)
        del dense_all, low_all
    return {"meta": environment(args), "rows": rows, "targets": targets(rows)}


# ---------------------------------------------------------------- reporting
HEADER = (f"{'model':9s} {'L':>2s} {'T':>3s} {'M':>3s} {'strategy':14s} {'fwd s':>8s} {'×base':>6s} "
          f"{'fwd+bwd s':>9s} {'×base':>6s} {'peak MiB':>9s} {'work MiB':>8s} {'TV MiB':>8s}")


def format_row(r: dict) -> str:
    peak = "-" if r["fwd_bwd_peak_mib"] is None else f"{r['fwd_bwd_peak_mib']:.0f}"
    return (f"{r['model']:9s} {r['layers']:2d} {r['tasks']:3d} {r['batch']:3d} {r['strategy']:14s} "
            f"{r['fwd_s']:8.3f} {r['fwd_ratio']:6.2f} {r['fwd_bwd_s']:9.3f} {r['fwd_bwd_ratio']:6.2f} "
            f"{peak:>9s} {r['workspace_mib']:8.0f} {r['task_vectors_mib']:8.0f}")


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (for docs/benchmarks.md)."""
    lines = ["| model | blocks | T | batch | strategy | fwd s | × base | fwd+bwd s | × base | peak growth MiB | workspace MiB | task vectors MiB |",
             "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        peak = "–" if r["fwd_bwd_peak_mib"] is None else f"{r['fwd_bwd_peak_mib']:.0f}"
        lines.append(f"| {r['model']} | {r['layers']} | {r['tasks']} | {r['batch']} | {r['strategy']} | {r['fwd_s']:.3f} | "
                     f"{r['fwd_ratio']:.2f} | {r['fwd_bwd_s']:.3f} | {r['fwd_bwd_ratio']:.2f} | {peak} | "
                     f"{r['workspace_mib']:.0f} | {r['task_vectors_mib']:.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> dict:
    """The issue's targets, where the grid has their cells (ViT-B/32 geometry, T = 8, batch 32)."""
    def get(strategy, tasks=8, batch=32):
        for r in rows:
            if (r["model"], r["strategy"], r["tasks"], r["batch"]) == ("vit-b-32", strategy, tasks, batch):
                return r
        return None

    out = {}
    low, mat, base, naive = get("lowrank"), get("materialize"), get("base"), get("naive-lowrank") or get("naive")
    if low:
        out["lowrank_fwd_bwd_le_1.3x_base"] = [low["fwd_bwd_ratio"], low["fwd_bwd_ratio"] <= 1.3]
        out["lowrank_fwd_le_1.2x_base"] = [low["fwd_ratio"], low["fwd_ratio"] <= 1.2]
    if mat:
        out["materialize_fwd_bwd_le_3x_base"] = [mat["fwd_bwd_ratio"], mat["fwd_bwd_ratio"] <= 3]
    if low and naive:
        speedup = round(naive["fwd_bwd_s"] / low["fwd_bwd_s"], 2)
        out[f"lowrank_ge_3x_faster_than_{naive['strategy']}_fwd_bwd"] = [speedup, speedup >= 3]
    low2, low16 = get("lowrank", 2), get("lowrank", 16)
    if low2 and low16:
        growth = round(low16["fwd_bwd_s"] / low2["fwd_bwd_s"], 3)
        out["lowrank_T16_over_T2_fwd_bwd_le_1.5"] = [growth, growth <= 1.5]
    if mat and base and mat["fwd_bwd_peak_mib"] is not None:
        # absolute peaks: weights + task vectors + workspace + growth; base: weights + its growth
        limit = 1.25 * (base["weights_mib"] + base["fwd_bwd_peak_mib"] + mat["task_vectors_mib"])
        used = mat["weights_mib"] + mat["task_vectors_mib"] + mat["workspace_mib"] + mat["fwd_bwd_peak_mib"]
        out["materialize_peak_le_base_peak_plus_tv_plus_25pct"] = [round(used / limit * 1.25, 3), used <= limit]
    return out


def machine(device: str) -> dict:
    """What a benchmark ran on: the command, the device (GPU name, or CPU model and torch threads),
    torch and Python versions, and the date (UTC)."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{cpu}, {torch.get_num_threads()} threads"
    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": name, "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def environment(args) -> dict:
    return {**machine(args.device), "naive_backward": args.naive_backward, "repeats": args.repeats,
            "tiny_repeats": args.tiny_repeats, "warmup": args.warmup, "dtype": args.dtype, "rank": args.rank}


def main(args):
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r}: use some of {', '.join(STRATEGIES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} but CUDA is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:  # re-render a saved run
        result = json.loads(Path(args.from_json).read_text())
        print(markdown(result["rows"]))
        return
    if not args.quiet:
        print(HEADER, flush=True)
    result = bench(args)
    if args.markdown:
        print(markdown(result["rows"]))
    for name, (value, ok) in result["targets"].items():
        print(f"target {name}: {value} {'met' if ok else 'NOT met'}")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
