import json

import pytest
import torch

from vtvc_pyro import backbone
from vtvc_pyro.bank import training
from vtvc_pyro.bank.store import load_bank
from vtvc_pyro.data import specs, suite
from vtvc_pyro.errors import BankError, DataError

from .conftest import run_inline


def test_manifest_finetuned_beats_zeroshot_beats_chance(bank_path):
    manifest = json.loads((bank_path / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(suite.SOURCES) and len(manifest["tasks"]) >= 8
    for name, info in manifest["tasks"].items():
        assert info["finetuned_accuracy"] > info["zeroshot_accuracy"] > info["chance"], name
    for name, info in manifest["targets"].items():
        assert info["zeroshot_accuracy"] < 0.5, name  # held-out targets leave room for composition


def test_bank_loads_and_vectors_improve_their_task(loaded_bank):
    """Adding a task's own vector to the base model (λ = 1) recovers its fine-tuned accuracy."""
    from vtvc_pyro.compose.engine import Composer

    task = specs.load_dataset("digits-rotated", 0)
    head = loaded_bank.head_for(task)
    images, labels = task.split("test")
    composer = Composer(loaded_bank.model.visual, loaded_bank.vectors.select(["digits-rotated"]), "task")
    feats = composer.shared(images, torch.ones(1, 1))
    acc = float(((torch.nn.functional.normalize(feats, dim=-1) @ head.T).argmax(-1) == labels).float().mean())
    manifest = loaded_bank.manifest["tasks"]["digits-rotated"]
    assert acc == pytest.approx(manifest["finetuned_accuracy"], abs=1e-6)
    assert training.accuracy(loaded_bank.model, head, images, labels) == pytest.approx(manifest["zeroshot_accuracy"], abs=1e-6)


def test_features_are_cached(loaded_bank):
    task = specs.load_dataset("mixed", 0)
    first = loaded_bank.features(task, "val")
    assert (loaded_bank.path / "features" / "mixed-val.safetensors").is_file()
    assert torch.equal(first, loaded_bank.features(task, "val"))
    assert first.shape == (100, 64)


def test_missing_bank_says_how_to_build_it(tmp_path):
    with pytest.raises(BankError, match="vtvc bank build"):
        load_bank(tmp_path / "nowhere")


def test_data_specs():
    task = specs.load_dataset("suite:mixed", 0)
    assert [len(task.split(s)[0]) for s in ("train", "val", "test")] == [200, 100, 397]
    assert task.split("test")[0].shape[1:] == (3, 16, 16)
    with pytest.raises(DataError, match="unknown data set spec"):
        specs.load_dataset("imagenet-21k")
    with pytest.raises(DataError, match="train/<class>"):
        specs.load_dataset("imagefolder:/nonexistent")
    src = specs.with_validation(specs.load_dataset("digits-noisy", 0))
    assert len(src.split("val")[0]) == 90 and len(src.split("train")[0]) == 810


def test_pools_are_disjoint():
    pools = suite.digit_pools(0)
    a = set(pools["A-train"].tolist()) | set(pools["A-test"].tolist())
    b = set().union(*(set(pools[k].tolist()) for k in ("B-train", "B-val", "B-test")))
    assert not a & b and len(a | b) == 1797


def test_imagefolder_spec(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls, value in (("cat", 40), ("dog", 200)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (value, value, value)).save(folder / f"{i}.png")
    task = specs.load_dataset(f"imagefolder:{tmp_path}")
    assert task.class_names == ("cat", "dog")
    x, y = task.split("train")
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_offline_pretrained_tag_fails_fast():
    with pytest.raises(backbone.BackboneError, match="local path"):
        backbone.create_clip("ViT-B-32", pretrained="openai")
    with pytest.raises(backbone.BackboneError, match="unknown open_clip architecture"):
        backbone.create_clip("ViT-Q-99")


def test_finetune_script_writes_a_loadable_task_vector(bank_path, tmp_path):
    from vtvc_pyro.bank.task_vectors import TaskVector

    out = tmp_path / "rot.safetensors"
    proc = run_inline("--base", str(bank_path / "base.safetensors"), "--data", "digits-rotated", "--out", str(out),
                      "--steps", "5", "--quiet", script="finetune.py")
    assert proc.returncode == 0, proc.stderr
    assert "digits-rotated: zero-shot" in proc.stdout and f"wrote {out}" in proc.stdout
    model = backbone.create_clip(backbone.TINY_MODEL, str(bank_path / "base.safetensors"))
    tv = TaskVector.load(out, base=backbone.image_tower_params(model), arch=backbone.TINY_MODEL)
    assert tv.task == "digits-rotated" and any(d.abs().max() > 0 for d in tv.deltas.values())
