"""The real-scale path on stand-ins: data set spec -> import -> bank -> fit -> export -> reload with open_clip.

Checkpoints are random-init ``vtvc-tiny`` CLIPs written in the published formats (task_vectors'
and aTLAS's pickled ``ImageEncoder`` modules, open_clip state dicts); data sets are the stand-in
folders of ``tests/standins.py``.
"""

import json

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vtvc_pyro import backbone
from vtvc_pyro.bank.store import import_bank, load_bank, read_checkpoint
from vtvc_pyro.compose.engine import Composer
from vtvc_pyro.config import FitConfig, SVIConfig
from vtvc_pyro.errors import BankError, ConfigError
from vtvc_pyro.io import fingerprint, save_safetensors
from vtvc_pyro.protocols.export import export_composed, export_run
from vtvc_pyro.protocols.transfer import run_fit

from . import standins
from .conftest import REAL_ARCH as ARCH
from .conftest import REAL_TASKS as TASKS
from .conftest import run_script


@pytest.fixture
def world(real_world):
    return real_world


@pytest.fixture
def bank(real_bank):
    return real_bank


def test_import_refuses_pickles_without_trust(world, tmp_path):
    proc = run_script("--arch", ARCH, "--base", str(world / "base.safetensors"), "--checkpoints", str(world / "ckpt"),
                      "--out", str(tmp_path / "b"), script="import_checkpoints.py")
    assert proc.returncode == 2 and "--trust_pickle" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_imported_bank_holds_the_published_vectors(world, bank):
    loaded = load_bank(bank, dtype=None)  # the storage dtype
    assert loaded.vectors.tasks == TASKS and loaded.arch == ARCH
    assert next(iter(loaded.vectors.deltas.values())).dtype == torch.bfloat16
    streamed = load_bank(bank, dtype=None, stream=True).vectors  # block by block from the mapped files
    assert streamed.tasks == TASKS and streamed.blocks == loaded.vectors.blocks
    assert all(torch.equal(streamed.deltas[k], v) for k, v in loaded.vectors.deltas.items())
    zeroshot = read_checkpoint(world / "ckpt" / "zeroshot.pt", trust_pickle=True)
    finetuned = read_checkpoint(world / "ckpt" / "MNISTVal" / "finetuned.pt", trust_pickle=True)
    name = "transformer.resblocks.1.mlp.c_fc.weight"
    expected = finetuned[f"model.visual.{name}"] - zeroshot[f"model.visual.{name}"]
    got = loaded.vectors.deltas[name][TASKS.index("MNIST")].float()
    assert torch.allclose(got, expected, rtol=2**-8, atol=1e-8)  # bf16 storage: relative rounding <= 2^-9
    assert loaded.manifest["base_fingerprint"] == fingerprint(backbone.image_tower_params(loaded.model))
    assert loaded.manifest["config"]["zeroshot_vs_base_max_abs_diff"] == 0.0


def test_import_reads_atlas_layout_and_state_dicts(world, tmp_path):
    standins.write_published_checkpoints(tmp_path / "atlas", ARCH, world / "base.safetensors", ["GTSRB"], layout="atlas")
    tuned = backbone.create_clip(ARCH, str(world / "base.safetensors"))
    with torch.no_grad():
        tuned.visual.proj.add_(0.1)
    save_safetensors(tuned.state_dict(), tmp_path / "cars.safetensors")
    torch.save(tuned.state_dict(), tmp_path / "cars_state_dict.pt")  # a plain state dict needs no trust flag
    from vtvc_pyro.bank.store import discover_checkpoints

    zeroshot, found = discover_checkpoints(tmp_path / "atlas")
    assert zeroshot.name == "nonlinear_zeroshot.pt" and list(found) == ["GTSRB"]
    out = import_bank(tmp_path / "bank", ARCH, str(world / "base.safetensors"),
                      {**found, "Cars": tmp_path / "cars.safetensors", "CarsPt": tmp_path / "cars_state_dict.pt"},
                      zeroshot, trust_pickle=True, progress=False)
    loaded = load_bank(out)
    cars = loaded.vectors.deltas["proj"][loaded.vectors.tasks.index("Cars")]
    assert torch.allclose(cars, torch.full_like(cars, 0.1), atol=1e-6)
    assert torch.equal(cars, loaded.vectors.deltas["proj"][loaded.vectors.tasks.index("CarsPt")])
    with pytest.raises(BankError, match="already holds a bank"):
        import_bank(out, ARCH, None, found, zeroshot, trust_pickle=True, progress=False)


