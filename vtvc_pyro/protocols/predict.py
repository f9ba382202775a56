"""A fitted run applied to new images: per-image composition, class probabilities and uncertainty.

Usage::

    predictor = Predictor.from_run("runs/mixed-20261201")          # addition runs: task="digits"
    out = predictor.predict("imagefolder:my_images", num_samples=20)
    out.to_csv("predictions.csv")

Every image gets its own posterior over the composition (the amortized guide reads its base
features). The probabilities are the run's reported prediction, ``vtvc``: one composed pass at the
gated posterior mean or the Monte Carlo predictive, whichever had the lower val NLL in the fit
(``metrics.json`` → ``prediction``). Beside them: the predictive entropy, and from posterior draws
its epistemic part (the mutual information between the label and the composition) and per task
vector the image's posterior mean coefficient and inclusion probability. ``num_samples=0`` skips the
draws (one pass per image; the columns that need draws are NaN, λ is the gated mean's).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import backbone
from ..bayes.predictive import mean_probs, sample_draws
from ..compose.engine import Composer
from ..data.benchmarks import clip_preprocess
from ..data.specs import load_dataset, load_image_files, suite_transform
from ..errors import ConfigError
from ..evaluate import mutual_information, predictive_entropy
from ..io import atomic_write, resolve_device
from ..run_folder import RunFolder
from .fit import protocol_for
from .fitting import build_vtvc, fit_config_of, load_guide_from_run


@dataclass
class Predictions:
    """What :meth:`Predictor.predict` returns; tensors on CPU.

    Attributes:
        names: ``N`` image names (paths under the folder, or ``"<spec>/<split>/<index>"``).
        probs: ``[N, C]`` the run's reported prediction (see the module docstring).
        entropy, mutual_information: ``[N]`` in nats (total and epistemic uncertainty).
        lam, inclusion: ``[N, T]`` posterior mean λ (mean over blocks) and inclusion probability per task vector.
        labels: ``[N]`` true labels where the data set has them, else ``None``.
    """

    names: list[str]
    class_names: list[str]
    tasks: list[str]
    probs: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor
    lam: torch.Tensor
    inclusion: torch.Tensor
    labels: torch.Tensor | None = None

    def rows(self) -> list[dict]:
        """One dict per image: name, prediction, its probability, uncertainty, per-class probabilities,
        per-task λ and inclusion (and the label when known)."""
        out = []
        for i, name in enumerate(self.names):
            top = int(self.probs[i].argmax())
            row = {"image": name, "prediction": self.class_names[top], "probability": float(self.probs[i, top]),
                   "entropy": float(self.entropy[i]), "mutual_information": float(self.mutual_information[i])}
            if self.labels is not None:
                row["label"] = self.class_names[int(self.labels[i])]
            row.update({f"p[{c}]": float(p) for c, p in zip(self.class_names, self.probs[i])})
            row.update({f"lam[{t}]": float(v) for t, v in zip(self.tasks, self.lam[i])})
            row.update({f"inclusion[{t}]": float(v) for t, v in zip(self.tasks, self.inclusion[i])})
            out.append(row)
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` as CSV, atomically."""
        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


