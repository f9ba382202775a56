import pytest
import torch
from safetensors.torch import load_file

from vtvc_pyro import backbone
from vtvc_pyro.bank.task_vectors import (
    TaskVector,
    TaskVectorBank,
    load_pickled_checkpoint,
)
from vtvc_pyro.errors import BankError

from .conftest import random_bank


def test_round_trip_is_bit_exact(tmp_path):
    _, base, vectors, _ = random_bank(num_tasks=1)
    vectors[0].save(tmp_path / "t0.safetensors")
    back = TaskVector.load(tmp_path / "t0.safetensors", base=base, arch=backbone.TINY_MODEL)
    assert back.task == "t0" and back.base_fingerprint == vectors[0].base_fingerprint
    for name, value in vectors[0].deltas.items():
        assert torch.equal(back.deltas[name], value)


def test_other_base_model_is_refused(tmp_path):
    _, _, vectors, _ = random_bank(num_tasks=1, seed=0)
    _, other_base, _, _ = random_bank(num_tasks=1, seed=1)
    vectors[0].save(tmp_path / "t0.safetensors")
    with pytest.raises(BankError, match="base model"):
        TaskVector.load(tmp_path / "t0.safetensors", base=other_base)


def test_shape_mismatch_names_the_tensor(tmp_path):
    _, base, vectors, _ = random_bank(num_tasks=1)
    vectors[0].deltas["proj"] = torch.zeros(3, 3)
    vectors[0].save(tmp_path / "bad.safetensors")
    with pytest.raises(BankError, match=r"block proj: shape \(3, 3\) != base \(64, 64\)"):
        TaskVector.load(tmp_path / "bad.safetensors", base=base)
    ft = {k: v.clone() for k, v in base.items()}
    ft["conv1.weight"] = torch.zeros(1)
    with pytest.raises(BankError, match="conv1.weight"):
        TaskVector.from_state_dicts(ft, base, backbone.TINY_MODEL, "x")


def test_truncated_and_nan_files_are_refused(tmp_path):
    _, base, vectors, _ = random_bank(num_tasks=1)
    path = tmp_path / "t0.safetensors"
    vectors[0].save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match="truncated or corrupt"):
        TaskVector.load(tmp_path / "cut.safetensors")
    vectors[0].deltas["proj"][0, 0] = float("nan")
    vectors[0].save(tmp_path / "nan.safetensors")
    with pytest.raises(BankError, match="NaN or Inf in block proj"):
        TaskVector.load(tmp_path / "nan.safetensors")


def test_stacked_bank_drops_zero_blocks_and_stores_low_precision():
    _, base, vectors, _ = random_bank(num_tasks=2)
    for v in vectors:
        v.deltas["ln_post.bias"].zero_()
    bank = TaskVectorBank.stack(vectors, base, dtype="float16")
    assert "ln_post.bias" not in bank.deltas and "ln_post.bias" in bank.base
    assert bank.deltas["proj"].shape == (2, 64, 64) and bank.deltas["proj"].dtype == torch.float16
    assert bank.select(["t1"]).deltas["proj"].shape == (1, 64, 64)
    with pytest.raises(BankError, match="not in the bank"):
        bank.select(["nope"])


def test_pickled_module_needs_trust(tmp_path):
    """A pickled open_clip module (as task_vectors publishes) imports only with the trust flag."""
    model, base, _, _ = random_bank(num_tasks=1)
    path = tmp_path / "finetuned.pt"
    torch.save(model, path)  # test fixture in the published format; the project never writes pickles
    with pytest.raises(BankError, match="trust"):
        load_pickled_checkpoint(path)
    state = load_pickled_checkpoint(path, trust=True)
    tv = TaskVector.from_state_dicts(state, base, backbone.TINY_MODEL, "ft")
    assert set(tv.deltas) == set(base) and all(d.abs().max() == 0 for d in tv.deltas.values())


def test_vit_b32_stacks_152_blocks(tmp_path):
    torch.manual_seed(0)
    model = backbone.create_clip("ViT-B-32")
    base = backbone.image_tower_params(model)
    assert len(base) == 152
    ft = {k: v + 1e-3 for k, v in base.items()}
    tv = TaskVector.from_state_dicts(ft, base, "ViT-B-32", "fake")
    tv.save(tmp_path / "b32.safetensors", dtype="bfloat16")
    assert len(load_file(str(tmp_path / "b32.safetensors"))) == 152
    bank = TaskVectorBank.stack([tv], base, dtype="bfloat16")
    assert len(bank.blocks) == 152 and sum(d[0].numel() for d in bank.deltas.values()) == 87_849_216


def test_pickle_without_its_source_code(tmp_path, monkeypatch):
    """task_vectors pickles hold ``src.modeling.ImageEncoder``; it loads without that module."""
    import sys
    import types

    model, base, _, _ = random_bank(num_tasks=1)
    fake = types.ModuleType("src_modeling_absent")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.model = clip

    ImageEncoder.__module__ = fake.__name__
    ImageEncoder.__qualname__ = "ImageEncoder"
    fake.ImageEncoder = ImageEncoder
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    torch.save(ImageEncoder(model), tmp_path / "zeroshot.pt")
    monkeypatch.delitem(sys.modules, fake.__name__)
    state = load_pickled_checkpoint(tmp_path / "zeroshot.pt", trust=True)
    assert "model.visual.proj" in state
    tv = TaskVector.from_state_dicts(state, base, backbone.TINY_MODEL, "zs")
    assert set(tv.deltas) == set(base)