def test_export_loads_in_open_clip_and_gives_the_composed_features(bank, tmp_path):
    loaded = load_bank(bank)
    torch.manual_seed(1)
    lam = 0.5 * torch.randn(loaded.vectors.num_tasks, 1)
    path = export_composed(tmp_path / "composed.safetensors", loaded.model, loaded.vectors, lam, "task")
    model = open_clip.create_model(ARCH, pretrained=str(path))  # open_clip's own loader, strict
    x = torch.randn(5, 3, 16, 16)
    expected = Composer(loaded.model.visual, loaded.vectors, "task").shared(x, lam)
    assert torch.allclose(model.encode_image(x), expected, atol=1e-5)
    assert torch.equal(model.encode_text(torch.ones(1, 16, dtype=torch.long)),
                       loaded.model.encode_text(torch.ones(1, 16, dtype=torch.long)))
    zero = export_composed(tmp_path / "zero.safetensors", loaded.model, loaded.vectors, torch.zeros_like(lam), "task")
    base = load_file(str(bank / "base.safetensors"))
    assert all(torch.equal(v, base[k]) for k, v in load_file(str(zero)).items())
    with pytest.raises(ConfigError, match=r"\[T, G\] = \[4, 1\]"):
        export_composed(tmp_path / "x.safetensors", loaded.model, loaded.vectors, torch.zeros(4, 3), "task")


def test_spec_to_fit_to_export_to_open_clip(world, bank, tmp_path):
    """The whole path: benchmark spec -> imported bank -> SVI fit -> posterior-mean export -> open_clip."""
    spec = f"benchmark:MNIST@{world / 'data'}"
    cfg = FitConfig(target=spec, bank=str(bank), device="cpu", eval_samples=2, posterior_samples=4,
                    svi=SVIConfig(steps=4, batch_size=8, eval_every=2))
    metrics = run_fit(cfg, tmp_path / "run", progress=False)
    assert metrics["tasks"] == ["DTD", "EuroSAT", "SVHN"]  # never the target's own vector
    assert metrics["num_test"] == 10 and 0 <= metrics["methods"]["vtvc"]["accuracy"] <= 1
    for split, n in (("train", 27), ("val", 3), ("test", 10)):  # guide features cached per data set and model
        with safe_open(str(bank / "features" / f"benchmark_MNIST_{str(world / 'data').replace('/', '_')}-{split}.safetensors"),
                       "pt") as f:
            assert f.get_tensor("features").shape == (n, 64)
            assert f.metadata()["base_fingerprint"] == load_bank(bank).manifest["base_fingerprint"]

    info = export_run(tmp_path / "run", tmp_path / "mnist.safetensors")
    with safe_open(str(tmp_path / "mnist.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["tasks"]) == info["tasks"] and "posterior mean over" in meta["source"]
    lam = torch.tensor(json.loads(meta["lam"]))
    assert lam.shape == (3, 32) and torch.allclose(lam, info["lam"], atol=1e-6)
    model = open_clip.create_model(ARCH, pretrained=str(tmp_path / "mnist.safetensors"))
    loaded = load_bank(bank)
    composer = Composer(loaded.model.visual, loaded.vectors.select(info["tasks"]), "block")
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(model.encode_image(x), composer.shared(x, lam), atol=1e-5)
    assert not torch.allclose(model.encode_image(x), loaded.model.encode_image(x), atol=1e-4)  # it did compose
