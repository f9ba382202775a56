"""Posterior as ArviZ InferenceData (arviz < 1): the one place that knows the ArviZ API.

SVI draws are independent samples of the guide, stored as one chain (``chain``, ``draw``). The
evaluated (held-out test) images have the dim ``image``; ``task`` and ``block`` index the
coefficients (``block`` holds the coefficient groups: blocks, layers or ``all``). Groups:

* ``posterior``: ``lam`` and ``inclusion`` (chain, draw, image, task, block), and every latent
  site of the model by its own name: the prior's sites (the hierarchical model's are global:
  (chain, draw, [component,] task[, block]); the flat model's are per image), ``route``
  (chain, draw, image, task) and ``component`` (chain, draw, image);
* ``posterior_predictive``: ``obs``, one label drawn per posterior draw (chain, draw, image), and
  ``probs``, the class probabilities behind it (chain, draw, image, class);
* ``log_likelihood``: ``obs``, log p(y_i | draw) of the true labels (chain, draw, image);
* ``observed_data``: ``obs``, the true labels (image);
* ``predictions_constant_data``: where each image sits in its split (``image_index``) and, in task
  addition, its task (``image_task``);
* ``sample_stats``: per draw, ``sum_log_likelihood`` of the saved images and ``kept_fraction``;
* ``svi_trace``: the ELBO per SVI step (dim ``step``);
* ``constant_data``: the task, block and class names (also the coords).

The images are held out (the posterior was not fitted on them), so their log predictive density
is computed directly, Σ_i log mean_s p(y_i | s) with its standard error
(:func:`heldout_log_predictive_density`); PSIS-LOO (``az.loo``) answers another question (how the
fit would predict an image left out of *its own* data) and on these images its Pareto k are all
far above 0.7: do not use it on them. :func:`class_frequency_check` is the categorical posterior
predictive check: how often each class is observed against how often the predictive draws it.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import xarray as xr


# arviz 0.23 announces its 1.0 refactor when first imported; that one notice is noise for our users.
# Silenced for the import only: the process's warning filters are left as they were.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
    import arviz as az


def _dims(value: torch.Tensor, lead: tuple[str, ...], event: tuple[str, ...]) -> tuple[str, ...]:
    """The dims of a ``[S, *lead, *event]`` draw: ``chain, draw``, then ``lead``/``event`` names,
    a ``component`` dim for what lies between."""
    middle = value.dim() - 1 - len(lead) - len(event)
    return ("chain", "draw", *lead, *(("component",) if middle == 1 else ()), *event)


def to_inference_data(
    probs: torch.Tensor,
    local: dict[str, torch.Tensor],
    shared: dict[str, torch.Tensor],
    labels: torch.Tensor,
    tasks: Sequence[str],
    groups: Sequence[str],
    class_names: Sequence[str],
    elbo_trace: Sequence[float],
    site_events: dict[str, tuple[str, ...]],
    image_index: torch.Tensor | None = None,
    image_task: torch.Tensor | None = None,
    attrs: dict | None = None,
    seed: int = 0,
) -> az.InferenceData:
    """Build InferenceData from guide draws (see the module docstring for the groups).

    Args:
        probs: ``[S, N, C]`` predictive probabilities per draw for ``N`` evaluated images.
        local: per-image draws ``[S, N, ...]``: ``lam``, ``inclusion`` ``[S, N, T, G]`` and sites
            (:func:`~vtvc_pyro.bayes.predictive.sample_draws`).
        shared: global draws ``[S, (K,) ...]`` (the hierarchical model's prior sites).
        labels: ``[N]``.
        site_events: site name -> its event dims (``("task", "block")``, ``("task",)`` or ``()``).
        image_index: ``[N]`` positions of the images in their split; image_task: ``[N]`` their task.
        seed: seed of the ``posterior_predictive.obs`` draws.
    """
    n, c = probs.shape[1], probs.shape[2]
    events = {"lam": ("task", "block"), "inclusion": ("task", "block"), "route": ("task",), "component": (),
              **site_events}

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()[None]

    posterior, dims = {}, {}
    for name, value in local.items():
        posterior[name] = arr(value.float() if value.is_floating_point() else value)
        dims[name] = list(_dims(value, ("image",), events.get(name, ()))[2:])
    for name, value in shared.items():
        posterior[name] = arr(value.float())
        dims[name] = list(_dims(value, (), events.get(name, ()))[2:])
    generator = torch.Generator().manual_seed(seed)
    flat = probs.reshape(-1, c).double().cpu()
    finite = torch.isfinite(flat).all(-1) & (flat.sum(-1) > 0)  # a diverged fit's NaN rows draw label -1
    flat = torch.where(finite[:, None], flat.clamp_min(0), torch.ones_like(flat))
    draws = torch.multinomial(flat, 1, generator=generator)[:, 0].masked_fill(~finite, -1).reshape(probs.shape[:2])
    log_lik = probs.gather(-1, labels.to(probs.device).expand(probs.shape[0], n)[..., None])[..., 0].clamp_min(1e-30).log()
    kept = (local["inclusion"] > 0).float().mean((1, 2, 3))
    coords = {"image": np.arange(n), "task": list(tasks), "block": list(groups), "class": list(class_names)}
    for name, value in shared.items():  # the hierarchical model's K compositions
        if "component" in dims[name]:
            coords["component"] = np.arange(value.shape[1])
    constant = {"image_index": (image_index if image_index is not None else torch.arange(n)).cpu().numpy()}
    if image_task is not None:
        constant["image_task"] = image_task.cpu().numpy()
    idata = az.from_dict(
        posterior=posterior,
        posterior_predictive={"obs": arr(draws), "probs": arr(probs.float())},
        log_likelihood={"obs": arr(log_lik.float())},
        observed_data={"obs": labels.cpu().numpy()},
        predictions_constant_data=constant,
        sample_stats={"sum_log_likelihood": arr(log_lik.float().sum(-1)), "kept_fraction": arr(kept)},
        constant_data={"task_name": np.array(tasks, dtype=str), "block_name": np.array(groups, dtype=str),
                       "class_name": np.array(class_names, dtype=str)},
        coords=coords,
        dims={**dims, "obs": ["image"], "probs": ["image", "class"], "image_index": ["image"],
              "image_task": ["image"], "task_name": ["task"], "block_name": ["block"], "class_name": ["class"]},
    )
    idata.posterior.attrs.update(attrs or {})  # from_dict's own attrs do not reach every group in arviz 0.23
    idata.add_groups({"svi_trace": xr.Dataset({"elbo": (("step",), np.asarray(elbo_trace, dtype=np.float64))},
                                              coords={"step": np.arange(1, len(elbo_trace) + 1)})})
    return idata


def site_events(prior) -> dict[str, tuple[str, ...]]:
    """The event dims of every site of ``prior``: ``("task", "block")``, ``("task",)`` or ``()``."""
    names = {"tg": ("task", "block"), "t": ("task",), "": ()}
    return {site.name: names[site.shape] for site in prior.sites}


def inclusion_summary(idata: az.InferenceData) -> xr.Dataset:
    """Per (task, block): posterior inclusion probability, mean and sd of λ over draws and images."""
    post = idata.posterior
    return xr.Dataset({
        "inclusion": post["inclusion"].mean(("chain", "draw", "image")),
        "lam_mean": post["lam"].mean(("chain", "draw", "image")),
        "lam_sd": post["lam"].std(("chain", "draw", "image")),
    })


def heldout_log_predictive_density(idata: az.InferenceData) -> dict:
    """The held-out images' log predictive density, computed directly from ``log_likelihood``.

    ``elpd = Σ_i log mean_s p(y_i | s)`` over the saved test images, with the standard error of a
    sum of ``N`` independent terms, ``se = √N · sd_i``. ``−elpd / N`` is their test NLL under the
    Monte Carlo predictive.

    Returns:
        ``{"elpd", "se", "n", "per_image_mean"}``.
    """
    log_lik = idata.log_likelihood["obs"].stack(sample=("chain", "draw")).transpose("image", "sample").values
    draws = log_lik.shape[1]
    peak = log_lik.max(1, keepdims=True)
    pointwise = (peak[:, 0] + np.log(np.exp(log_lik - peak).sum(1))) - np.log(draws)  # log mean_s p(y_i | s)
    n = len(pointwise)
    return {"elpd": float(pointwise.sum()), "se": float(np.sqrt(n) * pointwise.std(ddof=1)) if n > 1 else 0.0,
            "n": n, "per_image_mean": float(pointwise.mean())}


def class_frequency_check(idata: az.InferenceData, interval: float = 0.9) -> xr.Dataset:
    """Categorical posterior predictive check: per class, how many saved images carry it (observed)
    against how many the posterior predictive draws (one label per image and draw).

    Returns:
        dims ``class``: ``observed`` counts, ``predicted`` (mean over draws) and the central
        ``interval`` of the predicted counts (``low``, ``high``); ``outside`` marks classes whose
        observed count falls outside it.
    """
    classes = idata.constant_data["class_name"].values if "class_name" in idata.constant_data else None
    drawn = idata.posterior_predictive["obs"].stack(sample=("chain", "draw")).transpose("sample", "image").values
    num_classes = idata.posterior_predictive["probs"].sizes["class"]
    # a draw of a diverged posterior has label -1 (to_inference_data): it counts in no class
    counts = np.stack([np.bincount(row[row >= 0].astype(int), minlength=num_classes) for row in drawn])  # [S, C]
    observed = np.bincount(idata.observed_data["obs"].values.astype(int), minlength=num_classes)
    tail = (1 - interval) / 2
    low, high = np.quantile(counts, tail, axis=0), np.quantile(counts, 1 - tail, axis=0)
    coords = {"class": classes if classes is not None else np.arange(num_classes)}
    return xr.Dataset({"observed": ("class", observed), "predicted": ("class", counts.mean(0)),
                       "low": ("class", low), "high": ("class", high),
                       "outside": ("class", (observed < low) | (observed > high))}, coords=coords)
