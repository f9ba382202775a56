"""Export a composed model as open_clip weights: a ``local-dir:`` folder, or one state-dict file.

A composed model is the base CLIP with its image tower replaced by θ0 + Σ_t λ_{t,g(b)} τ_{t,b}
for one batch-shared ``λ [T, G]``: learned shared coefficients (aTLAS-style, task arithmetic), or
the posterior mean of a fitted VTVC guide over a data set, λ̄ = mean_i E_q[λ_i]. The text tower and
logit scale are kept, so the export is a complete CLIP usable for zero-shot classification.

A folder holds ``open_clip_config.json`` (the whole model config and the preprocess config),
``open_clip_model.safetensors`` and a ``README.md`` model card, so a process that never imports
``vtvc_pyro`` loads it with open_clip alone.

Usage::

    export_composed("composed.safetensors", bank.model, bank.vectors, lam, "block")
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained="composed.safetensors")

    export_folder("composed", bank.model, bank.vectors, lam, "block")
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:composed")
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import open_clip
import torch

from ..bank.task_vectors import TaskVectorBank
from ..compose.engine import Composer
from ..errors import ConfigError
from ..io import atomic_write, default_mode, save_safetensors, write_json
from ..methods.merges import predict_shared
from ..run_folder import RunFolder
from .fit import protocol_for
from .fitting import fit_config_of, load_guide_from_run

log = logging.getLogger(__name__)

FORMAT = "vtvc-composed-open-clip/1"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the name open_clip's local-dir loader prefers
CONFIG_FILE = "open_clip_config.json"
CARD_FILE = "README.md"


def composed_state_dict(model: torch.nn.Module, bank: TaskVectorBank, lam: torch.Tensor,
                        granularity: str = "block") -> dict[str, torch.Tensor]:
    """The whole CLIP state dict with ``visual.*`` composed from ``lam [T, G]`` (float32, CPU)."""
    composer = Composer(model.visual, bank, granularity)
    expected = (composer.num_tasks, composer.num_groups)
    if tuple(lam.shape) != expected:
        raise ConfigError(f"coefficients must be [T, G] = {list(expected)} for granularity {granularity!r}, "
                          f"got {list(lam.shape)}")
    with torch.no_grad():
        composed = composer.composed_params(lam.to(next(model.parameters()).device))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for name, value in composed.items():
        state[f"visual.{name}"] = value.detach().float().cpu()
    return state


def export_composed(path: str | Path, model: torch.nn.Module, bank: TaskVectorBank, lam: torch.Tensor,
                    granularity: str = "block", metadata: dict | None = None) -> Path:
    """Write the composed CLIP to ``path`` (``.safetensors``, atomically) with provenance metadata.

    The tensor names are open_clip's own, so ``open_clip.create_model(arch, pretrained=path)`` loads
    it (strict). Metadata: format, arch, base fingerprint, tasks, granularity and ``lam`` as JSON.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"export to a .safetensors file (open_clip reads those), not {path.name}")
    meta = {
        "format": FORMAT,
        "arch": bank.arch,
        "base_fingerprint": bank.base_fingerprint,
        "tasks": json.dumps(list(bank.tasks)),
        "granularity": granularity,
        "lam": json.dumps([[round(float(v), 7) for v in row] for row in lam.detach().cpu()]),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    save_safetensors(composed_state_dict(model, bank, lam, granularity), path, meta)
    log.info("wrote composed %s model to %s", bank.arch, path)
    return path


def open_clip_config(model: torch.nn.Module, arch: str) -> dict:
    """``{"model_cfg", "preprocess_cfg"}`` as open_clip's ``local-dir:`` loader reads them.

    ``model_cfg`` is the architecture's whole config (custom ones such as ``vtvc-tiny`` included), so
    a process where it is not registered builds it; ``preprocess_cfg`` is the model's own transform.
    """
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ConfigError(f"open_clip has no config for architecture {arch!r}: export to a .safetensors file "
                          "instead and load it with that architecture's config")
    preprocess = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    return json.loads(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))  # tuples -> lists


