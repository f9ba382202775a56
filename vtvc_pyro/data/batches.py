"""The resumable mini-batch sampler shared by SVI and the learned baselines."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError


class MinibatchSampler:
    """Shuffled mini-batches epoch by epoch (no sample repeats within an epoch); its state can be saved.

    Usage::

        sampler = MinibatchSampler(200, 64, seed=0)
        idx = sampler.next()        # [64] indices
    """

    def __init__(self, num_data: int, batch_size: int, seed: int):
        if batch_size <= 0 or num_data <= 0:
            raise ConfigError(f"need batch_size > 0 and data; got batch_size={batch_size}, n={num_data}")
        self.num_data, self.batch_size = num_data, min(batch_size, num_data)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(num_data, generator=self.generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.num_data:
            self.perm, self.pos = torch.randperm(self.num_data, generator=self.generator), 0
        self.pos += self.batch_size
        return self.perm[self.pos - self.batch_size : self.pos]

    def state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": torch.tensor(self.pos)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], int(state["pos"])


def minibatch_indices(num_data: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` mini-batches of indices from a :class:`MinibatchSampler`."""
    if steps <= 0:
        raise ConfigError(f"steps must be > 0, got {steps}")
    sampler = MinibatchSampler(num_data, batch_size, seed)
    for _ in range(steps):
        yield sampler.next()
