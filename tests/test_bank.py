import json
import stat

import pytest
import torch

from vtvc_pyro import backbone
from vtvc_pyro.bank import training
from vtvc_pyro.bank.store import build_embedded_bank, load_bank
from vtvc_pyro.data import specs, suite
from vtvc_pyro.errors import BankError, DataError
from vtvc_pyro.io import default_mode

from .conftest import run_inline


def test_manifest_finetuned_beats_zeroshot_beats_chance(bank_path):
    manifest = json.loads((bank_path / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(suite.SOURCES) and len(manifest["tasks"]) >= 8
    for name, info in manifest["tasks"].items():
        assert info["finetuned_accuracy"] > max(info["zeroshot_accuracy"], info["chance"]), name
        # parity's prompts ("an even number") mean little to a CLIP pretrained on digit names: its
        # zero-shot is at chance (45 % of 200 images); every other source starts above chance
        if name != "parity":
            assert info["zeroshot_accuracy"] > info["chance"], name
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


def test_bank_built_on_an_older_suite_is_refused_with_the_rebuild_command(bank_path, tmp_path):
    """A bank built before the source tasks held out their val split pretrained on images that
    val now holds: loading or reusing it says how to rebuild it instead of leaking them."""
    manifest = json.loads((bank_path / "manifest.json").read_text())
    assert manifest["suite"] == suite.VERSION
    manifest.pop("suite")
    stale = tmp_path / "bank"
    stale.mkdir()
    (stale / "manifest.json").write_text(json.dumps(manifest))
    for read in (load_bank, build_embedded_bank):
        with pytest.raises(BankError, match=f"suite version 1.*bank build --overwrite --out {stale}"):
            read(stale)


def test_data_specs():
    task = specs.load_dataset("suite:mixed", 0)
    assert [len(task.split(s)[0]) for s in ("train", "val", "test")] == [200, 100, 397]
    assert task.split("test")[0].shape[1:] == (3, 16, 16)
    with pytest.raises(DataError, match="unknown data set spec"):
        specs.load_dataset("imagenet-21k")
    with pytest.raises(DataError, match="train/<class>"):
        specs.load_dataset("imagefolder:/nonexistent")
    src = specs.load_dataset("digits-noisy", 0)
    assert [len(src.split(s)[0]) for s in ("train", "val", "test")] == [900, 300, 200]
    assert specs.with_validation(src) is src  # its own held-out val, nothing carved from train
    carved = specs.with_validation(suite.TaskData("t", ("a", "b"), (), {"train": src.split("train")}))
    assert len(carved.split("val")[0]) == 90 and len(carved.split("train")[0]) == 810


def test_pools_are_disjoint():
    pools = suite.digit_pools(0)
    a = set(pools["A-train"].tolist()) | set(pools["A-test"].tolist())
    b = set().union(*(set(pools[k].tolist()) for k in ("B-train", "B-val", "B-test")))
    assert not a & b and len(a | b) == 1797


def _shared_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many images of ``a`` [N, ...] are, pixel for pixel, an image of ``b`` [M, ...]."""
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    return int((torch.cdist(flat_a, flat_b) < 1e-4).any(1).sum())


def _raw_content(name: str, split: str, seed: int = 0) -> torch.Tensor:
    """A source split's images before the task's own transform (noise would hide a shared image)."""
    if name.startswith("digits") or name == "parity":
        x, _ = suite._digits()
        rows = {"train": "A-train", "val": "source-val", "test": "A-test"}[split]
        return x[suite.digit_pools(seed)[rows]]
    if name == "faces-noisy":
        x, _ = suite._faces()
        return x[suite.face_split(seed)[split]]
    return specs.load_dataset(name, seed).split(split)[0] * 0.5 + 0.5  # textures: crops, back to [0, 1]


@pytest.mark.parametrize("name", ["digits", "digits-noisy", "parity", "textures", "faces-noisy"])
def test_source_val_is_never_pretrained_fine_tuned_or_tested_on(name):
    """By content, not by index: no image of a source task's val split (what task addition learns
    and selects on) is a fine-tuning image, a test image, or an image of the pretraining corpus."""
    task = specs.load_dataset(name, 0)
    assert len(task.split("val")[0]) >= 40
    val = _raw_content(name, "val")
    assert _shared_rows(val, _raw_content(name, "train")) == 0
    assert _shared_rows(val, _raw_content(name, "test")) == 0
    pretraining, _ = suite.pretraining_corpus(0)
    assert _shared_rows(val, pretraining) == 0
    # the check itself finds a shared image when there is one
    assert _shared_rows(val[:3], torch.cat([pretraining, val[1:2]])) == 1
    if name == "digits":  # the transformed val images too, against every fine-tuning image of every digit task
        for other in [t for t in suite.SOURCES if t.startswith("digits") and t != "digits-noisy"]:
            other_task = specs.load_dataset(other, 0)
            assert _shared_rows(other_task.split("val")[0], other_task.split("train")[0]) == 0


def test_target_test_images_are_never_learned_from():
    """The held-out targets' test digits are neither a source val image nor a target train/val image."""
    x, _ = suite._digits()
    pools = suite.digit_pools(0)
    test = x[pools["B-test"]]
    for rows in ("source-val", "B-train", "B-val", "A-train", "A-test"):
        assert _shared_rows(test, x[pools[rows]]) == 0


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
    assert stat.S_IMODE(out.stat().st_mode) == default_mode()  # 0644 under umask 022, as the bank's files
