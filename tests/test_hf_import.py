"""Hugging Face import: transformers' own CLIP checkpoints -> bank -> the same image features through open_clip.

Stand-in checkpoints are written by ``transformers`` itself (random weights, the tiny config of
``vtvc-tiny``): a ``CLIPModel`` base and fine-tuned ``CLIPVisionModel`` folders (base plus random
perturbations), as fusion_bench publishes them.
"""

import json

import open_clip
import pytest
import torch

from vtvc_pyro import backbone
from vtvc_pyro.bank.hf import import_hf_bank, read_hf_clip, task_names
from vtvc_pyro.bank.store import load_bank
from vtvc_pyro.cli import main
from vtvc_pyro.compose.engine import Composer
from vtvc_pyro.errors import BankError, ConfigError

transformers = pytest.importorskip("transformers")

QUICK_ARCH = "vtvc-tiny-quickgelu"
ARCHS = {"gelu": backbone.TINY_MODEL, "quick_gelu": QUICK_ARCH}
VISION = {"image_size": 16, "patch_size": 4, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 256}
TEXT = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 16}


@pytest.fixture(scope="module", autouse=True)
def quickgelu_config(tmp_path_factory):
    """``vtvc-tiny`` with OpenAI's QuickGELU, registered with open_clip (as ``ViT-B-32-quickgelu`` is)."""
    folder = tmp_path_factory.mktemp("configs")
    cfg = json.loads((backbone.CONFIG_DIR / f"{backbone.TINY_MODEL}.json").read_text())
    (folder / f"{QUICK_ARCH}.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    open_clip.add_model_config(folder)


def _perturbed(model, scale, seed, skip=()):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(skip):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def write_world(root, act):
    """``root/clip-tiny`` (CLIPModel base) and fine-tuned folders named as fusion_bench names them."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    from transformers import CLIPVisionModelWithProjection as WithProjection

    torch.manual_seed(0)
    base = CLIPModel(CLIPConfig(text_config={**TEXT, "hidden_act": act}, vision_config={**VISION, "hidden_act": act},
                                projection_dim=64)).eval()
    base.save_pretrained(root / "clip-tiny")
    vcfg = CLIPVisionConfig(**VISION, hidden_act=act, projection_dim=64)
    tuned = {}
    for seed, task in enumerate(["mnist", "stanford-cars"], start=1):
        model = CLIPVisionModel(vcfg).eval()
        getattr(model, "vision_model", model).load_state_dict(base.vision_model.state_dict())  # flat since 5.0
        tuned[task] = _perturbed(model, 0.02, seed)
        # the second one sharded, as save_pretrained writes big models
        model.save_pretrained(root / f"clip-tiny_{task}", **({"max_shard_size": "100KB"} if seed == 2 else {}))
    with_proj = WithProjection(vcfg).eval()
    with_proj.vision_model.load_state_dict(base.vision_model.state_dict())
    with_proj.visual_projection.load_state_dict(base.visual_projection.state_dict())
    tuned["proj"] = _perturbed(with_proj, 0.02, 3)
    with_proj.save_pretrained(root / "with_projection")
    return base, tuned


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def world(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    base, tuned = write_world(root, request.param)
    return root, request.param, base, tuned


@pytest.fixture(scope="module")
def hf_bank(world):
    root, act, _, _ = world
    out = root / "bank"
    code = main(["bank", "import", "--arch", ARCHS[act], "--hf_base", str(root / "clip-tiny"),
                 "--hf_vision", str(root / "clip-tiny_mnist"), "--hf_vision", str(root / "clip-tiny_stanford-cars"),
                 "--hf_vision", f"Proj={root / 'with_projection'}", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@torch.no_grad()
def test_imported_vectors_give_the_transformers_image_features(world, hf_bank):
    _, act, base, tuned = world
    loaded = load_bank(hf_bank)
    assert loaded.arch == ARCHS[act] and loaded.vectors.tasks == ["Cars", "MNIST", "Proj"]
    cfg = loaded.manifest["config"]
    assert cfg["source"] == "import-hf" and cfg["projection"] == "hf_base" and cfg["text_tower"] == "hf_base"
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = base.visual_projection(base.vision_model(pixel_values=x).pooler_output)
    assert torch.allclose(loaded.model.encode_image(x), expected, atol=1e-5)
    for task, hf in (("MNIST", tuned["mnist"]), ("Cars", tuned["stanford-cars"]), ("Proj", tuned["proj"])):
        composer = Composer(loaded.model.visual, loaded.vectors.select([task]), "task")
        got = composer.shared(x, torch.ones(1, 1))  # θ0 + 1·τ = the fine-tuned tower
        if task == "Proj":  # CLIPVisionModelWithProjection: its own, fine-tuned projection
            want = hf(pixel_values=x).image_embeds
        else:  # CLIPVisionModel: no projection, the base's is kept
            want = base.visual_projection(hf(pixel_values=x).pooler_output)
        assert torch.allclose(got, want, atol=1e-5), task
        assert not torch.allclose(got, expected, atol=1e-3)  # it did compose
    proj = loaded.vectors.deltas["proj"]
    assert proj[0].abs().max() == 0 and proj[1].abs().max() == 0 and proj[2].abs().max() > 0
    from vtvc_pyro.bank.task_vectors import TaskVector

    assert TaskVector.load(hf_bank / "task_vectors" / "MNIST.safetensors").class_names[:2] == ("0", "1")


@torch.no_grad()
def test_clipmodel_base_brings_the_text_tower(world, hf_bank):
    _, act, base, _ = world
    loaded = load_bank(hf_bank)
    tokens = backbone.tokenizer_for(ARCHS[act])(["a photo of a cat", "a diagram of the digit 7"])
    expected = base.text_projection(base.text_model(input_ids=tokens).pooler_output)
    assert torch.allclose(loaded.model.encode_text(tokens), expected, atol=1e-5)
    assert torch.allclose(loaded.model.logit_scale, base.logit_scale)


def test_transformers_4_names_read_the_same(world, hf_bank, tmp_path):
    """fusion_bench's folders come from transformers 4.x, whose CLIPVisionModel keys carry ``vision_model.``."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, act, _, _ = world
    folder = tmp_path / "clip-tiny_mnist"
    shutil.copytree(root / "clip-tiny_mnist", folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in state.items()},
              str(folder / "model.safetensors"), {"format": "pt"})
    base = root / "clip-tiny"
    out = import_hf_bank(tmp_path / "bank", ARCHS[act], task_names([str(folder)], str(base)), base, progress=False)
    old, new = load_bank(hf_bank).vectors, load_bank(out).vectors
    assert new.tasks == ["MNIST"] and set(new.deltas) == set(old.deltas) - {"proj"}
    assert all(torch.equal(v[0], old.deltas[k][old.tasks.index("MNIST")]) for k, v in new.deltas.items())