def check_folder(out: Path, overwrite: bool = False) -> bool:
    """Whether ``out`` is a non-empty folder (allowed only with ``overwrite``).

    Raises:
        ConfigError: ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder: pass a new folder to --out (or a .safetensors file)")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not overwrite:
        raise ConfigError(f"{out} is a non-empty folder: pass another --out, or --overwrite to replace the export in it")
    return occupied


def export_folder(out: str | Path, model: torch.nn.Module, bank: TaskVectorBank, lam: torch.Tensor,
                  granularity: str = "block", card: str = "", metadata: dict | None = None,
                  provenance: dict | None = None, overwrite: bool = False) -> Path:
    """Write an open_clip ``local-dir:`` folder: config, composed weights and the model card ``card``.

    The files are written into a temporary folder beside ``out``, which is then renamed to ``out``
    (a missing or empty ``out`` only). A non-empty ``out`` is refused unless ``overwrite``, which
    replaces the three files in it one by one (atomically each) and leaves any other file alone.

    Raises:
        ConfigError: ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    out = Path(out)
    occupied = check_folder(out, overwrite)
    config = {**open_clip_config(model, bank.arch), "vtvc": provenance or {}}

    def write_into(folder: Path) -> None:
        export_composed(folder / WEIGHTS_FILE, model, bank, lam, granularity, metadata)
        write_json(folder / CONFIG_FILE, config)
        atomic_write(folder / CARD_FILE, lambda tmp: tmp.write_text(card, encoding="utf-8"))

    if occupied:
        write_into(out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            write_into(tmp)
            tmp.chmod(default_mode(folder=True))  # mkdtemp makes it private
            os.replace(tmp, out)  # replaces an empty folder too
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("wrote open_clip folder %s", out)
    return out


# ---------------------------------------------------------------- the model card
def command_line(argv: list[str] | None = None) -> str:
    """``sys.argv`` as a command to paste into a shell (``python`` before a script path)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = argv[0]
    if head.endswith("__main__.py"):
        prefix = ["python", "-m", Path(head).parent.name]
    elif head.endswith(".py"):
        prefix = ["python", head]
    else:
        prefix = [Path(head).name]
    return shlex.join(prefix + argv[1:])


def _fmt(value) -> str:
    return "–" if value is None else f"{float(value):.4f}"


def metrics_table(metrics: dict) -> list[str]:
    """Markdown lines: the run's test accuracies per method, from either ``metrics.json`` layout.

    Transfer runs hold ``methods[m]["accuracy"]`` (and ``interval95``); addition runs hold
    ``methods[m]["average"]``, ``["per_task"]`` and ``["normalized_average"]``.
    """
    methods = metrics.get("methods") or {}
    own = ("vtvc", "vtvc_mean", "vtvc_mc")
    order = [m for m in own if m in methods] + [m for m in methods if m not in own]
    addition = metrics.get("protocol") == "addition" or any("average" in m for m in methods.values())
    if addition:
        tasks = list(metrics.get("tasks") or next((list(m["per_task"]) for m in methods.values() if "per_task" in m), []))
        lines = ["| method | average accuracy | normalized average | " + " | ".join(tasks) + " |",
                 "|---|---:|---:|" + "---:|" * len(tasks)]
        for name in order:
            m = methods[name]
            per_task = m.get("per_task", {})
            cells = [_fmt((m.get("average") or {}).get("accuracy")), _fmt(m.get("normalized_average"))]
            cells += [_fmt(per_task.get(t, {}).get("accuracy")) for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return lines
    lines = ["| method | test accuracy | 95 % interval | NLL | ECE |", "|---|---:|---|---:|---:|"]
    for name in order:
        m = methods[name]
        low_high = (m.get("interval95") or {}).get("accuracy")
        interval = f"[{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else "–"
        lines.append(f"| {name} | {_fmt(m.get('accuracy'))} | {interval} | {_fmt(m.get('nll'))} | {_fmt(m.get('ece'))} |")
    return lines


def model_card(info: dict) -> str:
    """The ``README.md`` of an exported folder (Markdown with a Hugging Face metadata header).

    ``info``: ``arch``, ``base_fingerprint``, ``bank``, ``tasks``, ``lam [T, G]``, ``granularity``,
    ``source`` (how λ̄ was chosen), ``command``; optional ``run``, ``target``, ``protocol``,
    ``metrics`` (the run's metrics.json) and ``exported`` (the exported model's own test metrics).
    """
    lam = torch.as_tensor(info["lam"]).float()
    arch, tasks = info["arch"], list(info["tasks"])
    lines = ["---", "library_name: open_clip", "tags:", "- clip", "- task-vectors", "- vtvc", "---", "",
             f"# {arch} composed from {len(tasks)} task vectors (VTVC)", "",
             "An open_clip CLIP whose image tower is θ0 + Σ_t λ̄_t τ_t: the base model plus a fixed, shared "
             "composition of task vectors. The text tower and logit scale are the base model's.", "",
             "## Base", "",
             f"- architecture: `{arch}` (its whole config is in `{CONFIG_FILE}`)",
             f"- base fingerprint: `{info['base_fingerprint']}`"]
    if info.get("bank"):
        lines.append(f"- task-vector bank: `{info['bank']}`")
    lines += ["", "## Composition", "",
              f"Tasks composed: {', '.join(f'`{t}`' for t in tasks)}. Coefficients per {info['granularity']} "
              f"({lam.shape[1]} per task).", "",
              f"How λ̄ was chosen: {info['source']}.", "",
              "| task | mean λ̄ over blocks | min | max |", "|---|---:|---:|---:|"]
    for t, name in enumerate(tasks):
        row = lam[t]
        lines.append(f"| {name} | {float(row.mean()):+.4f} | {float(row.min()):+.4f} | {float(row.max()):+.4f} |")
    lines += ["", "The full λ̄ is in the weights file's metadata (`lam`, JSON `[T, G]`).", "", "## Metrics", ""]
    if info.get("exported"):
        e = info["exported"]
        lines += [f"This exported model (one shared λ̄ for every image) on {e['where']}: accuracy "
                  f"{_fmt(e['accuracy'])}" + (f", NLL {_fmt(e['nll'])}" if e.get("nll") is not None else "") + ".", ""]
    if info.get("metrics"):
        target = info.get("target") or info["metrics"].get("target")
        run = f" `{info['run']}`" if info.get("run") else ""
        protocol = info.get("protocol") or info["metrics"].get("protocol", "transfer")
        protocol += f", target `{target}`" if target else ""
        lines += [f"The run{run} ({protocol}) on the "
                  "test split. `vtvc` is the run's prediction chosen on val: `vtvc_mean` uses each image's gated "
                  "posterior mean λ (one composed pass) and `vtvc_mc` averages predictions over posterior draws of "
                  "it; neither is this export, which uses one λ̄ for all images.", ""]
        lines += metrics_table(info["metrics"])
        lines.append("")
    else:
        lines += ["No run metrics were recorded with this export.", ""]
    lines += ["## Use", "", "```python", "import open_clip", "",
              'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
              'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")', "```", "",
              "## Reproduce", "", "Exported with:", "", "```bash", info.get("command") or "(no command recorded)",
              "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- from a fitted run
@torch.no_grad()
def posterior_mean_coefficients(guide: torch.nn.Module, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """λ̄ = mean over a data set of the gated posterior means E_q[λ_i]: ``features [N, D]`` -> ``[T, G]``."""
    if len(features) == 0:
        raise ConfigError("no features to average the posterior over: pass a non-empty split")
    guide.eval()
    total = None
    for i in range(0, len(features), batch_size):
        part = guide.mean_coefficients(features[i : i + batch_size]).sum(0)
        total = part if total is None else total + part
    return total / len(features)


def _exported_metrics(protocol, composer: Composer, target, lam: torch.Tensor, progress: bool = False) -> dict:
    """The exported model's own test metrics: one shared ``lam`` for every test image (task addition:
    the average over tasks, each image scored on its own task's classes)."""
    test = target.data["test"]
    probs = predict_shared(composer, target.head, test.images, lam, classes=test.classes, progress=progress,
                           desc="exported model test")
    return protocol.score_test(target, probs)


def export_run(run_dir: str | Path, out: str | Path, split: str = "test", progress: bool = False,
               overwrite: bool = False, command: str | None = None, evaluate: bool = True) -> dict:
    """Export a fitted run's posterior mean over ``split`` as open_clip weights.

    ``out`` ending in ``.safetensors`` is one state-dict file (the caller checks it is free); any
    other ``out`` is an open_clip ``local-dir:`` folder with a model card (:func:`export_folder`).
    Transfer runs average over the target's ``split``; addition runs over the union of their tasks'.

    Args:
        command: the command line recorded in the model card (default: ``sys.argv``).
        evaluate: also score the exported model (one shared λ̄) on the test split, for the card.

    Returns:
        ``{"path", "arch", "tasks", "lam", "folder", "exported"}``.
    """
    run_dir, out = Path(run_dir), Path(out)
    folder = out.suffix != ".safetensors"
    if folder:
        check_folder(out, overwrite)  # before the work, not after
    run = RunFolder(run_dir)
    settings, record = run.read_config()
    run.require(RunFolder.GUIDE, what="it holds no finished fit: run `vtvc fit` first")  # before loading data
    cfg = fit_config_of(settings, str(RunFolder(run_dir).config))
    cfg.device = "cpu"
    protocol = protocol_for(cfg.protocol)
    target = protocol.load(cfg, torch.device("cpu"), progress)
    what = protocol.describe(target, split)
    if record.get("tasks") and list(record["tasks"]) != list(target.tasks):
        raise ConfigError(f"{run_dir} composed {record['tasks']} but its bank now gives {target.tasks}: "
                          "export with the bank the run was fitted on")
    features = target.data[split].features
    bank = target.bank
    composer = Composer(bank.model.visual, bank.vectors, cfg.granularity)
    guide = load_guide_from_run(run_dir, composer, target.head, features.shape[1])
    lam = posterior_mean_coefficients(guide, features)
    source = f"posterior mean over {what} ({len(features)} images)"
    metadata = {"source": source, "run": str(run_dir)}
    exported = None
    if folder:
        if evaluate:
            exported = _exported_metrics(protocol, composer, target, lam, progress)
        card = model_card({
            "arch": bank.arch, "base_fingerprint": bank.vectors.base_fingerprint, "bank": cfg.bank,
            "tasks": target.tasks, "lam": lam, "granularity": cfg.granularity,
            "source": (f"the mean over the images of {what} ({len(features)} images, labels unused) of each image's "
                       "deterministic posterior coefficients under the fitted guide (gates kept where q(gate) keeps "
                       "them, slabs at their means): λ̄ = mean_i E_q[λ_i]"),
            "command": command if command is not None else command_line(), "run": str(run_dir),
            "target": target.label, "protocol": cfg.protocol, "metrics": run.read_metrics_if_any(), "exported": exported,
        })
        provenance = {"format": FORMAT, "base_fingerprint": bank.vectors.base_fingerprint, "tasks": target.tasks,
                      "granularity": cfg.granularity, "source": source, "run": str(run_dir)}
        export_folder(out, bank.model, bank.vectors, lam, cfg.granularity, card, metadata, provenance, overwrite)
    else:
        export_composed(out, bank.model, bank.vectors, lam, cfg.granularity, metadata)
    return {"path": str(out), "arch": bank.arch, "tasks": target.tasks, "lam": lam, "folder": folder,
            "exported": exported}
