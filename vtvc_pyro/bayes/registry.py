"""Models and guides by name: ``make_vtvc("hierarchical", "amortized_gated", ...)`` -> ``(model, guide)``.

Models:

- ``hierarchical`` (the transfer default): a global sparse composition λ̄ outside the data plate, routed per
  image (:mod:`.hierarchical`).
- ``flat`` (the task-addition default): every coefficient local to its image, λ_i ~ prior (:mod:`.model`, :mod:`.guide`).

Guides (:data:`~vtvc_pyro.bayes.guide.GUIDES`): ``amortized_gated`` (amortized, with the keep
rule as its ``gating`` setting says), ``amortized`` (no keep rule), ``global`` (task-level VI: the hierarchical model
without its per-image part; the flat model has no global latent and refuses it).
"""

from __future__ import annotations

import torch

from ..compose.engine import Composer
from ..errors import ConfigError
from .guide import GUIDES, AmortizedGatedGuide, GuideSettings
from .hierarchical import HierarchicalGuide, HierarchicalModel
from .model import VTVCModel
from .priors import Prior

MODELS = {
    "hierarchical": "global sparse composition λ̄ (outside the data plate) × per-image Beta-Bernoulli routing",
    "flat": "per-image coefficients λ_i ~ prior, every latent inside the data plate",
}


def make_vtvc(model_name: str, guide_name: str, composer: Composer, head: torch.Tensor, prior: Prior,
              feature_dim: int, route_a: float = 1.0, route_b: float = 1.0, components: int = 1, routing: bool = True,
              settings: GuideSettings | None = None, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Build a registered model and its guide.

    Args:
        composer, head, prior: the model's composition engine, ``[C, D]`` head and prior.
        feature_dim: ``D`` of the base features the guide reads.
        route_a, route_b: the hierarchical model's Beta prior of the use rates.
        components: the hierarchical model's number of global compositions K (1: one).
        routing: the hierarchical model's per-image routing (the ``global`` guide has none).
        settings: the guide's :class:`~vtvc_pyro.bayes.guide.GuideSettings` (``gate_rule`` comes from
            the guide's name); ``overrides``: its fields by name (``hidden=64``).
    """
    if model_name not in MODELS:
        raise ConfigError(f"unknown model {model_name!r}: choose one of {', '.join(MODELS)}")
    if guide_name not in GUIDES:
        raise ConfigError(f"unknown guide {guide_name!r}: choose one of {', '.join(GUIDES)}")
    settings = GuideSettings.of(settings, **{**overrides, "gate_rule": GUIDES[guide_name]["gate_rule"]})
    dims = dict(feature_dim=feature_dim, num_tasks=composer.num_tasks, num_groups=composer.num_groups, prior=prior,
                settings=settings, component_scale=composer.component_scales())
    if model_name == "flat":
        if not GUIDES[guide_name]["amortized"]:
            raise ConfigError("the global guide is task-level inference, which the flat model has no latent for: "
                              "use --model hierarchical --guide global")
        return VTVCModel(composer, head, prior), AmortizedGatedGuide(**dims, amortized=True)
    if not GUIDES[guide_name]["amortized"]:  # task-level VI: one composition, nothing per image
        routing, components = False, 1
    model = HierarchicalModel(composer, head, prior, routing=routing, route_a=route_a, route_b=route_b,
                              components=components)
    guide = HierarchicalGuide(**dims, routing=routing, route_a=route_a, route_b=route_b, components=components)
    return model, guide