class Predictor:
    """A fitted VTVC run ready for new images (see the module docstring).

    Args:
        model, guide: the run's Pyro model (its head: the classes predicted) and fitted guide.
        feature_model: the base CLIP whose image features the guide reads.
        transform: PIL image -> ``[3, H, W]``, the input transform of the run's backbone.
        class_names, tasks: what the columns of the probabilities and of λ are.
        num_samples, temperature: the run's predictive (``eval_samples``, ``svi.eval_temperature``).
        prediction: ``mean`` (one pass at the gated posterior mean) or ``mc`` (the Monte Carlo
            predictive): which one the run reports as ``vtvc``.
    """

    def __init__(self, model, guide, feature_model, transform, class_names, tasks, num_samples: int = 20,
                 temperature: float = 0.01, data_seed: int = 0, prediction: str = "mc"):
        self.model, self.guide, self.feature_model, self.transform = model, guide, feature_model, transform
        self.class_names, self.tasks = list(class_names), list(tasks)
        self.num_samples, self.temperature, self.data_seed = num_samples, temperature, data_seed
        self.prediction = prediction

    @classmethod
    def from_run(cls, run_dir: str | Path, task: str | None = None, device: str = "cpu") -> Predictor:
        """Rebuild a run folder's model and guide (``config.json``, ``guide.safetensors``, its bank).

        Args:
            task: addition runs: the task whose classes to predict (its head scores the images;
                the composition is still inferred from the image alone). Transfer runs: ignored.
        """
        settings, record = RunFolder(run_dir).read_config()
        cfg = fit_config_of(settings, str(RunFolder(run_dir).config))
        cfg.device = device
        dev = resolve_device(device)
        protocol = protocol_for(cfg.protocol)
        target = protocol.select(cfg, dev)
        try:
            head, class_names = protocol.prediction_head(target, task)
        except ConfigError as err:
            raise ConfigError(f"{run_dir}: {err}") from None
        bank, tasks = target.bank, target.tasks
        if record.get("tasks") and list(record["tasks"]) != list(tasks):
            raise ConfigError(f"{run_dir} composed {record['tasks']} but its bank now gives {tasks}: "
                              "use the bank the run was fitted on")
        composer = Composer(bank.model.visual, bank.vectors, cfg.granularity)
        feature_dim = bank.model.visual.output_dim
        guide = load_guide_from_run(run_dir, composer, target.head, feature_dim).to(dev)
        model, _ = build_vtvc(cfg, composer, head, feature_dim, guide.components if hasattr(guide, "components") else 1)
        transform = suite_transform() if bank.arch == backbone.TINY_MODEL else clip_preprocess(bank.model)
        metrics = RunFolder(run_dir).read_metrics_if_any() or {}
        prediction = metrics.get("prediction", {}).get("vtvc", "mc")  # runs before the choice reported the MC predictive
        return cls(model.to(dev), guide, bank.model, transform, class_names, tasks, cfg.eval_samples,
                   cfg.svi.eval_temperature, target.data_seed, prediction)

    def load(self, data: str | torch.Tensor, split: str = "test") -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """``(images [N, 3, H, W], names, labels or None)`` of a tensor, ``imagefolder:PATH`` (any
        folder of images, read recursively) or a data set spec's ``split``."""
        if torch.is_tensor(data):
            return data, [str(i) for i in range(len(data))], None
        kind, _, rest = data.partition(":")
        if kind == "imagefolder" or (not rest and Path(data).is_dir()):
            images, names = load_image_files(rest or data, self.transform)
            return images, names, None
        task = load_dataset(data, self.data_seed, preprocess=self.transform)
        images, labels = task.split(split)
        images = images[torch.arange(len(images))] if not torch.is_tensor(images) else images
        return images, [f"{data}/{split}/{i}" for i in range(len(images))], labels

    @torch.no_grad()
    def predict(self, data: str | torch.Tensor, num_samples: int | None = None, split: str = "test",
                seed: int = 0) -> Predictions:
        """The run's reported prediction on ``data`` (see :meth:`load`) with ``num_samples`` posterior
        draws for the uncertainty columns (default: the run's ``eval_samples``; 0: none, one pass
        per image, for a run that reports the one-pass prediction)."""
        images, names, labels = self.load(data, split)
        device = self.model.head.device
        images = images.to(device)
        features = backbone.image_features(self.feature_model, images)
        num_samples = self.num_samples if num_samples is None else num_samples
        if num_samples < 1 and self.prediction == "mc":
            raise ConfigError("this run reports the Monte Carlo predictive, which needs posterior draws: "
                              "pass --num_samples 1 or more")
        n, t = len(images), len(self.tasks)
        if self.prediction == "mean":
            probs = mean_probs(self.model, self.guide, images, features)
            lam, inclusion, mi = self.guide.mean_coefficients(features).mean(-1), torch.full((n, t), math.nan), None
        if num_samples > 0:
            probs_s, local, _ = sample_draws(self.model, self.guide, images, features, num_samples, self.temperature,
                                             generator_seed=seed)
            mi, inclusion = mutual_information(probs_s), local["inclusion"].float().mean((0, 3))
            lam = local["lam"].mean((0, 3))  # E λ over the draws
            if self.prediction == "mc":
                probs = probs_s.mean(0)
        mi = torch.full((n,), math.nan) if mi is None else mi
        return Predictions(names, self.class_names, self.tasks, probs.cpu(), predictive_entropy(probs).cpu(), mi.cpu(),
                           lam.cpu(), inclusion.cpu(), None if labels is None else labels.cpu())
