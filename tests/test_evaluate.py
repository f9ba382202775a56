"""Calibration and selection metrics: temperature scaling, bootstrap intervals, selection accuracy."""

import math

import pytest
import torch

from vtvc_pyro.evaluate import (
    apply_temperature,
    bootstrap_intervals,
    classification_metrics,
    fit_temperature,
    paired_bootstrap,
    per_image_scores,
    selection_accuracy,
)


def overconfident(n: int = 4000, true_temperature: float = 2.5, seed: int = 0):
    """Labels drawn from softmax(z / 2.5); the model reports softmax(z): overconfident by T = 2.5."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, 5, generator=g)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, -1), 1, generator=g)[:, 0]
    return torch.softmax(logits, -1), labels


def test_temperature_scaling_recovers_the_true_temperature_and_lowers_nll():
    probs, labels = overconfident()
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(2.5, rel=0.1)
    before, after = classification_metrics(probs, labels), classification_metrics(apply_temperature(probs, temperature), labels)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert after["accuracy"] == before["accuracy"]  # a temperature never changes the argmax
    assert fit_temperature(apply_temperature(probs, 2.5), labels) == pytest.approx(1.0, abs=0.1)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_images():
    probs, labels = overconfident()
    point = classification_metrics(probs, labels)
    wide = bootstrap_intervals(probs[:200], labels[:200], num_resamples=300)
    narrow = bootstrap_intervals(probs, labels, num_resamples=300)
    for k in ("accuracy", "nll", "ece", "brier"):
        assert narrow[k][0] <= point[k] <= narrow[k][1]
        assert narrow[k][1] - narrow[k][0] < wide[k][1] - wide[k][0]
    # a 4000-image accuracy near p has a 95 % half-width of about 1.96 sqrt(p (1 - p) / n)
    half = 1.96 * math.sqrt(point["accuracy"] * (1 - point["accuracy"]) / 4000)
    assert (narrow["accuracy"][1] - narrow["accuracy"][0]) / 2 == pytest.approx(half, rel=0.25)


def test_paired_bootstrap_of_a_method_against_itself_is_exactly_zero():
    probs, labels = overconfident(n=500)
    scores = per_image_scores(probs, labels)
    paired = paired_bootstrap(scores, scores, num_resamples=200)
    for metric in ("accuracy", "nll"):
        assert paired[metric] == {"difference": 0.0, "interval95": [0.0, 0.0]}
    grouped = paired_bootstrap(scores, scores, groups=torch.arange(500) % 3, num_resamples=200)
    assert grouped["accuracy"] == {"difference": 0.0, "interval95": [0.0, 0.0]}


def test_paired_bootstrap_is_tighter_than_two_separate_intervals_and_averages_groups():
    probs, labels = overconfident(n=2000)
    noisy = torch.softmax(torch.log(probs) + 0.3 * torch.randn(probs.shape, generator=torch.Generator().manual_seed(1)), -1)
    a, b = per_image_scores(noisy, labels), per_image_scores(probs, labels)
    paired = paired_bootstrap(a, b, num_resamples=400)
    difference = classification_metrics(noisy, labels)["accuracy"] - classification_metrics(probs, labels)["accuracy"]
    assert paired["accuracy"]["difference"] == pytest.approx(difference, abs=1e-12)
    lo, hi = paired["accuracy"]["interval95"]
    assert lo <= difference <= hi
    # the two methods agree on most images, so the paired interval is far tighter than either method's own
    own = bootstrap_intervals(probs, labels, num_resamples=400)["accuracy"]
    assert hi - lo < 0.6 * (own[1] - own[0])
    # groups: the statistic is the mean of the groups' means, whatever their sizes
    groups = torch.cat([torch.zeros(1500, dtype=torch.long), torch.ones(500, dtype=torch.long)])
    diff = a["accuracy"] - b["accuracy"]
    by_hand = (diff[:1500].mean() + diff[1500:].mean()) / 2
    assert paired_bootstrap(a, b, groups, num_resamples=50)["accuracy"]["difference"] == pytest.approx(float(by_hand))


def test_selection_accuracy_counts_exact_top_k_matches():
    scores = torch.tensor([[5.0, 4.0, 0.0, 0.0],   # domain 0 = {0, 1}: exact
                           [5.0, 0.0, 4.0, 0.0],   # domain 0: top-2 is {0, 2}: miss, top-1 in the set
                           [0.0, 0.0, 1.0, 2.0]])  # domain 1 = {2, 3}: exact
    result = selection_accuracy(scores, torch.tensor([0, 0, 1]), [[0, 1], [2, 3]])
    assert result["overall"] == pytest.approx(2 / 3) and result["per_domain"] == [0.5, 1.0]
    assert result["top1_overall"] == 1.0 and result["chance"] == [1 / 6, 1 / 6]
