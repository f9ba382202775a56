"""The same numbers on CUDA as on CPU (tiny models). Marked ``cuda``; skipped where no GPU is visible.

Run on a GPU machine with ``pytest -m cuda`` (``scripts/gpu_check.sh`` does, among other checks).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from vtvc_pyro import backbone
from vtvc_pyro.bank.store import stack_streamed
from vtvc_pyro.bank.task_vectors import TaskVectorBank
from vtvc_pyro.bayes.guide import make_guide
from vtvc_pyro.bayes.model import VTVCModel
from vtvc_pyro.bayes.priors import make_prior
from vtvc_pyro.bayes.svi import fit_svi
from vtvc_pyro.compose.engine import Composer
from vtvc_pyro.config import SVIConfig
from vtvc_pyro.data.split import Split

from .conftest import random_bank

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (run on a GPU machine: pytest -m cuda)"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls and convolutions round to ~1e-3; compare full fp32 with CPU (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def on_cuda(model: torch.nn.Module, bank: TaskVectorBank, granularity: str = "block") -> Composer:
    return Composer(copy.deepcopy(model.visual).to(CUDA), bank.to(CUDA), granularity)


@pytest.mark.parametrize("strategy", ["auto", "materialize", "linear"])
def test_per_sample_composition_on_cuda_equals_cpu(strategy):
    model, _, _, bank = random_bank(num_tasks=3)
    cpu = Composer(model.visual, bank, "block")
    gpu = on_cuda(model, bank)
    torch.manual_seed(0)
    images = torch.randn(6, 3, 16, 16)
    lam = torch.randn(6, cpu.num_tasks, cpu.num_groups)
    lam_cpu = lam.clone().requires_grad_(True)
    lam_gpu = lam.to(CUDA).clone().requires_grad_(True)
    want = cpu.per_sample(images, lam_cpu, strategy=strategy)
    got = gpu.per_sample(images.to(CUDA), lam_gpu, strategy=strategy)
    assert got.device.type == "cuda" and rel_err(got, want) <= 1e-4
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    (want * weights).sum().backward()
    (got * weights.to(CUDA)).sum().backward()
    assert rel_err(lam_gpu.grad, lam_cpu.grad) <= 1e-4


def test_svi_steps_on_cuda_are_finite():
    model, _, _, bank = random_bank(num_tasks=3)
    composer = on_cuda(model, bank)
    torch.manual_seed(0)
    head = (F.normalize(torch.randn(4, 64), dim=-1) * 10).to(CUDA)
    prior = make_prior("spike_slab")
    vtvc = VTVCModel(composer, head, prior)
    guide = make_guide("amortized_gated", feature_dim=64, num_tasks=3, num_groups=composer.num_groups,
                       prior=prior).to(CUDA)
    images = torch.randn(24, 3, 16, 16, device=CUDA)
    with torch.no_grad():
        features = F.normalize(composer.visual(images), dim=-1)
    labels = torch.randint(0, 4, (24,), device=CUDA)
    split = Split(images, features, labels)
    fit = fit_svi(vtvc, guide, split, split, SVIConfig(steps=6, batch_size=8, eval_every=3, val_samples=2),
                 progress=False)
    assert len(fit.elbo_trace) == 6 and all(torch.isfinite(torch.tensor(fit.elbo_trace)))
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in guide.parameters())
    lam = guide.mean_coefficients(features[:5])
    assert lam.device.type == "cuda" and lam.shape == (5, 3, composer.num_groups)


def test_bank_loaded_in_bfloat16_on_cuda(tmp_path):
    """Vectors stored in bf16 and stacked as the fit loads them (streamed, storage dtype) compose on
    CUDA like the same bf16 vectors composed in fp32 on CPU."""
    model, base, vectors, _ = random_bank(num_tasks=3)
    files = []
    for tv in vectors:
        files.append(tmp_path / f"{tv.task}.safetensors")
        tv.save(files[-1], "bfloat16")
    bank = stack_streamed(files, base, backbone.TINY_MODEL, "bfloat16")
    assert all(v.dtype == torch.bfloat16 for v in bank.deltas.values())
    gpu = on_cuda(model, bank)
    assert all(v.device.type == "cuda" and v.dtype == torch.bfloat16 for v in gpu.bank.deltas.values())
    cpu = Composer(model.visual, stack_streamed(files, base, backbone.TINY_MODEL, "float32"), "block")
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    lam = torch.randn(4, cpu.num_tasks, cpu.num_groups)
    assert rel_err(gpu.per_sample(images.to(CUDA), lam.to(CUDA)), cpu.per_sample(images, lam)) <= 1e-4
    shared = gpu.shared(images.to(CUDA), lam[0].to(CUDA))
    assert rel_err(shared, cpu.shared(images, lam[0])) <= 1e-4
