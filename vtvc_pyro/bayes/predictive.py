"""The posterior predictive of a fitted guide: Monte Carlo draws, and one pass at the gated mean.

Usage::

    probs = mean_probs(model, guide, images, features)                     # [N, C], one composed pass
    probs_s, local, shared = sample_draws(model, guide, images, features)  # [S, N, C] and every site
    scores = predictive_scores(model, guide, val, num_samples=8, temperature=0.01)
"""

from __future__ import annotations

import pyro
import torch

from ..data.split import Split
from ..progress import track


def _rows(x: torch.Tensor | None, i: int, j: int) -> torch.Tensor | None:
    return None if x is None else x[i:j]


@torch.no_grad()
def mean_probs(model, guide, images, features, batch_size: int = 256, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Class probabilities ``[N, C]`` from the deterministic gated mean coefficients.

    ``images [N, 3, H, W]``, ``features [N, D]``; ``classes [N, C]`` bool (optional): each image's
    class set (task addition: its own task's head).
    """
    guide.eval()
    out = []
    for i in range(0, len(images), batch_size):
        lam = guide.mean_coefficients(features[i : i + batch_size])
        out.append(torch.softmax(model.logits(images[i : i + batch_size], lam, _rows(classes, i, i + batch_size)), -1))
    return torch.cat(out)


@torch.no_grad()
def sample_draws(model, guide, images, features, num_samples: int = 20, temperature: float = 0.01,
                 max_copies: int = 512, generator_seed: int | None = None, classes: torch.Tensor | None = None,
                 progress: bool = False, desc: str = "predictive"):
    """Monte Carlo predictive with every posterior site.

    Images are taken in chunks so that at most ``max_copies`` composed towers (draws × images)
    exist at once; the global sites are drawn once and shared by every chunk, so draw ``s`` is one
    joint posterior draw. ``classes [N, C]`` (optional): each image's class set, as in :func:`mean_probs`.
    ``progress``: show the chunks (:func:`~vtvc_pyro.progress.track`, named ``desc``).

    Returns:
        ``probs [S, N, C]`` per draw, ``local`` (``lam``, ``inclusion`` ``[S, N, T, G]`` and the
        per-image sites, each ``[S, N, ...]``) and ``shared`` (the global sites, ``[S, ...]``).
    """
    batch_size = max(1, max_copies // num_samples)
    guide.eval()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    probs, chunks, shared = [], [], None
    for i in track(range(0, len(images), batch_size), desc, enabled=progress, leave=False):
        with pyro.validation_enabled(False):  # a diverged fit evaluates to NaN instead of raising (see fit_svi)
            local, shared = guide.sample_posterior(features[i : i + batch_size], num_samples, temperature, shared)
        logits = model.logits(images[i : i + batch_size], local["lam"], _rows(classes, i, i + batch_size))
        probs.append(torch.softmax(logits, -1))
        chunks.append(local)
    local = {name: torch.cat([c[name] for c in chunks], 1) for name in chunks[0]}
    return torch.cat(probs, 1), local, shared


def sample_probs(model, guide, images, features, num_samples: int = 20, temperature: float = 0.01,
                 max_copies: int = 512, generator_seed: int | None = None, classes: torch.Tensor | None = None):
    """:func:`sample_draws` reduced to ``probs [S, N, C]``, ``lam [S, N, T, G]`` and the inclusion ``[S, N, T, G]``."""
    probs, local, _ = sample_draws(model, guide, images, features, num_samples, temperature, max_copies,
                                   generator_seed, classes)
    return probs, local["lam"], local["inclusion"]


def predictive_scores(model, guide, val: Split, num_samples: int, temperature: float, seed: int = 0) -> dict[str, float]:
    """NLL and accuracy of the Monte Carlo predictive on ``val``.

    The draws use their own seed (common random numbers across checkpoints) and leave the
    training RNG untouched.
    """
    device = val.features.device  # the features: images may be a lazily decoded view
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probs = sample_probs(model, guide, val.images, val.features, num_samples, temperature, generator_seed=seed,
                             classes=val.classes)[0].mean(0)
    labels = val.labels.to(probs.device)
    nll = -probs.gather(-1, labels[:, None]).clamp_min(1e-12).log().mean()
    return {"nll": float(nll), "accuracy": float((probs.argmax(-1) == labels).float().mean())}
