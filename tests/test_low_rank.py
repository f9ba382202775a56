"""Low-rank banks: truncated SVD by rank or energy, safetensors round trip, checks on bad input."""

import pytest
import torch

from vtvc_pyro.bank.low_rank import (
    load_low_rank,
    relative_error,
    save_low_rank,
    truncate_bank,
)
from vtvc_pyro.errors import BankError, ConfigError

from .conftest import random_bank

C_FC = "transformer.resblocks.0.mlp.c_fc.weight"


def test_rank_truncation_is_the_best_rank_r_approximation():
    _, _, _, bank = random_bank(num_tasks=2)
    low = truncate_bank(bank, rank=3)
    assert low.ranks[C_FC] == [3, 3]
    u, v = low.factors[C_FC]
    assert u.shape == (2, 256, 3) and v.shape == (2, 3, 64)
    delta = bank.block_delta(C_FC)
    s = torch.linalg.svdvals(delta)
    err = (low.block_delta(C_FC) - delta).flatten(1).norm(dim=1)
    assert torch.allclose(err, s[:, 3:].norm(dim=1), rtol=1e-4)  # Eckart–Young
    assert "positional_embedding" in low.dense and "conv1.weight" in low.factors
    assert low.storage_bytes() < bank.storage_bytes()


def test_full_rank_keeps_blocks_dense_and_exact():
    _, _, _, bank = random_bank()
    low = truncate_bank(bank, rank=64)
    assert not low.factors
    assert relative_error(low, bank) == 0.0


def test_energy_truncation_keeps_at_least_that_energy_per_task():
    _, _, _, bank = random_bank(num_tasks=3)
    low = truncate_bank(bank, energy=0.6)
    for name, kept in low.kept_energy.items():
        assert all(k >= 0.6 - 1e-6 for k in kept)
        s = torch.linalg.svdvals(bank.block_delta(name).float().flatten(2))
        for t, r in enumerate(low.ranks[name]):  # and it is the fewest directions that do
            assert float(s[t, : r - 1].square().sum() / s[t].square().sum()) < 0.6


def test_save_and_load_round_trip(tmp_path):
    _, base, _, bank = random_bank()
    low = truncate_bank(bank, rank=4, dtype="bfloat16")
    save_low_rank(low, tmp_path / "r4.safetensors")
    back = load_low_rank(tmp_path / "r4.safetensors", base)
    assert back.tasks == low.tasks and back.blocks == low.blocks and back.ranks == low.ranks
    for name in low.blocks:
        assert torch.equal(back.block_delta(name), low.block_delta(name))
    assert back.factors[C_FC][0].dtype == torch.bfloat16
    sub = back.select(["t2", "t0"])
    assert torch.equal(sub.block_delta(C_FC)[0], low.block_delta(C_FC)[2])


def test_bad_input(tmp_path):
    _, base, _, bank = random_bank()
    with pytest.raises(ConfigError, match="exactly one"):
        truncate_bank(bank)
    with pytest.raises(ConfigError, match="rank"):
        truncate_bank(bank, rank=0)
    with pytest.raises(ConfigError, match="energy"):
        truncate_bank(bank, energy=1.5)
    with pytest.raises(BankError, match="does not exist"):
        load_low_rank(tmp_path / "missing.safetensors", base)
    path = tmp_path / "r2.safetensors"
    save_low_rank(truncate_bank(bank, rank=2), path)
    other = {k: v + 1 for k, v in base.items()}
    with pytest.raises(BankError, match="base model"):
        load_low_rank(path, other)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BankError, match="corrupt"):
        load_low_rank(path, base)
    with pytest.raises(BankError, match="not in the bank"):
        truncate_bank(bank, rank=2).select(["nope"])


def test_real_bank_truncation_is_composed_exactly(loaded_bank):
    """The embedded bank at rank 16: about 30 % relative error, and every strategy is exact on it."""
    from vtvc_pyro.compose.engine import Composer

    low = truncate_bank(loaded_bank.vectors.select(["digits-rotated", "digits-inverted"]), rank=16)
    assert 0.1 < relative_error(low, loaded_bank.vectors.select(["digits-rotated", "digits-inverted"])) < 0.5
    composer = Composer(loaded_bank.model.visual, low, "layer")
    torch.manual_seed(0)
    images, lam = torch.rand(3, 3, 16, 16), torch.rand(3, 2, composer.num_groups)
    want = composer.naive_per_sample(images, lam)
    for strategy in ("lowrank", "materialize", "linear"):
        got = composer.per_sample(images, lam, strategy=strategy)
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_shared_composition_applies_factors_when_rebuilding_costs_more():
    """aTLAS's pass on a low-rank bank: at a small batch the factors are applied to the tokens (no dense
    rebuild of U diag(λ) V), with the same features and gradients as the rebuilt weights."""
    from vtvc_pyro.compose.engine import Composer

    model, _, _, bank = random_bank(num_tasks=3)
    composer = Composer(model.visual, truncate_bank(bank, rank=2), "block")
    torch.manual_seed(0)
    small, large = torch.rand(1, 3, 16, 16), torch.rand(64, 3, 16, 16)
    assert "transformer.resblocks.0.attn.in_proj_weight" in composer._factored_for(small)
    assert not composer._factored_for(large)  # 64 images: one dense rebuild is cheaper
    for images in (small,):  # (the large batch takes the rebuilt path itself)
        lam = torch.randn(3, composer.num_groups, requires_grad=True)
        got = composer.shared(images, lam)
        (grad,) = torch.autograd.grad(got.square().sum(), lam)
        want = composer.rebuilt_shared(images, lam)
        (want_grad,) = torch.autograd.grad(want.square().sum(), lam)
        assert torch.allclose(got, want, atol=1e-5) and torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-5)
