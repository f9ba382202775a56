"""Task negation: subtract a task vector to remove a task's ability while keeping a control task's.

Two methods on the same vector and data:

* **task arithmetic negation** (task_vectors protocol): θ = θ0 + λ τ_forget with one λ ≤ 0 chosen
  on val as the one with the lowest forget accuracy whose control accuracy stays at least
  ``keep_fraction`` (95 %) of the zero-shot control accuracy.
* **VTVC negation**: per-sample coefficients λ_i ≤ 0 (prior ``spike_slab_negative``: the slab lives on
  negative coefficients) fitted by SVI on the union of both train splits. Control samples are
  observed with their labels; forget samples with the uniform soft label, whose expected
  log-likelihood ``mean_c log p(c | x)`` is largest when the prediction carries no information. The
  best state on val maximises control accuracy minus forget accuracy.

Labels of the union: control classes keep ``0 .. C_c - 1``; forget class ``k`` becomes ``C_c + k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch

from ..bank.store import load_bank
from ..bayes.guide import make_guide
from ..bayes.model import VTVCModel
from ..bayes.priors import make_prior
from ..bayes.svi import fit_svi
from ..compose.engine import Composer
from ..config import NegationConfig
from ..data.specs import load_dataset, with_validation
from ..data.split import Split
from ..errors import ConfigError
from ..io import resolve_device
from ..methods.merges import predict_shared


@dataclass
class NegationData:
    """One split of a forget task and a control task: images, base features, labels, heads."""

    forget: Split  # N_f images
    control: Split  # N_c images
    forget_head: torch.Tensor  # [C_f, D]
    control_head: torch.Tensor  # [C_c, D]

    def union(self) -> Split:
        """Both tasks in one set; forget labels shifted by ``C_c``."""
        c = self.control_head.shape[0]
        return Split(torch.cat([self.forget.images, self.control.images]),
                     torch.cat([self.forget.features, self.control.features]),
                     torch.cat([self.forget.labels + c, self.control.labels]))


def accuracies(composer: Composer, data: NegationData, lam: torch.Tensor) -> dict[str, float]:
    """Forget and control accuracy of the tower composed with shared ``lam [1, G]``."""
    out = {}
    for name, split, head in (("forget", data.forget, data.forget_head), ("control", data.control, data.control_head)):
        out[name] = float((predict_shared(composer, head, split.images, lam).argmax(-1) == split.labels).float().mean())
    return out


def task_arithmetic_negation(composer: Composer, val: NegationData, grid: torch.Tensor | None = None,
                             keep_fraction: float = 0.95) -> tuple[torch.Tensor, dict]:
    """λ ≤ 0 from ``grid`` (default 0, −0.1, ..., −2): lowest val forget accuracy with control accuracy at
    least ``keep_fraction`` of λ = 0's. Returns ``lam [1, 1]`` and the val accuracies per λ."""
    grid = -torch.linspace(0, 2, 21) if grid is None else grid
    scores = {round(v, 4): accuracies(composer, val, torch.full((1, 1), v)) for v in grid.tolist()}
    floor = keep_fraction * scores[0.0]["control"]
    allowed = {v: s for v, s in scores.items() if s["control"] >= floor}
    best = min(allowed, key=lambda v: (allowed[v]["forget"], -abs(v)))
    return torch.full((1, 1), best), {"val_by_lambda": scores, "lambda": best, "control_floor": floor}


