"""Every per-sample strategy against the naive per-sample loop, on dense, low-rank and bf16 banks."""

import pytest
import torch

from vtvc_pyro.bank.low_rank import truncate_bank
from vtvc_pyro.bank.task_vectors import TaskVectorBank
from vtvc_pyro.compose.engine import Composer
from vtvc_pyro.errors import ConfigError

from .conftest import random_bank

DENSE = ("auto", "materialize", "linear")
LOW_RANK = ("auto", "lowrank", "materialize", "linear")


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def forward_and_grads(fn, images, lam):
    """Features and the gradients of a fixed random projection of them to ``lam`` and ``images``."""
    lam = lam.clone().requires_grad_(True)
    images = images.clone().requires_grad_(True)
    feats = fn(images, lam)
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(3))
    (feats * weights).sum().backward()
    return feats.detach(), lam.grad, images.grad


def check_against_naive(composer, strategy, m=5, seed=1):
    torch.manual_seed(seed)
    images = torch.randn(m, 3, 16, 16)
    lam = torch.randn(m, composer.num_tasks, composer.num_groups)
    fast = forward_and_grads(lambda x, c: composer.per_sample(x, c, strategy=strategy), images, lam)
    slow = forward_and_grads(composer.naive_per_sample, images, lam)
    for got, want in zip(fast, slow):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("strategy", DENSE)
def test_dense_strategies_match_the_naive_loop_forward_and_backward(strategy, granularity):
    model, _, _, bank = random_bank(num_tasks=3)
    check_against_naive(Composer(model.visual, bank, granularity), strategy)


@pytest.mark.parametrize("strategy", LOW_RANK)
def test_low_rank_strategies_match_the_naive_loop_on_the_truncated_bank(strategy):
    model, _, _, bank = random_bank(num_tasks=4)
    low = truncate_bank(bank, rank=4)
    assert low.factors, "the tiny tower's matrices must be factored at rank 4"
    check_against_naive(Composer(model.visual, low, "block"), strategy)


def test_low_rank_bank_composes_like_its_dense_reconstruction():
    """Factored and densified truncated banks are the same model (the lowrank path vs plain weights)."""
    model, _, _, bank = random_bank(num_tasks=3)
    low = truncate_bank(bank, energy=0.5)
    torch.manual_seed(0)
    images, lam = torch.randn(4, 3, 16, 16), torch.randn(4, 3, len(bank.blocks))
    got = Composer(model.visual, low).per_sample(images, lam)
    want = Composer(model.visual, low.to_dense()).naive_per_sample(images, lam)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("strategy", DENSE)
def test_bf16_storage_is_computed_in_fp32(strategy):
    model, base, vectors, _ = random_bank()
    bank16 = TaskVectorBank.stack(vectors, base, dtype="bfloat16")
    composer = Composer(model.visual, bank16)
    torch.manual_seed(0)
    images, lam = torch.randn(3, 3, 16, 16), torch.randn(3, 3, len(bank16.blocks))
    out = composer.per_sample(images, lam, strategy=strategy)
    assert out.dtype == torch.float32
    assert rel_err(out, composer.naive_per_sample(images, lam)) <= 1e-5


def test_low_rank_bf16_factors():
    model, _, _, bank = random_bank()
    low = truncate_bank(bank, rank=2, dtype="bfloat16")
    assert all(u.dtype == torch.bfloat16 for u, _ in low.factors.values())
    check_against_naive(Composer(model.visual, low), "lowrank", m=3)


@pytest.mark.parametrize("strategy", ["materialize", "linear"])
def test_chunks_of_one_sample_give_the_same_result(strategy):
    """A tiny chunk budget splits every layer into one-sample chunks; results must not change."""
    model, _, _, bank = random_bank()
    check_against_naive(Composer(model.visual, bank, "task", chunk_bytes=1), strategy, m=3)


def test_gradients_reach_only_the_coefficients():
    model, _, _, bank = random_bank()
    for strategy in DENSE:
        composer = Composer(model.visual, bank)
        lam = torch.zeros(2, 3, len(bank.blocks), requires_grad=True)
        composer.per_sample(torch.randn(2, 3, 16, 16), lam, strategy=strategy).sum().backward()
        assert lam.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.visual.parameters())


def test_auto_plan_follows_the_cost_model():
    """Dense bank: one token (the output projection) -> linear, 17 tokens -> materialize; rank-1 factors -> lowrank."""
    model, _, _, bank = random_bank()
    plan = Composer(model.visual, bank).plan()
    assert plan["proj"] == "linear"
    assert plan["transformer.resblocks.0.mlp.c_fc.weight"] == "materialize"
    assert set(Composer(model.visual, truncate_bank(bank, rank=1)).plan().values()) == {"lowrank"}
    assert Composer(model.visual, truncate_bank(bank, rank=16), strategy="lowrank").plan()["conv1.weight"] == "lowrank"
    assert Composer(model.visual, bank).plan(strategy="linear")["conv1.weight"] == "linear"


def test_bad_strategies():
    model, _, _, bank = random_bank()
    with pytest.raises(ConfigError, match="unknown composition strategy"):
        Composer(model.visual, bank, strategy="fast")
    with pytest.raises(ConfigError, match="low-rank bank"):
        Composer(model.visual, bank, strategy="lowrank")
    with pytest.raises(ConfigError, match="low-rank bank"):
        Composer(model.visual, bank).per_sample(torch.randn(1, 3, 16, 16), torch.zeros(1, 3, len(bank.blocks)), "lowrank")
