"""Zero-shot heads for one task or several: logits, and the per-image class sets of task addition.

In task addition every image belongs to one task and is scored with that task's own frozen head. The
heads of all tasks are stacked into one ``[C, D]`` matrix (``C = Σ_t C_t``); an image's logits are
computed against all of it and the classes of other tasks are masked out (``classes [N, C]`` bool),
which is exactly a softmax over its own task's head. With one task, ``classes`` is ``None``.

Usage::

    heads = TaskHeads(["digits", "parity"], [head_digits, head_parity])
    classes = heads.classes_for(task_index)        # [N, C] bool
    logits = class_logits(features, heads.weight, classes)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def class_logits(features: torch.Tensor, head: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-shot logits ``[*P, N, C]`` of ``features [*P, N, D]`` and ``head [C, D]`` (logit scale included).

    ``classes [N, C]`` (bool, optional): the classes each image may take; the others get a logit
    far below any real one, so their probability is exactly 0 and the softmax is over the image's own head.
    """
    logits = F.normalize(features, dim=-1) @ head.T
    return logits if classes is None else mask_logits(logits, classes)


def mask_logits(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logits [*P, N, C]`` with the classes outside ``classes [N, C]`` set to the dtype's lowest value / 2
    (finite, so no ``inf - inf`` in a log-softmax)."""
    return logits.masked_fill(~classes.to(logits.device), torch.finfo(logits.dtype).min / 2)


@dataclass
class TaskHeads:
    """The zero-shot heads of several tasks, stacked.

    Args:
        names: ``T`` task names.
        heads: per task ``[C_t, D]``.
    """

    names: list[str]
    heads: list[torch.Tensor]

    @property
    def weight(self) -> torch.Tensor:
        """``[C, D]``, the heads one after the other."""
        return torch.cat(self.heads)

    @property
    def offsets(self) -> list[int]:
        """``T + 1`` offsets: task ``t``'s classes are columns ``offsets[t]:offsets[t + 1]``."""
        out = [0]
        for h in self.heads:
            out.append(out[-1] + h.shape[0])
        return out

    @property
    def class_task(self) -> torch.Tensor:
        """``[C]``: the task index of every column."""
        return torch.cat([torch.full((h.shape[0],), t, dtype=torch.long) for t, h in enumerate(self.heads)])

    def columns(self, task: int) -> slice:
        off = self.offsets
        return slice(off[task], off[task + 1])

    def classes_for(self, task_index: torch.Tensor) -> torch.Tensor:
        """``task_index [N]`` -> ``[N, C]`` bool: the columns of each image's own head."""
        return self.class_task.to(task_index.device)[None, :] == task_index[:, None]

    def global_labels(self, task_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels ``[N]`` of each image's own task -> columns of the stacked head ``[N]``."""
        offsets = torch.tensor(self.offsets[:-1], device=labels.device)
        return offsets[task_index.to(labels.device)] + labels

    def to(self, device) -> TaskHeads:
        return TaskHeads(list(self.names), [h.to(device) for h in self.heads])
