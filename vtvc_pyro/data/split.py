"""``Split``: one split of a data set as every fitting function takes it (never a positional tuple).

Usage::

    train = Split(images, features, labels)              # transfer: one head
    test = Split(images, features, labels, classes)      # task addition: each image's own classes
    batch = train.rows(idx)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # tensors have no truth value: no generated ==
class Split:
    """Images with their base features and labels, on one device.

    Attributes:
        images: ``[N, 3, H, W]`` (or a lazily decoded view that supports indexing with a tensor).
        features: ``[N, D]`` base CLIP image features (what the amortized guide reads); ``None``
            where nothing reads them (the baselines, which compose shared coefficients).
        labels: ``[N]`` class indices (in task addition: columns of the stacked heads).
        classes: ``[N, C]`` bool, the classes each image may take (task addition: its own task's
            head), or ``None`` when every image takes every class.
    """

    images: torch.Tensor
    features: torch.Tensor | None
    labels: torch.Tensor
    classes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: torch.Tensor | slice) -> Split:
        """The images at ``index`` (a tensor of indices or a slice)."""
        return Split(self.images[index], None if self.features is None else self.features[index],
                     self.labels[index], self.class_rows(index))

    def class_rows(self, index: torch.Tensor | slice) -> torch.Tensor | None:
        """``classes[index]``, or ``None`` when the split has no class sets."""
        return None if self.classes is None else self.classes[index]


@dataclass(frozen=True, eq=False)
class FewShotRows:
    """The rows a few-shot protocol keeps of a learning split and of its val split."""

    train: torch.Tensor
    val: torch.Tensor


def _draw_per_group(groups: torch.Tensor, counts: dict[int, int], generator: torch.Generator) -> torch.Tensor:
    """``counts[g]`` rows of each group ``g``, drawn without replacement, in data set order."""
    keep = []
    for g, k in counts.items():
        rows = (groups == g).nonzero().squeeze(1)
        keep.append(rows[torch.randperm(len(rows), generator=generator)[:k]])
    return torch.cat(keep).sort().values if keep else groups.new_zeros(0)


def few_shot_rows(train_groups: torch.Tensor, val_groups: torch.Tensor, shots: int, seed: int = 0,
                  min_val: int = 2) -> FewShotRows:
    """An aTLAS-style few-shot protocol: ``shots`` learning rows per group, and val shrunk in proportion.

    Args:
        train_groups: ``[N_train]`` the group of each learning row (its class in transfer, its task in
            task addition); a group with fewer rows keeps all of them.
        val_groups: ``[N_val]`` the group of each val row (its class: val keeps every class).
        shots: rows per group of the learning split.
        seed: which rows (a new seed draws another subset).
        min_val: val keeps at least this many rows of each of its groups (or all it has).

    Returns:
        the kept rows of each split, in data set order.
    """
    g = torch.Generator().manual_seed(seed)
    train_groups, val_groups = train_groups.cpu(), val_groups.cpu()
    train = _draw_per_group(train_groups, {int(k): shots for k in train_groups.unique()}, g)
    fraction = len(train) / max(len(train_groups), 1)
    sizes = {int(k): int((val_groups == k).sum()) for k in val_groups.unique()}
    val = _draw_per_group(val_groups, {k: min(n, max(min_val, round(n * fraction))) for k, n in sizes.items()}, g)
    return FewShotRows(train, val)
