"""Baselines as pure functions, on hand-built vectors and on the real embedded bank."""

import json

import pytest
import torch

from vtvc_pyro.bank.task_vectors import TaskVectorBank
from vtvc_pyro.bayes.guide import AmortizedGatedGuide, GuideSettings
from vtvc_pyro.bayes.priors import make_prior
from vtvc_pyro.bayes.router import make_flat_twin
from vtvc_pyro.compose.engine import Composer
from vtvc_pyro.config import FitConfig, SVIConfig
from vtvc_pyro.errors import ConfigError
from vtvc_pyro.evaluate import classification_metrics
from vtvc_pyro.methods import learned, merges
from vtvc_pyro.methods.baselines import BASELINES, expand_names
from vtvc_pyro.protocols.fitting import apply_shots, run_baselines
from vtvc_pyro.protocols.transfer import load_target

from .conftest import random_bank


def test_ties_trims_elects_and_merges_disjointly():
    deltas = {"w": torch.tensor([[4.0, -1.0, 0.5, 2.0],
                                 [3.0, 2.0, -0.1, -5.0],
                                 [-1.0, 3.0, 0.2, 1.0]])}
    bank = TaskVectorBank("x", ["a", "b", "c"], {"w": torch.zeros(4)}, deltas)
    merged = merges.ties_merge(bank, density=0.5)["w"]
    # trimmed (top 2 per task): a [4, 0, 0, 2], b [3, 0, 0, -5], c [0, 3, 0, 1]
    # elected signs: [+, +, 0, - (2 - 5 + 1 < 0)]; disjoint means: [3.5, 3, 0, -5]
    assert torch.allclose(merged, torch.tensor([3.5, 3.0, 0.0, -5.0]))
    with pytest.raises(ConfigError, match="density"):
        merges.ties_merge(bank, density=0)


def test_averaging_is_one_over_t():
    model, _, _, bank = random_bank(num_tasks=4)
    lam = merges.average_coefficients(Composer(model.visual, bank, "task"), "cpu")
    assert torch.equal(lam, torch.full((4, 1), 0.25))


def test_adamerging_lowers_entropy_and_stays_in_unit_interval():
    model, _, _, bank = random_bank(num_tasks=3, scale=0.2)
    composer = Composer(model.visual, bank, "layer")
    torch.manual_seed(0)
    head = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1) * 30
    x = torch.randn(64, 3, 16, 16)
    lam, info = learned.adamerging(composer, head, x, steps=100, batch_size=32, lr=0.05)
    assert lam.shape == (3, composer.num_groups) and lam.min() >= 0 and lam.max() <= 1
    entropy = info["history"]
    assert entropy[-1]["entropy"] < entropy[0]["entropy"]


def test_own_finetuned_reference_matches_the_bank_manifest(bank_path):
    """Target digits-rotated is a source task: its own vector is held out of the pool and is the upper reference."""
    cfg = FitConfig(target="digits-rotated", bank=str(bank_path), svi=SVIConfig(steps=5))
    target = load_target(cfg, torch.device("cpu"))
    assert "digits-rotated" not in target.tasks and target.own_vector.tasks == ["digits-rotated"]
    probs, info = run_baselines(cfg, target, ["finetuned", "zeroshot", "averaging", "ties"])
    manifest = json.loads((bank_path / "manifest.json").read_text())["tasks"]["digits-rotated"]
    labels = target.data["test"].labels
    assert classification_metrics(probs["finetuned"]["test"], labels)["accuracy"] == pytest.approx(manifest["finetuned_accuracy"], abs=1e-6)
    assert classification_metrics(probs["zeroshot"]["test"], labels)["accuracy"] == pytest.approx(manifest["zeroshot_accuracy"], abs=1e-6)
    assert 0 <= info["ties"]["lambda"] <= 2 and info["ties"]["density"] in (0.1, 0.2, 0.5)
    assert probs["ties"]["val"].shape == (len(target.data["val"]), 10)  # val probabilities: for temperature scaling


def test_finetuned_is_skipped_without_an_own_vector(bank_path):
    cfg = FitConfig(target="mixed", bank=str(bank_path))
    probs, info = run_baselines(cfg, load_target(cfg, torch.device("cpu")), ["finetuned"])
    assert probs == {} and "no fine-tuned vector" in info["finetuned"]["skipped"]


def test_unknown_baseline_is_refused():
    with pytest.raises(ConfigError, match="unknown baseline 'soup'"):
        expand_names(["soup"])
    assert expand_names(["all"]) == [*BASELINES, "router", "flat_twin"] and expand_names(["ties", "all"])[0] == "ties"
    # the default: what reading VTVC's result needs, with the deterministic twin of the model fitted
    assert expand_names(FitConfig().baselines) == ["zeroshot", "finetuned", "task_arithmetic", "atlas", "router"]
    assert expand_names(FitConfig().baselines, "flat")[-1] == "flat_twin"


def test_flat_twin_is_the_flat_guide_trained_without_prior_or_noise(bank_path):
    """The flat model's deterministic twin: the flat guide's heads, no keep rule, the router's search."""
    cfg = FitConfig(target="rot-noise", bank=str(bank_path), model="flat", shots=4, lr_factors=[0.5, 1, 2],
                    svi=SVIConfig(steps=6, eval_every=3, batch_size=16))
    target = apply_shots(load_target(cfg, torch.device("cpu")), cfg.shots, cfg.seed)
    probs, info = run_baselines(cfg, target, ["flat_twin"])
    twin = info["flat_twin"]
    assert twin["budget"] == {"fits": 3, "steps": 6, "batch_size": 16} and len(twin["val_nll_by_setting"]) == 3
    assert twin["best_valnll"] == min(twin["val_nll_by_setting"].values())
    assert probs["flat_twin"]["test"].shape == (len(target.data["test"]), 10)
    assert torch.allclose(probs["flat_twin"]["test"].sum(-1), torch.ones(len(target.data["test"])))
    # the twin's own network, rebuilt: the flat model's guide without the keep rule
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    _, guide = make_flat_twin(composer, target.head, 64, make_prior("spike_slab"), GuideSettings.from_config(cfg))
    assert isinstance(guide, AmortizedGatedGuide) and not guide.gate_rule and guide.amortized
