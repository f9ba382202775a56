"""``vtvc bench gradients``: the ELBO gradient's variance of a fitted run under each gating.

A run's guide is rebuilt once per gating (:data:`~vtvc_pyro.bayes.guide.GATINGS`) with the run's
fitted parameters (or, with ``at="init"``, the initial state a fit of the run's settings starts
from), and :func:`~vtvc_pyro.bayes.gradients.gradient_spread` measures its loss and
gradient over the same seeds on one fixed mini-batch of the learning split (drawn with the run's
seed), at the KL weight and temperature of the fit's last step. The parameters are equal; what
differs is the estimator (and, see :mod:`vtvc_pyro.bayes.gradients`, the objective it estimates).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..bayes.gradients import gradient_spread
from ..bayes.svi import step_settings
from ..compose.engine import Composer
from ..io import resolve_device
from ..run_folder import RunFolder
from .fit import protocol_for
from .fitting import build_vtvc, fit_config_of


def gradient_bench(run_dir: str | Path, gatings: list[str], batch_size: int = 64, seeds: int = 40,
                   device: str = "auto", at: str = "fitted") -> dict:
    """Rows ``{gating, loss_mean, loss_sd, total_variance, signal, relative_variance, seeds,
    variance_ratio}`` for the run in ``run_dir`` (``variance_ratio``: against the first gating's),
    and what was measured; ``at``: ``fitted`` (the run's parameters) or ``init`` (the fit's start)."""
    folder = RunFolder(run_dir)
    folder.require_complete()
    settings, _ = folder.read_config()
    cfg = fit_config_of(settings, str(folder.config))
    torch_device = resolve_device(device)
    target = protocol_for(cfg.protocol).load(cfg, torch_device)
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    state, meta = folder.read_guide()
    components = int(meta.get("components", 1))
    train = target.data["train"]
    rows_index = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:batch_size]
    batch = train.rows(rows_index.to(train.features.device))
    rows = []
    for gating in gatings:
        model, guide = build_vtvc(replace(cfg, gating=gating), composer, target.head, train.features.shape[1],
                                  components)
        model, guide = model.to(torch_device), guide.to(torch_device)
        if at == "fitted":
            guide.load_state_dict(state)
        elif hasattr(guide, "initialize"):
            guide.initialize(train.features, seed=cfg.seed)
        settings_at_end = step_settings(cfg.svi.steps, cfg.svi, guide, len(train))
        rows.append({"gating": gating, **gradient_spread(model, guide, batch, settings_at_end, cfg.svi, seeds)})
    for row in rows:
        row["variance_ratio"] = row["total_variance"] / rows[0]["total_variance"]
    return {"run": str(run_dir), "model": cfg.model, "components": components, "batch": len(batch),
            "fitted_with": cfg.gating, "at": at, "rows": rows}


def markdown(result: dict) -> str:
    """The rows as a Markdown table."""
    where = "its fitted parameters" if result["at"] == "fitted" else "the initial state of its settings"
    lines = [f"run `{result['run']}` ({result['model']}, K = {result['components']}, fitted with gating "
             f"{result['fitted_with']}) at {where}, one batch of {result['batch']} images, "
             f"{result['rows'][0]['seeds']} draws",
             "", "| gating | loss mean | loss sd | gradient total variance | ratio | ‖mean gradient‖² | variance / signal |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['gating']} | {r['loss_mean']:.1f} | {r['loss_sd']:.2f} | {r['total_variance']:.4g} | "
                     f"{r['variance_ratio']:.3f} | {r['signal']:.4g} | {r['relative_variance']:.3g} |")
    return "\n".join(lines)
