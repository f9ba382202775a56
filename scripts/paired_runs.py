"""Paired comparison of two methods stored in two run folders on the same test images.

Each ``RUN:METHOD`` names a run folder written by ``vtvc fit`` and one of its methods in
``predictions.safetensors`` (``vtvc``, ``vtvc_mean``, ``router``, ``flat_twin``, ``atlas``, ...). The
two runs must hold the same test images (same target or tasks, same seed of the data): their
labels are compared and a mismatch is refused. Prints, for B − A: the paired bootstrap difference
in accuracy and NLL with its 95 % interval (images resampled within their task in task addition,
where the statistic is the mean over tasks, as a run computes it), and each method's area under the
accuracy–coverage curve (selective accuracy averaged over coverages, rejecting the highest
predictive entropy first).

    python scripts/paired_runs.py runs/v2/add/hier/s0:flat_twin runs/v3/add-expect/s0:vtvc
"""

from __future__ import annotations

import sys

import torch

from vtvc_pyro.evaluate import accuracy_coverage, paired_bootstrap, per_image_scores
from vtvc_pyro.run_folder import RunFolder


def load(spec: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``RUN:METHOD`` -> (the run's prediction tensors, that method's ``[N, C]`` test probabilities)."""
    run, _, method = spec.rpartition(":")
    if not run or not method:
        sys.exit(f"error: write RUN:METHOD, got {spec!r}")
    tensors = RunFolder(run).read_predictions()
    if method not in tensors:
        sys.exit(f"error: {run} has no predictions of {method!r}: it has {', '.join(sorted(tensors))}")
    return tensors, tensors[method]


def selective_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean accuracy over the coverage curve (lowest predictive entropy first)."""
    _, accuracy = accuracy_coverage(probs, labels)
    return float(accuracy.mean())


def main(a_spec: str, b_spec: str) -> None:
    a_run, a = load(a_spec)
    b_run, b = load(b_spec)
    if not torch.equal(a_run["labels"], b_run["labels"]):
        sys.exit("error: the two runs hold different test images (labels differ): compare runs of the same data and seed")
    labels, groups = a_run["labels"], a_run.get("task_index")
    paired = paired_bootstrap(per_image_scores(b, labels), per_image_scores(a, labels), groups)
    acc, nll = paired["accuracy"], paired["nll"]
    print(f"{b_spec} - {a_spec}: accuracy {100 * acc['difference']:+.2f} "
          f"[{100 * acc['interval95'][0]:+.2f}, {100 * acc['interval95'][1]:+.2f}] points, "
          f"NLL {nll['difference']:+.4f} [{nll['interval95'][0]:+.4f}, {nll['interval95'][1]:+.4f}]; "
          f"selective AUC {selective_auc(a, labels):.4f} (A) {selective_auc(b, labels):.4f} (B)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/paired_runs.py RUN_A:METHOD RUN_B:METHOD")
    main(sys.argv[1], sys.argv[2])
