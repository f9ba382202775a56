"""Metrics of probabilistic classifiers: accuracy, NLL, ECE, Brier; and selective prediction."""

from __future__ import annotations

import math

import torch


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (``probs [N, C]``, ``labels [N]``)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, num_bins + 1, device=probs.device)
    ece = probs.new_zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (conf[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean NLL, ECE (15 bins) and Brier score (sum over classes, mean over samples).

    Args:
        probs: ``[N, C]`` predictive probabilities (rows sum to 1).
        labels: ``[N]``.
    """
    probs = probs.double()
    labels = labels.to(probs.device)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return {
        "accuracy": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(-probs.gather(-1, labels[:, None]).clamp_min(1e-12).log().mean()),
        "ece": expected_calibration_error(probs, labels),
        "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
    }


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of ``probs [..., C]`` in nats."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def mutual_information(sample_probs: torch.Tensor) -> torch.Tensor:
    """Epistemic part of the uncertainty: H[E_s p] − E_s H[p] from ``sample_probs [S, N, C]`` -> ``[N]``."""
    return predictive_entropy(sample_probs.mean(0)) - predictive_entropy(sample_probs).mean(0)


def accuracy_coverage(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective prediction: keep the most confident (lowest entropy) fraction of samples.

    Returns:
        ``coverage [N]`` (k/N for k = 1..N) and the accuracy on the kept samples ``[N]``.
    """
    order = predictive_entropy(probs).argsort()
    correct = (probs.argmax(-1) == labels.to(probs.device)).double()[order]
    k = torch.arange(1, len(order) + 1, device=probs.device, dtype=torch.float64)
    return k / len(order), correct.cumsum(0) / k


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of ``softmax(log probs / T)`` (Guo et al., 2017).

    Fitted on val and applied to test by :func:`apply_temperature`. ``log probs`` of a Monte Carlo
    predictive work as logits (softmax of them gives the predictive back at T = 1). A golden-section
    search on log T: the NLL is unimodal in it.

    Args:
        probs: ``[N, C]``; labels: ``[N]``.
    """
    logp = probs.double().clamp_min(1e-12).log()
    labels = labels.to(probs.device)

    def nll(log_t: float) -> float:
        return float(-torch.log_softmax(logp / math.exp(log_t), -1).gather(-1, labels[:, None]).mean())

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log probs / T)``: ``[N, C]`` -> ``[N, C]``."""
    return torch.softmax(probs.double().clamp_min(1e-12).log() / temperature, -1).to(probs.dtype)


def bootstrap_intervals(probs: torch.Tensor, labels: torch.Tensor, num_resamples: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of :func:`classification_metrics` by resampling the test images.

    Returns:
        metric -> ``[low, high]`` at ``level``.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    draws = {k: [] for k in ("accuracy", "nll", "ece", "brier")}
    probs, labels = probs.double().cpu(), labels.cpu()
    for _ in range(num_resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        for k, v in classification_metrics(probs[idx], labels[idx]).items():
            draws[k].append(v)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {k: [float(x) for x in torch.quantile(torch.tensor(v, dtype=torch.float64), q)] for k, v in draws.items()}


def per_image_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's correctness and NLL: ``{"accuracy": [N] 0/1, "nll": [N]}`` (float64, CPU)."""
    probs, labels = probs.double().cpu(), labels.cpu()
    return {"accuracy": (probs.argmax(-1) == labels).double(),
            "nll": -probs.gather(-1, labels[:, None]).squeeze(1).clamp_min(1e-12).log()}


def paired_bootstrap(scores: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     groups: torch.Tensor | None = None, num_resamples: int = 1000, level: float = 0.95,
                     seed: int = 0) -> dict[str, dict]:
    """The difference ``scores − reference`` of two methods on the same test images, with a paired
    percentile bootstrap interval: each resample draws the same images for both methods, so what the
    two methods share (the images' difficulty) cancels.

    Args:
        scores, reference: metric -> ``[N]`` per-image values (:func:`per_image_scores`) of the method
            and of the method it is compared with.
        groups: ``[N]`` optional group of each image (task addition: its task). The statistic is then
            the mean over groups of each group's mean, and images are resampled within their group.

    Returns:
        metric -> ``{"difference": float, "interval95": [low, high]}`` (the key names ``level``'s
        default; the values are at ``level``). A method against itself gives exactly 0 and ``[0, 0]``.
    """
    groups = torch.zeros(len(next(iter(scores.values()))), dtype=torch.long) if groups is None else groups.cpu()
    g = torch.Generator().manual_seed(seed)
    members = [(groups == k).nonzero().squeeze(1) for k in groups.unique()]
    draws = [rows[torch.randint(0, len(rows), (num_resamples, len(rows)), generator=g)] for rows in members]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {}
    for metric, values in scores.items():
        diff = values.double().cpu() - reference[metric].double().cpu()  # [N]
        point = torch.stack([diff[rows].mean() for rows in members]).mean()
        resampled = torch.stack([diff[idx].mean(1) for idx in draws]).mean(0)  # [R]
        out[metric] = {"difference": float(point), "interval95": [float(x) for x in torch.quantile(resampled, q)]}
    return out


def selection_accuracy(scores: torch.Tensor, domains: torch.Tensor, domain_tasks: list[list[int]]) -> dict:
    """How often an image's top-k task vectors are exactly the ones its domain was made with.

    Args:
        scores: ``[N, T]`` importance of each task vector for each image (e.g. Σ_g inclusion × |E λ|).
        domains: ``[N]`` the domain of each image, an index into ``domain_tasks``.
        domain_tasks: per domain, the indices of its source task vectors (k = their number).

    Returns:
        ``{"overall", "per_domain", "chance", "top1_overall", "top1_per_domain"}``: exact top-k
        matches (chance: one over the number of k-subsets of the T vectors), and how often the
        image's single highest-ranked vector is one of its domain's.
    """
    domains = domains.cpu()
    scores = scores.cpu()
    hits = torch.zeros(len(domains), dtype=torch.bool)
    top1 = torch.zeros(len(domains), dtype=torch.bool)
    for d, tasks in enumerate(domain_tasks):
        sel = domains == d
        if sel.any() and tasks:
            top = scores[sel].topk(len(tasks), dim=-1).indices.sort(-1).values
            hits[sel] = (top == torch.tensor(sorted(tasks))).all(-1)
            top1[sel] = torch.isin(scores[sel].argmax(-1), torch.tensor(tasks))

    def by_domain(x: torch.Tensor) -> list[float]:
        return [float(x[domains == d].float().mean()) if (domains == d).any() else float("nan")
                for d in range(len(domain_tasks))]

    chance = [1 / math.comb(scores.shape[-1], len(t)) if t else float("nan") for t in domain_tasks]
    return {"overall": float(hits.float().mean()), "per_domain": by_domain(hits), "chance": chance,
            "top1_overall": float(top1.float().mean()), "top1_per_domain": by_domain(top1)}
