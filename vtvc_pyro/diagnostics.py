"""Posterior as ArviZ InferenceData (arviz < 1): the one place that knows the ArviZ API.

SVI draws are independent samples of the guide, stored as one chain. Groups:

* ``posterior``: ``lam`` and ``gate`` with dims (chain, draw, sample, task, block) for the saved
  evaluation samples (``block`` holds the coefficient groups: blocks, layers or ``all``);
* ``posterior_predictive``: class probabilities per draw (chain, draw, sample, class);
* ``observed_data``: labels; ``sample_stats``: the ELBO trace (dim ``step``);
* ``constant_data``: the task, block and class names (also the coords).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from .io import atomic_write

# arviz 0.23 announces its 1.0 refactor when first imported; that one notice is noise for our users.
# Silenced for the import only: the process's warning filters are left as they were.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
    import arviz as az


def to_inference_data(
    lam: torch.Tensor,
    gate: torch.Tensor,
    sample_probs: torch.Tensor,
    labels: torch.Tensor,
    tasks: Sequence[str],
    groups: Sequence[str],
    class_names: Sequence[str],
    elbo_trace: Sequence[float],
    sample_index: torch.Tensor | None = None,
    attrs: dict | None = None,
) -> az.InferenceData:
    """Build InferenceData from guide draws.

    Args:
        lam, gate: ``[S, N, T, G]`` posterior draws for ``N`` evaluation samples.
        sample_probs: ``[S, N, C]`` predictive probabilities per draw.
        labels: ``[N]``.
        sample_index: ``[N]`` positions of the saved samples in the evaluation split.
    """
    n = lam.shape[1]
    coords = {
        "chain": [0],
        "draw": np.arange(lam.shape[0]),
        "sample": (sample_index if sample_index is not None else torch.arange(n)).cpu().numpy(),
        "task": list(tasks),
        "block": list(groups),
        "class": list(class_names),
    }

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()[None]

    dims = ("chain", "draw", "sample", "task", "block")
    posterior = xr.Dataset(
        {"lam": (dims, arr(lam)), "gate": (dims, arr(gate))},
        coords={k: coords[k] for k in dims},
        attrs=dict(attrs or {}),
    )
    predictive = xr.Dataset(
        {"probs": (("chain", "draw", "sample", "class"), arr(sample_probs))},
        coords={k: coords[k] for k in ("chain", "draw", "sample", "class")},
    )
    observed = xr.Dataset({"obs": (("sample",), labels.cpu().numpy())}, coords={"sample": coords["sample"]})
    stats = xr.Dataset({"elbo": (("step",), np.asarray(elbo_trace, dtype=np.float64))},
                       coords={"step": np.arange(1, len(elbo_trace) + 1)})
    constant = xr.Dataset(
        {"task_name": (("task",), np.array(tasks, dtype=str)), "block_name": (("block",), np.array(groups, dtype=str)),
         "class_name": (("class",), np.array(class_names, dtype=str))},
        coords={"task": coords["task"], "block": coords["block"], "class": coords["class"]},
    )
    return az.InferenceData(posterior=posterior, posterior_predictive=predictive, observed_data=observed,
                            sample_stats=stats, constant_data=constant)


def save_inference_data(idata: az.InferenceData, path: str | Path) -> None:
    """``idata`` as netCDF, atomically."""
    atomic_write(path, lambda tmp: idata.to_netcdf(str(tmp)))


def inclusion_summary(idata: az.InferenceData) -> xr.Dataset:
    """Per (task, block): posterior inclusion probability, mean and sd of λ over draws and samples."""
    post = idata.posterior
    return xr.Dataset({
        "inclusion": post["gate"].mean(("chain", "draw", "sample")),
        "lam_mean": post["lam"].mean(("chain", "draw", "sample")),
        "lam_sd": post["lam"].std(("chain", "draw", "sample")),
    })
