"""Metrics of probabilistic classifiers: accuracy, NLL, ECE, Brier; and selective prediction."""

from __future__ import annotations

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
