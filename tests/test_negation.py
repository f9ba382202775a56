"""Task negation: task arithmetic with λ ≤ 0 and VTVC with negative slabs, on the real embedded bank."""

import pytest
import torch

from vtvc_pyro.bayes.priors import make_prior
from vtvc_pyro.config import NegationConfig, SVIConfig
from vtvc_pyro.protocols.negation import NegationModel, run_negation

from .conftest import random_bank, run_inline


def test_union_likelihood_uses_labels_for_control_and_uniform_for_forget():
    from vtvc_pyro.compose.engine import Composer

    model, _, _, bank = random_bank(num_tasks=1)
    neg = NegationModel(Composer(model.visual, bank, "task"), torch.randn(3, 64), torch.randn(2, 64),
                        make_prior("spike_slab_negative"))
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0],   # control sample, label 1
                           [9.0, 9.0, 0.0, 0.0, 0.0]])  # forget sample (label 2 + k): uniform over forget classes
    ll = neg.log_likelihood(logits, torch.tensor([1, 3]))
    assert ll[0] == pytest.approx(torch.log_softmax(logits[0, :2], -1)[1].item())
    assert ll[1] == pytest.approx(-torch.log(torch.tensor(3.0)).item())  # the maximum: uniform prediction


def test_negation_forgets_and_keeps_the_control(bank_path):
    result = run_negation(NegationConfig("digits", "textures", str(bank_path), svi=SVIConfig(steps=60, eval_every=20)))
    zs, ta, vtvc = (result["methods"][k] for k in ("zeroshot", "task_arithmetic", "vtvc"))
    assert result["task_arithmetic_lambda"] < 0
    assert ta["forget"] < zs["forget"] - 0.1 and ta["control"] >= 0.85 * zs["control"]
    assert vtvc["forget"] < zs["forget"] - 0.1 and vtvc["control"] >= 0.9 * zs["control"]
    assert result["vtvc_mean_lambda"]["forget"] < 0 and result["vtvc_mean_lambda"]["control"] <= 0


def test_negating_a_task_without_a_vector_is_one_clear_line(bank_path, tmp_path):
    proc = run_inline("--forget", "mixed", "--bank", str(bank_path), "--out", str(tmp_path), script="negate.py")
    assert proc.returncode == 2 and "no task vector for 'mixed'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
