"""Truncation report: what truncating a bank's task vectors to low rank costs, measured on its own data."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..bank.low_rank import relative_error, truncate_bank
from ..compose.engine import Composer
from ..data import specs, suite
from ..data.specs import with_validation
from ..data.split import Split
from ..methods import merges


def _val_split(task) -> Split:
    """The val images and labels of a data set (no features: task arithmetic does not read them)."""
    images, labels = task.split("val")
    return Split(images, None, labels)


@torch.no_grad()
def truncation_report(loaded, ranks: Iterable[int] = (2, 4, 8, 16), energies: Iterable[float] = (),
                      targets: Iterable[str] | None = None, seed: int | None = None) -> list[dict]:
    """Accuracy cost of truncating a bank's task vectors, by cheap measures on its own data.

    For the full bank and each rank (or kept energy): each source task's accuracy with its own
    vector at λ = 1 (its fine-tuned accuracy when untruncated) and the mean over the sources; task
    arithmetic over all vectors on each held-out target (λ chosen on val, accuracy on test); the
    relative Frobenius error of the vectors and their storage.

    Args:
        loaded: a :class:`~vtvc_pyro.bank.store.LoadedBank`.
        targets: held-out targets for task arithmetic (default: the embedded suite's).

    Returns:
        one dict per setting (``full``, ``r=R``, ``energy=E``).
    """
    seed = loaded.manifest.get("config", {}).get("seed", 0) if seed is None else seed
    visual, full = loaded.model.visual, loaded.vectors
    sources = {t: specs.load_dataset(t, seed) for t in full.tasks}
    held_out = {t: with_validation(specs.load_dataset(t, seed), seed) for t in (suite.TARGETS if targets is None else targets)}
    settings = [("full", full), *((f"r={r}", truncate_bank(full, rank=r)) for r in ranks),
                *((f"energy={e}", truncate_bank(full, energy=e)) for e in energies)]
    rows = []
    for label, bank in settings:
        row = {"setting": label, "storage_mib": round(bank.storage_bytes() / 2**20, 3),
               "relative_error": 0.0 if bank is full else round(relative_error(bank, full), 4), "source_accuracy": {}}
        for name, task in sources.items():
            x, y = task.split("test")
            composer = Composer(visual, bank.select([name]), "task")
            probs = merges.predict_shared(composer, loaded.head_for(task), x, torch.ones(1, 1))
            row["source_accuracy"][name] = round(float((probs.argmax(-1) == y).float().mean()), 4)
        row["mean_source_accuracy"] = round(sum(row["source_accuracy"].values()) / len(sources), 4)
        row["task_arithmetic_accuracy"] = {}
        composer = Composer(visual, bank, "task")
        for name, task in held_out.items():
            head = loaded.head_for(task)
            lam, _ = merges.task_arithmetic(composer, head, _val_split(task))
            x, y = task.split("test")
            probs = merges.predict_shared(composer, head, x, lam)
            row["task_arithmetic_accuracy"][name] = round(float((probs.argmax(-1) == y).float().mean()), 4)
        rows.append(row)
    return rows