def test_activation_mismatch_names_the_right_arch(world, tmp_path):
    root, act, _, _ = world
    wrong = ARCHS["gelu" if act == "quick_gelu" else "quick_gelu"]
    with pytest.raises(BankError, match=f"hidden_act '{act}'.*--arch {ARCHS[act]}"):
        import_hf_bank(tmp_path / "b", wrong, {"MNIST": root / "clip-tiny_mnist"}, root / "clip-tiny", progress=False)
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_vision_only_base_takes_the_projection_from_base_weights(world, tmp_path):
    root, act, _, tuned = world
    from vtvc_pyro.io import save_safetensors

    arch = ARCHS[act]
    weights = backbone.create_clip(arch)  # open_clip --base weights: text tower and projection
    save_safetensors(weights.state_dict(), tmp_path / "base.safetensors")
    out = import_hf_bank(tmp_path / "bank", arch, {"MNIST": str(root / "clip-tiny_mnist")},
                         base=root / "clip-tiny_stanford-cars", base_weights=str(tmp_path / "base.safetensors"),
                         progress=False)
    loaded = load_bank(out)
    assert loaded.manifest["config"]["projection"] == "base_weights"
    assert torch.equal(loaded.model.visual.proj, weights.visual.proj)
    assert torch.equal(loaded.model.token_embedding.weight, weights.token_embedding.weight)  # --base's text tower
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        got = Composer(loaded.model.visual, loaded.vectors, "task").shared(x, torch.ones(1, 1))
        want = tuned["mnist"](pixel_values=x).pooler_output @ weights.visual.proj
    assert torch.allclose(got, want, atol=1e-5)


