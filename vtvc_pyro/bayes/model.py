"""The VTVC generative model: per-sample coefficients, composed CLIP image tower, categorical likelihood.

    λ_i ~ prior                         (sites from the prior: ``gate``, ``slab``; ``lam`` deterministic)
    θ_i = θ0 + Σ_t λ_{i,t,g(b)} τ_{t,b}
    y_i ~ Categorical(logits = normalize(f(x_i; θ_i)) @ Hᵀ)     (H: frozen zero-shot head incl. logit scale)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ..compose.engine import Composer
from ..compose.heads import class_logits
from .priors import Prior


class VTVCModel(torch.nn.Module):
    """Pyro model over a :class:`Composer` and a frozen head.

    A plain ``nn.Module`` (not a ``PyroModule``): it has no learnable parameters, and the frozen
    backbone must not be registered in Pyro's parameter store.

    Args:
        composer: the composition engine (frozen base tower and task vectors).
        head: ``[C, D]`` zero-shot head including ``logit_scale.exp()``.
        prior: a :class:`~vtvc_pyro.bayes.priors.Prior`.
    """

    def __init__(self, composer: Composer, head: torch.Tensor, prior: Prior):
        super().__init__()
        self.composer = composer
        self.register_buffer("head", head)
        self.prior = prior

    def logits(self, images: torch.Tensor, lam: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits with per-sample coefficients.

        Args:
            images: ``[N, 3, H, W]``.
            lam: ``[*P, N, T, G]`` (``P``: optional particle dims, broadcast over the images).
            classes: ``[N, C]`` bool, the classes each image may take (task addition: its own
                task's head within the stacked heads, :mod:`vtvc_pyro.compose.heads`); ``None``: all.

        Returns:
            ``[*P, N, C]``.
        """
        lead = lam.shape[:-3]
        n = images.shape[0]
        flat = lam.reshape(-1, *lam.shape[-2:])  # [P*N, T, G], particle-major
        reps = flat.shape[0] // n
        x = images.unsqueeze(0).expand(reps, *images.shape).reshape(-1, *images.shape[1:])
        # fp32 throughout, GPU included: under bf16 autocast θ0 + λτ is rounded to ~0.4 % and
        # small λτ would vanish, while the fp32 baselines keep it (an unfair comparison).
        feats = self.composer.per_sample(x, flat).reshape(*lead, n, -1)
        return class_logits(feats, self.head, classes)

    def forward(self, images, features, labels=None, num_data=None, kl_weight=1.0, temperature=0.1, classes=None,
                local_kl_weight=None):
        """Pyro model.

        Args:
            images: ``[N, 3, H, W]`` a mini-batch; features: ``[N, D]`` its base features (unused
                here, kept so model and guide share a signature).
            labels: ``[N]`` or ``None`` (prediction).
            num_data: size of the full data set (the likelihood and local KL are scaled by
                ``num_data / N``).
            kl_weight: multiplies the latent sites' log densities (the KL weight / annealing).
            local_kl_weight: the weight of the per-image latents' KL (here: every latent); ``None``: ``kl_weight``.
            temperature: relaxed-Bernoulli temperature of the gate density.
            classes: ``[N, C]`` bool or ``None``, as in :meth:`logits`. The likelihood needs it;
                SVI withholds it from the guide (:func:`~vtvc_pyro.bayes.svi.image_only`).
        """
        n = images.shape[0]
        num_data = num_data or n
        with pyro.plate("data", num_data, subsample=torch.arange(n, device=images.device), dim=-1):
            with pyro.poutine.scale(scale=kl_weight if local_kl_weight is None else local_kl_weight):
                lam = self.prior.sample(self.composer.num_tasks, self.composer.num_groups, images, temperature)
            self.observe(self.logits(images, lam, classes), labels)
        return lam

    def observe(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        """The likelihood site ``obs`` inside the data plate: ``logits [*P, N, C]``, ``labels [N]``."""
        pyro.sample("obs", dist.Categorical(logits=logits), obs=labels)
