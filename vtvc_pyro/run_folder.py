"""A run folder: the one place that names the files of a ``vtvc fit`` run and reads and writes them.

Layout::

    config.json                  the settings (replayable with --config) and the run record
    metrics.json  timing.json    the results (no timings in metrics: same seed and device, same file)
    predictions.safetensors      every method's test probabilities, the labels (and each image's task)
    posterior.nc                 ArviZ InferenceData of the test draws
    guide.safetensors            the chosen candidate's fitted guide
    checkpoint.safetensors       the first candidate's training state (others: checkpoint-k4.safetensors, ...)
    history.csv                  its steps (others: history-k4.csv, ...)
    tensorboard/                 its TensorBoard events (others: tensorboard/k4/, ...), when asked for
    figures/  summary.json       written by ``vtvc report``
    complete.json                written last by a fit: the run is complete (its absence: interrupted)

Readers (:meth:`RunFolder.read_metrics`, :meth:`~RunFolder.read_guide`,
:meth:`~RunFolder.read_predictions`) refuse a run without ``complete.json`` in one line that says
how to finish it (``--resume``) or replace it (``--overwrite``). Folders written before the record
existed (their ``config.json`` has no ``run_folder`` version) are read as they are.

Every write is atomic (:func:`~vtvc_pyro.io.atomic_write`). The module sits just above the package's
bottom layers (it imports only :mod:`.config`, :mod:`.io` and :mod:`.errors`), so that every layer that
touches a run (the protocols, the report, the tables, torchrun's setup, the command line) uses it.

Usage::

    folder = RunFolder("runs/mixed")
    settings, record = folder.read_config()
    metrics = folder.read_metrics()
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import LEGACY_SETTINGS, RUN_RECORD
from .errors import ConfigError
from .io import atomic_write, exclusive, save_safetensors, write_json

FORMAT = 2
"""Version of the run folder's layout, in ``config.json``'s run record; 2: ``complete.json`` is written last."""

WATCH_SETTINGS = ("logger",)
"""Settings that change how a run is watched, not what it computes: ``--resume`` may change them."""

PACKAGES = ("torch", "pyro-ppl", "open_clip_torch", "arviz", "xarray", "numpy", "safetensors")


@dataclass(frozen=True)
class CandidateFiles:
    """The files of one SVI candidate (one number K of compositions)."""

    checkpoint: Path
    history: Path
    tensorboard: Path


class RunFolder:
    """The files of one run (see the module docstring); ``path`` need not exist yet."""

    CONFIG = "config.json"
    METRICS = "metrics.json"
    TIMING = "timing.json"
    PREDICTIONS = "predictions.safetensors"
    POSTERIOR = "posterior.nc"
    GUIDE = "guide.safetensors"
    HISTORY = "history.csv"
    COMPLETE = "complete.json"
    LOCK = ".lock"  # held while a fit writes the folder (vtvc_pyro.io.exclusive)
    OUTPUTS = ("config.json", "metrics.json", "timing.json", "predictions.safetensors", "posterior.nc",
               "guide.safetensors", "summary.json", "complete.json", "checkpoint*.safetensors", "history*.csv",
               "figures/*.png", ".*.tmp", "figures/.*.tmp")
    """What a fit writes (globs): what ``--overwrite`` removes first, and nothing else."""
    SUMMARY = "summary.json"
    FIGURES = "figures"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------ names
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def timing(self) -> Path:
        return self.path / self.TIMING

    @property
    def predictions(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def posterior(self) -> Path:
        return self.path / self.POSTERIOR

    @property
    def guide(self) -> Path:
        return self.path / self.GUIDE

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def figures(self) -> Path:
        return self.path / self.FIGURES

    def figure(self, name: str) -> Path:
        """``figures/NAME.png``."""
        return self.figures / f"{name}.png"

    @property
    def history(self) -> Path:
        """``history.csv``: the chosen candidate's SVI history, copied there once the choice is made."""
        return self.path / self.HISTORY

    def candidate(self, index: int, components: int, lr_factor: float = 1.0) -> CandidateFiles:
        """The files of the ``index``-th candidate, with ``components`` compositions and learning
        rates × ``lr_factor``, named after them (``history-k4.csv``, ``tensorboard/k4``; the
        factor when it is not 1: ``history-k4-lrx2.csv``). Checkpoints likewise, except that the
        first candidate's is ``checkpoint.safetensors`` (its name in every earlier layout)."""
        name = f"k{components}" + ("" if lr_factor == 1 else f"-lrx{lr_factor:g}")
        checkpoint = "checkpoint.safetensors" if index == 0 else f"checkpoint-{name}.safetensors"
        return CandidateFiles(self.path / checkpoint, self.path / f"history-{name}.csv", self.path / "tensorboard" / name)

    def checkpoints(self) -> list[Path]:
        """Every candidate's checkpoint on disk, in name order."""
        return sorted(self.path.glob("checkpoint*.safetensors"))

    # ------------------------------------------------------------ reads
    def require(self, *names: str, what: str = "pass the folder written by `vtvc fit`") -> None:
        """Raise a clear error unless every file in ``names`` (e.g. ``RunFolder.METRICS``) is there."""
        for name in names:
            if not (self.path / name).is_file():
                raise ConfigError(f"{self.path} has no {name}: {what}")

    def read_config(self) -> tuple[dict, dict]:
        """``config.json`` as ``(settings, record)``: the :class:`~vtvc_pyro.config.FitConfig` fields,
        and what the run recorded.

        Raises:
            ConfigError: the folder holds no ``config.json``.
        """
        if not self.config.is_file():
            raise ConfigError(f"{self.path} holds no {self.CONFIG}: pass the folder of a finished `vtvc fit` run")
        settings = self._read_json(self.config)
        if "fit" in settings:  # the layout before 0.2: {"fit": settings (seed under svi), "tasks": ..., ...}
            fit = dict(settings.pop("fit"))
            fit["svi"] = dict(fit.get("svi", {}))
            fit["seed"] = fit["svi"].pop("seed", 0)
            return fit, settings
        return {k: v for k, v in settings.items() if k != RUN_RECORD}, settings.get(RUN_RECORD, {})

    def lock(self):
        """Hold the folder for one writer: a second fit into it is refused at once."""
        return exclusive(self.path / self.LOCK, wait=False, what=f"the run folder {self.path}")

    def is_complete(self) -> bool:
        """The fit finished (``complete.json``), or the folder predates the record and holds its results."""
        if (self.path / self.COMPLETE).is_file():
            return True
        try:
            record = json.loads(self.config.read_text()).get(RUN_RECORD, {})
        except (OSError, ValueError):
            return False
        return (record.get("run_folder", 1) < FORMAT and self.metrics.is_file() and self.guide.is_file()
                and self.posterior.is_file())  # the older layout wrote posterior.nc last

    def require_complete(self) -> None:
        """Refuse an interrupted run in one line: how to finish it, or replace it."""
        if not self.config.is_file():
            raise ConfigError(f"{self.path} holds no run ({self.CONFIG} missing): pass the folder written by `vtvc fit`")
        if not self.is_complete():
            raise ConfigError(f"{self.path} holds an unfinished run (no {self.COMPLETE}: it was interrupted): finish "
                              f"it with `vtvc fit --config {self.config} --out {self.path} --resume`, or run it again "
                              "with --overwrite")

    def read_metrics(self) -> dict:
        self.require_complete()
        return self._read_json(self.metrics)

    def _read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}): restore it, or rerun the fit") from None

    def read_metrics_if_any(self) -> dict | None:
        """``metrics.json``, or ``None`` when the run has none."""
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else None

    def read_predictions(self) -> dict[str, torch.Tensor]:
        self.require_complete()
        self.require(self.PREDICTIONS)
        return _load_safetensors(self.predictions)

    def read_guide(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The fitted guide's state dict and the metadata it was saved with (``components``, ``best_step``)."""
        self.require_complete()
        if not self.guide.is_file():
            raise ConfigError(f"{self.path} holds no fitted guide ({self.GUIDE}): run the fit again with --overwrite")
        from safetensors import safe_open

        state = _load_safetensors(self.guide)
        with safe_open(str(self.guide), "pt") as f:
            meta = f.metadata() or {}
        return state, meta

    # ------------------------------------------------------------ writes
    def prepare(self, settings: dict, overwrite: bool = False, resume: bool = False) -> RunFolder:
        """Create the folder, or check the one to resume.

        A non-empty folder is refused unless ``overwrite`` (the outputs of the earlier run,
        :data:`OUTPUTS`, are removed first; other files stay) or ``resume`` (it must hold an
        unfinished run with the same ``settings``; it goes on from whatever phase was interrupted:
        SVI from its checkpoints, the other phases again). Either removes stale temporary files
        and the completion record, which the fit writes again at its end.
        """
        if resume:
            if not self.config.is_file():
                raise ConfigError(f"--resume: {self.path} holds no run to resume ({self.CONFIG} missing); start it "
                                  "without --resume")
            if self.is_complete():
                raise ConfigError(f"--resume: the run in {self.path} is complete, nothing to resume; pass --overwrite "
                                  "to run it again")
            before = with_legacy_settings(self.read_config()[0], settings)
            changed = sorted(k for k in set(before) | set(settings)
                             if k not in WATCH_SETTINGS and before.get(k) != settings.get(k))
            if changed:
                raise ConfigError(f"--resume: the run in {self.path} used other settings ({', '.join(changed)}); "
                                  "resume with the same options")
            self._remove(self.COMPLETE, ".*.tmp", "figures/.*.tmp")
            return self
        if self.path.exists() and any(not self._placeholder(p) for p in self.path.iterdir()):
            if not overwrite:
                advice = ("pass --resume to finish it" if self.config.is_file() and not self.is_complete()
                          else "pass another --out")
                raise ConfigError(f"output folder {self.path} exists and is not empty: {advice}, or --overwrite to "
                                  "replace it")
            self._remove(*self.OUTPUTS)  # an earlier run's files must never pass for this one's
            shutil.rmtree(self.path / "tensorboard", ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(exist_ok=True)
        return self

    def _placeholder(self, path: Path) -> bool:
        """The lock, or an empty ``figures/``: what a fit leaves before writing anything."""
        return path.name == self.LOCK or (path.name == self.FIGURES and path.is_dir() and not any(path.iterdir()))

    def _remove(self, *patterns: str) -> None:
        for pattern in patterns:
            for path in self.path.glob(pattern):
                if path.is_file():
                    path.unlink()

    def write_complete(self) -> Path:
        """The completion record, written last by a fit: what it wrote, and when."""
        files = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()
                       and not p.name.startswith("."))
        return write_json(self.path / self.COMPLETE, {"format": FORMAT, "files": files,
                                                      "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def adopt_history(self, first: CandidateFiles) -> None:
        """Resuming a run whose first candidate wrote ``history.csv`` (before candidates were named
        after K): continue its rows in the named file."""
        if not first.history.is_file() and self.history.is_file():
            first.history.write_text(self.history.read_text())

    def write_chosen_history(self, chosen: CandidateFiles) -> Path | None:
        """Copy the chosen candidate's history to ``history.csv`` (atomically); ``None`` when it wrote none."""
        if not chosen.history.is_file():
            return None
        text = chosen.history.read_text()
        return atomic_write(self.history, lambda tmp: tmp.write_text(text))

    def write_config(self, settings: dict, record: dict) -> Path:
        """The settings at the top level (``vtvc fit --config config.json`` replays them); what the run
        found and where it ran under ``"run"``, which a replay ignores."""
        return write_json(self.config, {**settings, RUN_RECORD: record})

    def write_metrics(self, metrics: dict) -> Path:
        return write_json(self.metrics, metrics)

    def write_timing(self, timing: dict) -> Path:
        return write_json(self.timing, timing)

    def write_summary(self, summary: dict) -> Path:
        return write_json(self.summary, summary)

    def write_predictions(self, tensors: dict[str, torch.Tensor]) -> Path:
        return save_safetensors(tensors, self.predictions)

    def write_guide(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        return save_safetensors(state, self.guide, metadata)

    def write_posterior(self, idata) -> Path:
        """ArviZ InferenceData as netCDF."""
        return atomic_write(self.posterior, lambda tmp: idata.to_netcdf(str(tmp)))


def with_legacy_settings(before: dict, settings: dict) -> dict:
    """A run's recorded settings ``before`` with what it meant for settings it predates: their
    :data:`~vtvc_pyro.config.LEGACY_SETTINGS` value, or, among the SVI settings, an off (null) one
    where ``settings`` has it off too; so that resuming such a run compares like with like."""
    filled = {**{k: v for k, v in LEGACY_SETTINGS.items() if k in settings}, **before}
    if isinstance(before.get("svi"), dict) and isinstance(settings.get("svi"), dict):
        filled["svi"] = {**{k: v for k, v in settings["svi"].items() if v is None}, **before["svi"]}
    return filled


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A run's safetensors file; a truncated or corrupt one is one clear error."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{path} is truncated or corrupt ({err}): rerun the fit with --overwrite") from None


# ---------------------------------------------------------------- the run record
def environment() -> dict:
    """Package versions, Python, platform and the git commit (for reproducibility)."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"packages": versions, "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": commit, "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}


def device_description(device: torch.device) -> str:
    """``cpu`` or the GPU's name, e.g. ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