def test_pickle_only_folders_are_refused(world, tmp_path, capsys):
    root, act, _, tuned = world
    folder = tmp_path / "clip-tiny_pickled"
    tuned["mnist"].config.save_pretrained(folder)
    torch.save(tuned["mnist"].state_dict(), folder / "pytorch_model.bin")
    code = main(["bank", "import", "--arch", ARCHS[act], "--hf_base", str(root / "clip-tiny"), "--hf_vision",
                 str(folder), "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "pytorch_model.bin" in err and "never unpickles" in err and "safe_serialization=True" in err
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_missing_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BankError, match="not-a-user/not-a-model.*HF_HUB_OFFLINE.*hf download"):
        read_hf_clip("not-a-user/not-a-model")
    with pytest.raises(BankError, match="does not exist"):
        read_hf_clip(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="no config.json"):
        read_hf_clip(tmp_path / "empty")


def test_task_names_follow_fusion_bench_folders():
    names = task_names(["hub/clip-vit-base-patch32_sun397", "dl/clip-vit-base-patch32_stanford-cars/",
                        "mine=/data/x", "other/plain_name"], base="openai/clip-vit-base-patch32")
    assert names == {"SUN397": "hub/clip-vit-base-patch32_sun397", "Cars": "dl/clip-vit-base-patch32_stanford-cars/",
                     "mine": "/data/x", "plain_name": "other/plain_name"}
    assert list(task_names(["a/eurosat", "b/GTSRB"])) == ["EuroSAT", "GTSRB"]
    with pytest.raises(ConfigError, match="NAME=PATH"):
        task_names(["a/mnist", "b/MNIST"])


def test_cli_refuses_mixed_or_incomplete_hf_flags(tmp_path, capsys):
    assert main(["bank", "import", "--arch", backbone.TINY_MODEL, "--hf_base", "x/y", "--out", str(tmp_path)]) == 2
    assert "--hf_base needs --hf_vision" in capsys.readouterr().err
    assert main(["bank", "import", "--arch", backbone.TINY_MODEL, "--hf_vision", "x/y", "--checkpoints", "c",
                 "--out", str(tmp_path)]) == 2
    assert "separate import" in capsys.readouterr().err


@pytest.mark.slow
@torch.no_grad()
def test_vit_b_32_layout_of_openai_clip(tmp_path):
    """transformers' default CLIPConfig is openai/clip-vit-base-patch32's layout: it maps onto ViT-B-32-quickgelu."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    base = CLIPModel(CLIPConfig()).eval()
    base.save_pretrained(tmp_path / "clip-vit-base-patch32")
    tuned = CLIPVisionModel(base.config.vision_config).eval()
    getattr(tuned, "vision_model", tuned).load_state_dict(base.vision_model.state_dict())
    _perturbed(tuned, 1e-3, 1)
    tuned.save_pretrained(tmp_path / "clip-vit-base-patch32_sun397")
    out = import_hf_bank(tmp_path / "bank", "ViT-B-32-quickgelu",
                         task_names([str(tmp_path / "clip-vit-base-patch32_sun397")], "openai/clip-vit-base-patch32"),
                         tmp_path / "clip-vit-base-patch32", progress=False)
    loaded = load_bank(out)
    assert loaded.vectors.tasks == ["SUN397"] and len(loaded.vectors.blocks) == 151  # all 152 but proj
    x = torch.randn(2, 3, 224, 224)
    got = Composer(loaded.model.visual, loaded.vectors, "task").shared(x, torch.ones(1, 1))
    assert torch.allclose(got, base.visual_projection(tuned(pixel_values=x).pooler_output), atol=1e-4)
    tokens = backbone.tokenizer_for("ViT-B-32-quickgelu")(["a photo of a church"])
    assert torch.allclose(loaded.model.encode_text(tokens),
                          base.text_projection(base.text_model(input_ids=tokens).pooler_output), atol=1e-4)


def test_cached_hub_ids_resolve_offline(world, monkeypatch, tmp_path):
    """A hub id in the local cache (as `hf download` leaves it) is read without contacting the hub."""
    import shutil

    from huggingface_hub import constants

    root, act, _, _ = world
    repo = tmp_path / "hub" / "models--tanganke--clip-tiny_mnist"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(root / "clip-tiny_mnist", repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = read_hf_clip("tanganke/clip-tiny_mnist")
    local = read_hf_clip(root / "clip-tiny_mnist")
    assert ckpt.visual.keys() == local.visual.keys() and all(torch.equal(v, local.visual[k]) for k, v in ckpt.visual.items())
    assert ckpt.vision_config["hidden_act"] == act and ckpt.text is None and not ckpt.has_projection
