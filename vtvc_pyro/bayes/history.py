"""What a fit writes as it goes: ``history.csv`` (one row per SVI step, flushed), optionally TensorBoard.

Columns of ``history.csv`` (:data:`COLUMNS`; an empty cell: not measured at that step):

* ``step``; ``elbo``: the step's ELBO estimate (minus the loss it optimised; with KL weight and
  annealing, on the step's mini-batch scaled to the whole train split);
* ``log_likelihood``, ``kl``: the split of a one-draw ELBO estimate (:func:`elbo_split`) into the
  ``obs`` site's scaled log-likelihood and the rest (KL = log-likelihood − ELBO of that draw). Only
  on eval steps (every ``eval_every``): it costs one more forward through the composed towers. It
  is its own draw, taken after the step's update, so ``log_likelihood − kl`` is close to ``elbo``
  but not equal to it;
* ``lr``: the networks' learning rate at the step; ``global_lr``: the global posterior's (the
  hierarchical model's ``composition``), empty without one;
* ``grad_norm``: the gradient norm before clipping (what ``clip_grad_norm_`` returns);
* ``kept_fraction``: the fraction of (task, group) coefficients the keep rule finds reliable (kept
  at prediction; held at their expectation with ``gating expect``): the hierarchical guide's
  ``summary()["kept"]``, empty for guides without one;
* ``val_nll``, ``val_accuracy``, ``val_score``: the val record of eval steps (``val_score``: what
  selects the best state, higher is better), empty otherwise.

Usage (what :func:`~vtvc_pyro.bayes.svi.fit_svi` does)::

    history = History(out / "history.csv", first_step=1)
    history.write(step=1, elbo=-35.2, lr=1e-3)
    history.close()
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import pyro
import torch
from pyro import poutine

from ..errors import ConfigError

log = logging.getLogger(__name__)

COLUMNS = ("step", "elbo", "log_likelihood", "kl", "lr", "global_lr", "grad_norm", "kept_fraction",
           "val_nll", "val_accuracy", "val_score")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.7g}"
    return str(value)


def tensorboard_writer(log_dir: Path):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``.

    Raises:
        ConfigError: the optional ``tensorboard`` package is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError("--logger tensorboard needs the tensorboard package: pip install 'vtvc-pyro[tensorboard]' "
                          f"(or pip install tensorboard) ({err})") from None
    return SummaryWriter(str(log_dir), flush_secs=10)


class History:
    """``history.csv`` written row by row (header once, each row flushed), plus TensorBoard scalars.

    Args:
        path: the CSV file (``None``: none; TensorBoard alone).
        first_step: the first step this fit will write. Above 1 (a resumed fit) the rows already
            there before it are kept and later ones dropped (the interrupted fit may have got past its
            last checkpoint); otherwise the file starts afresh.
        tensorboard: a folder for TensorBoard event files (``None``: none).
    """

    def __init__(self, path: Path | None, first_step: int = 1, tensorboard: Path | None = None):
        self.path = None if path is None else Path(path)
        self._file = self._writer = None
        if self.path is not None:
            kept = self._rows_before(first_step) if first_step > 1 else []
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", newline="") as f:  # header and the kept rows, then renamed into place
                writer = csv.writer(f)
                writer.writerow(COLUMNS)
                writer.writerows(kept)
            os.replace(tmp, self.path)
            self._file = open(self.path, "a", newline="")  # noqa: SIM115 (kept open for the whole fit)
            self._writer = csv.writer(self._file)
        self.tensorboard = None if tensorboard is None else tensorboard_writer(tensorboard)

    def _rows_before(self, step: int) -> list[list[str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(header) != COLUMNS:
                log.warning("%s has other columns (an older version wrote it): starting it afresh", self.path)
                return []
            return [row for row in reader if row and row[0].isdigit() and int(row[0]) < step]

    def write(self, step: int, **values) -> None:
        """One row: ``values`` named as :data:`COLUMNS` (missing ones empty)."""
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown history columns {sorted(unknown)}")
        if self._writer is not None:
            self._writer.writerow([_cell(step), *(_cell(values.get(c)) for c in COLUMNS[1:])])
            self._file.flush()  # readable while the fit runs
        if self.tensorboard is not None:
            for name, value in values.items():
                if value is not None and math.isfinite(value):
                    self.tensorboard.add_scalar(f"svi/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def elbo_split(model, guide, *args, **kwargs) -> tuple[float, float, float]:
    """A one-draw ELBO estimate split into ``(elbo, log_likelihood, kl)``.

    ``guide`` is traced (as SVI calls it, e.g. :func:`~vtvc_pyro.bayes.svi.image_only`) and
    ``model`` replayed on its draw, both with ``args`` and ``kwargs`` (the step's mini-batch and
    settings); ``log_likelihood`` is the ``obs`` site's scaled log-probability sum and ``kl`` =
    ``log_likelihood − elbo`` (every latent site's term, KL weight included). An enumerated site
    (the mixture's component) is drawn, not summed. The training RNG is left untouched.
    """
    device = args[0].device if args and torch.is_tensor(args[0]) else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        elbo = float(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
        log_likelihood = float(model_trace.nodes["obs"]["log_prob_sum"])
    return elbo, log_likelihood, log_likelihood - elbo


@torch.no_grad()
def kept_fraction(guide) -> float | None:
    """The fraction of (task, group) coefficients the keep rule keeps (a guide with a global
    ``summary()``, in eval mode, where the rule applies); ``None`` for other guides."""
    if not hasattr(guide, "summary"):
        return None
    training = guide.training
    guide.eval()
    try:
        return float(guide.summary()["kept"].float().mean())
    finally:
        guide.train(training)
