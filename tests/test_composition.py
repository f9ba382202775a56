import pytest
import torch

from vtvc_pyro.bank.task_vectors import TaskVectorBank
from vtvc_pyro.compose.engine import GRANULARITIES, Composer, block_groups
from vtvc_pyro.errors import ConfigError

from .conftest import random_bank


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_per_sample_matches_naive_loop(granularity):
    model, _, _, bank = random_bank(num_tasks=3)
    composer = Composer(model.visual, bank, granularity)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 16, 16)
    lam = torch.randn(6, 3, composer.num_groups)
    fast = composer.per_sample(images, lam)
    slow = composer.naive_per_sample(images, lam)
    assert fast.shape == (6, model.visual.output_dim)
    assert rel_err(fast, slow) <= 1e-5


def test_zero_coefficients_give_the_base_model():
    model, _, _, bank = random_bank()
    composer = Composer(model.visual, bank)
    images = torch.randn(4, 3, 16, 16)
    base = model.encode_image(images)
    assert rel_err(composer.per_sample(images, torch.zeros(4, 3, len(bank.blocks))), base) <= 1e-5
    assert rel_err(composer.shared(images, torch.zeros(3, len(bank.blocks))), base) <= 1e-5


def test_samples_get_different_models():
    """Two copies of one image with different coefficients give different features."""
    model, _, _, bank = random_bank()
    composer = Composer(model.visual, bank, "task")
    images = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    lam = torch.tensor([[[0.0], [0.0], [0.0]], [[1.0], [0.0], [0.0]]])
    feats = composer.per_sample(images, lam)
    assert not torch.allclose(feats[0], feats[1])
    assert rel_err(feats[1:], composer.shared(images[:1], lam[1])) <= 1e-5


def test_low_precision_storage_computes_in_fp32():
    model, base, vectors, _ = random_bank()
    bank16 = TaskVectorBank.stack(vectors, base, dtype="bfloat16")
    assert all(d.dtype == torch.bfloat16 for d in bank16.deltas.values())
    composer = Composer(model.visual, bank16)
    images = torch.randn(3, 3, 16, 16)
    lam = torch.randn(3, 3, len(bank16.blocks))
    out = composer.per_sample(images, lam)
    assert out.dtype == torch.float32
    assert rel_err(out, composer.naive_per_sample(images, lam)) <= 1e-5


def test_gradients_reach_the_coefficients():
    model, _, _, bank = random_bank()
    composer = Composer(model.visual, bank)
    lam = torch.zeros(2, 3, len(bank.blocks), requires_grad=True)
    composer.per_sample(torch.randn(2, 3, 16, 16), lam).sum().backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.visual.parameters())


def test_layer_groups_and_bad_shapes():
    groups, labels = block_groups(
        ["conv1.weight", "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.1.mlp.c_fc.bias", "proj"], "layer"
    )
    assert labels == ["embed", "layer0", "layer1", "head"] and groups == [0, 1, 2, 3]
    model, _, _, bank = random_bank()
    with pytest.raises(ConfigError, match="granularity"):
        Composer(model.visual, bank, "neuron")
    with pytest.raises(ConfigError, match=r"\[M, T, G\]"):
        Composer(model.visual, bank).per_sample(torch.randn(2, 3, 16, 16), torch.zeros(3, 3, len(bank.blocks)))


def test_layer_groups_follow_the_tower_not_the_parameter_order():
    """open_clip lists ``proj`` before the blocks; it still belongs to the head group."""
    model, _, _, bank = random_bank()
    composer = Composer(model.visual, bank, "layer")
    assert composer.group_labels == ["embed", "layer0", "layer1", "head"]
    assert composer.group_labels[composer.group_of_block["proj"]] == "head"
    assert composer.group_labels[composer.group_of_block["conv1.weight"]] == "embed"