class NegationModel(VTVCModel):
    """The VTVC model of :mod:`~vtvc_pyro.protocols.negation`: labels of the union (see module docstring)."""

    def __init__(self, composer: Composer, forget_head: torch.Tensor, control_head: torch.Tensor, prior):
        super().__init__(composer, torch.cat([control_head, forget_head]), prior)
        self.num_control = control_head.shape[0]

    def log_likelihood(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits [*P, N, C_c + C_f]`` (combined head), union ``labels [N]`` -> ``[*P, N]``."""
        c = self.num_control
        control = torch.log_softmax(logits[..., :c], -1).gather(
            -1, labels.clamp(max=c - 1).expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        forget = torch.log_softmax(logits[..., c:], -1).mean(-1)  # uniform soft label
        return torch.where(labels >= c, forget, control)

    def observe(self, logits, labels):
        """Union labels, not a categorical: a factor of :meth:`log_likelihood`."""
        pyro.factor("obs", self.log_likelihood(logits, labels))


def split_accuracies(model: NegationModel, probs_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Forget and control accuracy from combined-head ``logits [N, C_c + C_f]`` and union ``labels``."""
    c = model.num_control
    forget = labels >= c
    pred_f = probs_logits[forget, c:].argmax(-1) + c
    pred_c = probs_logits[~forget, :c].argmax(-1)
    return {"forget": float((pred_f == labels[forget]).float().mean()),
            "control": float((pred_c == labels[~forget]).float().mean())}


@torch.no_grad()
def vtvc_logits(model: NegationModel, guide, images: torch.Tensor, features: torch.Tensor,
                batch_size: int = 256) -> torch.Tensor:
    """Combined-head logits ``[N, C_c + C_f]`` with the gated mean coefficients."""
    guide.eval()
    out = [model.logits(images[i : i + batch_size], guide.mean_coefficients(features[i : i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def negation_score(model: NegationModel, guide, val: Split) -> float:
    """Val selection for :func:`~vtvc_pyro.bayes.svi.fit_svi`: control accuracy minus forget accuracy."""
    acc = split_accuracies(model, vtvc_logits(model, guide, val.images, val.features), val.labels)
    return acc["control"] - acc["forget"]


def run_negation(cfg: NegationConfig, progress: bool = False) -> dict:
    """Negate ``forget``'s own task vector, keeping ``control``: zero-shot, task arithmetic and VTVC.

    Returns:
        ``{"methods": {name: {"forget": acc, "control": acc}}, ...}`` on the test splits, with the
        chosen task-arithmetic λ and VTVC's mean λ on forget and control test samples.
    """
    forget, control, svi, seed = cfg.forget, cfg.control, cfg.svi, cfg.seed
    dev = resolve_device(cfg.device)
    bank = load_bank(cfg.bank)
    if forget not in bank.vectors.tasks:
        raise ConfigError(f"the bank has no task vector for {forget!r} to negate; choose one of {bank.vectors.tasks}")
    data_seed = bank.manifest.get("config", {}).get("seed", 0)  # pools must match those of the bank build
    tasks = {name: with_validation(load_dataset(name, data_seed), data_seed) for name in (forget, control)}
    heads = {name: bank.head_for(t).to(dev) for name, t in tasks.items()}

    def split(name: str) -> NegationData:
        parts = []
        for t in (forget, control):
            x, y = tasks[t].split(name)
            parts.append(Split(x.to(dev), bank.features(tasks[t], name, t).to(dev), y.to(dev)))
        return NegationData(parts[0], parts[1], heads[forget], heads[control])

    data = {name: split(name) for name in ("train", "val", "test")}
    vector = bank.vectors.select([forget]).to(dev)
    visual = bank.model.to(dev).visual
    shared = Composer(visual, vector, "task")
    methods = {"zeroshot": accuracies(shared, data["test"], torch.zeros(1, 1, device=dev))}
    lam_ta, ta_info = task_arithmetic_negation(shared, data["val"])
    methods["task_arithmetic"] = accuracies(shared, data["test"], lam_ta.to(dev))

    composer = Composer(visual, vector, cfg.granularity)
    prior = make_prior("spike_slab_negative", **cfg.prior_args)
    model = NegationModel(composer, heads[forget], heads[control], prior).to(dev)
    pyro.set_rng_seed(seed)
    guide = make_guide("amortized_gated", feature_dim=data["train"].forget.features.shape[1], num_tasks=1,
                       num_groups=composer.num_groups, prior=prior, gate_logit_init=2.0).to(dev)
    fit = fit_svi(model, guide, data["train"].union(), data["val"].union(), svi, progress=progress, score=negation_score,
                  seed=seed)
    test = data["test"].union()
    methods["vtvc"] = split_accuracies(model, vtvc_logits(model, guide, test.images, test.features), test.labels)
    with torch.no_grad():
        lam_f = guide.mean_coefficients(data["test"].forget.features).mean().item()
        lam_c = guide.mean_coefficients(data["test"].control.features).mean().item()
    return {"forget": forget, "control": control, "methods": methods, "task_arithmetic_lambda": ta_info["lambda"],
            "control_floor_val": ta_info["control_floor"], "vtvc_mean_lambda": {"forget": lam_f, "control": lam_c},
            "vtvc_best_step": fit.best_step, "vtvc_best_val_score": fit.best_score}
