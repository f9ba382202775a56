"""``Split``: one split of a data set as every fitting function takes it (never a positional tuple).

Usage::

    train = Split(images, features, labels)              # transfer: one head
    test = Split(images, features, labels, classes)      # task addition: each image's own classes
    batch = train.rows(idx)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
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
