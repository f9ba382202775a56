"""The spread of the ELBO gradient on one fixed batch: how noisy a fit's steps are.

One guide, one mini-batch, ``S`` independent posterior draws (seeds ``0..S-1``): for each draw the
loss a step would optimise and its gradient with respect to every guide parameter. The gradient's
*total variance* is the trace of its covariance over draws, Σ_p Var_s[∂L/∂p_s]; the *signal* is
the squared norm of the mean gradient, and *relative variance* their ratio (how noisy a step is
for the size of the step it estimates). Two gatings compared at the same parameters, on the same
batch and the same seeds, differ only in the estimator, but not in the objective alone: with
``expect`` a held gate enters the likelihood at its expectation, so the loss and its mean gradient
differ too. Read the total variance (the noise a step carries) together with the relative one,
and measure at parameters neither objective was fitted to (a guide's initial state) as well as at
a fit's: at a fit's optimum its own mean gradient is near zero, which flatters the other objective's
relative variance.

Usage::

    stats = gradient_spread(model, guide, batch, settings={"num_data": 900, "kl_weight": 0.01,
                                                              "temperature": 0.1}, cfg=SVIConfig(), seeds=40)
"""

from __future__ import annotations

import pyro
import torch

from ..config import SVIConfig
from ..data.split import Split
from .svi import elbo_loss


def gradient_draws(model, guide, batch: Split, settings: dict, cfg: SVIConfig,
                   seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss ``[S]`` and flattened gradient ``[S, P]`` of every trainable guide parameter over ``S`` draws
    (the guide in training mode, as a step sees it; its mode is put back)."""
    loss_fn = elbo_loss(model, guide, cfg)
    params = [p for p in guide.parameters() if p.requires_grad]
    extra = {} if batch.classes is None else {"classes": batch.classes}
    training = guide.training
    guide.train()
    losses, grads = [], []
    try:
        for seed in range(seeds):
            pyro.set_rng_seed(seed)
            loss = loss_fn(batch.images, batch.features, batch.labels, **settings, **extra)
            grad = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grad)]))
            losses.append(float(loss.detach()))
    finally:
        guide.train(training)
    return torch.tensor(losses), torch.stack(grads)


def gradient_spread(model, guide, batch: Split, settings: dict, cfg: SVIConfig, seeds: int = 40) -> dict:
    """Summary of :func:`gradient_draws`: ``loss_mean``, ``loss_sd``, ``total_variance`` (Σ_p Var_s),
    ``signal`` (‖mean gradient‖²), ``relative_variance`` (their ratio) and ``seeds``."""
    losses, grads = gradient_draws(model, guide, batch, settings, cfg, seeds)
    variance, signal = float(grads.var(0).sum()), float(grads.mean(0).square().sum())
    return {"loss_mean": float(losses.mean()), "loss_sd": float(losses.std()), "total_variance": variance,
            "signal": signal, "relative_variance": variance / signal if signal > 0 else float("inf"), "seeds": seeds}
