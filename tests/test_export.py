"""The real-scale path on stand-ins: data set spec -> import -> bank -> fit -> export -> reload with open_clip.

Checkpoints are random-init ``vtvc-tiny`` CLIPs written in the published formats (task_vectors'
and aTLAS's pickled ``ImageEncoder`` modules, open_clip state dicts); data sets are the stand-in
folders of ``tests/standins.py``.
"""

import json
import os
import subprocess
import sys

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
from vtvc_pyro.protocols.export import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_composed,
    export_run,
    metrics_table,
    model_card,
)
from vtvc_pyro.protocols.fit import run_fit

from . import standins
from .conftest import REAL_ARCH as ARCH
from .conftest import REAL_TASKS as TASKS
from .conftest import ROOT, run_inline, vtvc_names


@pytest.fixture
def world(real_world):
    return real_world


@pytest.fixture
def bank(real_bank):
    return real_bank


def test_import_refuses_pickles_without_trust(world, tmp_path):
    proc = run_inline("--arch", ARCH, "--base", str(world / "base.safetensors"), "--checkpoints", str(world / "ckpt"),
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


# ---------------------------------------------------------------- open_clip local-dir: folders (issue 16)
OPEN_CLIP_ONLY = r"""
import json, sys
import open_clip, torch
out = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out)
tokenizer = open_clip.get_tokenizer("local-dir:" + out)
torch.manual_seed(0)
x = torch.randn(4, 3, 16, 16)
with torch.no_grad():
    image = model.encode_image(x)
    text = model.encode_text(tokenizer(["a photo of a 3", "a brick texture"]))
print(json.dumps({"image": image.tolist(), "text": text.tolist(), "size": model.visual.preprocess_cfg["size"],
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "vtvc_pyro")}))
"""


def _open_clip_alone(out, cwd):
    """Load ``local-dir:out`` in a fresh interpreter that imports only open_clip and torch."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_ONLY, str(out)], capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1"}, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_folder_loads_in_open_clip_without_vtvc_pyro(short_run, bank_path, tmp_path):
    run, _ = short_run
    out = tmp_path / "composed"
    proc = run_inline(str(run), "--out", str(out), script="export_composed.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "local-dir:" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [CARD_FILE, CONFIG_FILE, WEIGHTS_FILE]
    assert not list(tmp_path.glob(".composed.*"))  # the temporary folder was renamed, nothing left behind
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_cfg"] == open_clip.get_model_config(ARCH)  # the custom config, whole
    assert config["preprocess_cfg"]["size"] == [16, 16] and len(config["preprocess_cfg"]["mean"]) == 3
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        meta = f.metadata()
    tasks, lam = json.loads(meta["tasks"]), torch.tensor(json.loads(meta["lam"]))

    loaded = load_bank(bank_path)
    composer = Composer(loaded.model.visual, loaded.vectors.select(tasks), "block")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    expected = composer.shared(x, lam)
    tokens = open_clip.get_tokenizer(ARCH)(["a photo of a 3", "a brick texture"])
    alone = _open_clip_alone(out, tmp_path)
    assert alone["loaded"] == [] and alone["size"] == [16, 16]
    assert torch.allclose(torch.tensor(alone["image"]), expected, atol=1e-5)
    assert not torch.allclose(expected, loaded.model.encode_image(x), atol=1e-4)  # it did compose
    assert torch.allclose(torch.tensor(alone["text"]), loaded.model.encode_text(tokens), atol=1e-5)

    card = (out / CARD_FILE).read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"`{loaded.manifest['base_fingerprint']}`" in card and f"`{ARCH}`" in card
    for t, name in enumerate(tasks):
        assert f"| {name} | {float(lam[t].mean()):+.4f} |" in card
    assert "posterior coefficients" in card and "mixed test" in card
    for method in ("zeroshot", "atlas", *vtvc_names(metrics)):
        assert f"| {method} | {metrics['methods'][method]['accuracy']:.4f} |" in card
    assert f"python {ROOT / 'scripts' / 'export_composed.py'} {run} --out {out}\n" in card  # the exact command
    assert "This exported model (one shared λ̄ for every image)" in card


def test_export_folder_refuses_a_non_empty_folder(short_run, tmp_path):
    run, _ = short_run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    proc = run_inline(str(run), "--out", str(out), "--evaluate", "false", script="export_composed.py")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    proc = run_inline(str(run), "--out", str(out), "--evaluate", "false", "--overwrite", script="export_composed.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "keep me" and (out / CONFIG_FILE).is_file()
    assert "This exported model" not in (out / CARD_FILE).read_text()  # --evaluate false
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is free
    info = export_run(run, empty, evaluate=False, command="vtvc export RUN --out empty")
    assert info["folder"] and (empty / WEIGHTS_FILE).is_file() and "vtvc export RUN --out empty" in (
        empty / CARD_FILE).read_text()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        export_run(run, tmp_path / "file", evaluate=False)


def test_model_card_reads_both_metrics_layouts():
    transfer = {"target": "mixed", "methods": {
        "zeroshot": {"accuracy": 0.25, "nll": 2.0, "ece": 0.3, "interval95": {"accuracy": [0.2, 0.3]}},
        "vtvc": {"accuracy": 0.75, "nll": 0.9, "ece": 0.05}}}
    lines = metrics_table(transfer)
    assert lines[2].startswith("| vtvc | 0.7500 | – | 0.9000 |")  # VTVC first
    assert lines[3] == "| zeroshot | 0.2500 | [0.2000, 0.3000] | 2.0000 | 0.3000 |"
    addition = {"protocol": "addition", "tasks": ["a", "b"], "methods": {
        "vtvc": {"per_task": {"a": {"accuracy": 0.5}, "b": {"accuracy": 1.0}}, "average": {"accuracy": 0.75},
                 "normalized_average": 0.8}}}
    lines = metrics_table(addition)
    assert lines[0] == "| method | average accuracy | normalized average | a | b |"
    assert lines[2] == "| vtvc | 0.7500 | 0.8000 | 0.5000 | 1.0000 |"
    card = model_card({"arch": ARCH, "base_fingerprint": "abc", "tasks": ["a", "b"], "lam": torch.ones(2, 3),
                       "granularity": "block", "source": "by hand", "command": "vtvc export r --out o",
                       "metrics": addition, "protocol": "addition"})
    assert "| a | +1.0000 |" in card and "(addition) on the test split" in card and "vtvc export r --out o" in card


def test_addition_run_exports_to_a_folder(bank_path, tmp_path):
    out = tmp_path / "add"
    proc = run_inline("--protocol", "addition", "--bank", str(bank_path), "--tasks", "[digits-inverted,parity]",
                      "--baselines", "[zeroshot]", "--components", "[1]", "--svi.steps", "4", "--svi.eval_every", "2",
                      "--eval_samples", "2", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = export_run(out, tmp_path / "model", command="vtvc export add --out model")
    assert info["tasks"] == ["digits-inverted", "parity"] and info["lam"].shape == (2, 32)
    assert set(info["exported"]["per_task"]) == {"digits-inverted", "parity"}
    card = (tmp_path / "model" / CARD_FILE).read_text()
    assert "| method | average accuracy | normalized average | digits-inverted | parity |" in card
    assert "the test splits of digits-inverted, parity" in card and "(addition, target `addition`)" in card
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'model'}")
    loaded = load_bank(bank_path)
    x = torch.randn(3, 3, 16, 16)
    composer = Composer(loaded.model.visual, loaded.vectors.select(info["tasks"]), "block")
    assert torch.allclose(model.encode_image(x), composer.shared(x, info["lam"]), atol=1e-5)
