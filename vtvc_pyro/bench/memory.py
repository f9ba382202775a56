"""Measure the memory of one VTVC SVI step at real scale, on CPU with random weights.

Builds a random-init open_clip architecture, a bank of T random task vectors in the storage dtype,
and runs the per-sample engine (forward + backward of the ELBO) on a micro-batch of M images.
Prints the sizes of what must sit in accelerator memory and the process's peak resident memory
(``ru_maxrss``), which on CPU holds the same tensors a GPU would (plus Python and library overhead).

Usage::

    vtvc bench memory --arch ViT-B-32 --tasks 7 --micro_batch 2
"""

import json
import resource
import time

import pyro
import torch

from .. import backbone
from ..bank.task_vectors import DTYPES, TaskVectorBank
from ..bayes.guide import make_guide
from ..bayes.model import VTVCModel
from ..bayes.priors import make_prior
from ..compose.engine import Composer
from ..io import fingerprint


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(args):
    torch.manual_seed(0)
    model = backbone.create_clip(args.arch)
    del model.transformer, model.token_embedding  # the text tower only builds heads; keep it off the device
    base = backbone.image_tower_params(model)
    n_params = sum(v.numel() for v in base.values())
    dtype = DTYPES[args.dtype]
    deltas = {k: (0.01 * torch.randn(args.tasks, *v.shape)).to(dtype) for k, v in base.items()}
    bank = TaskVectorBank(args.arch, [f"t{t}" for t in range(args.tasks)], base, deltas, fingerprint(base))
    after_bank = peak_gib()
    composer = Composer(model.visual, bank, args.granularity)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    head = torch.nn.functional.normalize(torch.randn(10, model.visual.output_dim), dim=-1) * 100
    prior = make_prior("spike_slab")
    vtvc = VTVCModel(composer, head, prior)
    guide = make_guide("amortized_gated", feature_dim=model.visual.output_dim, num_tasks=args.tasks,
                       num_groups=composer.num_groups, prior=prior, slab_mean_init=0.3, gate_logit_init=2.0)
    loss_fn = pyro.infer.Trace_ELBO(max_plate_nesting=1)(vtvc, guide)
    images = torch.randn(args.micro_batch, 3, size, size)
    feats = torch.nn.functional.normalize(torch.randn(args.micro_batch, model.visual.output_dim), dim=-1)
    labels = torch.zeros(args.micro_batch, dtype=torch.long)
    start = time.time()
    if args.shared:  # the aTLAS-style baseline's step: one λ [T, G] for the batch, activations dominate
        lam = torch.zeros(args.tasks, composer.num_groups, requires_grad=True)
        logits = torch.nn.functional.normalize(composer.shared(images, lam), dim=-1) @ head.T
        loss = torch.nn.functional.cross_entropy(logits, labels)
    else:
        loss = loss_fn(images, feats, labels, num_data=1000, kl_weight=0.1 / (args.tasks * composer.num_groups))
    loss.backward()
    seconds = time.time() - start
    result = {
        "arch": args.arch, "tasks": args.tasks, "granularity": args.granularity, "storage": args.dtype,
        "micro_batch": args.micro_batch, "step": "shared (aTLAS-style)" if args.shared else "per-sample (VTVC)",
        "image_tower_params": n_params,
        "bank_gib": round(sum(v.numel() * v.element_size() for v in deltas.values()) / 2**30, 3),
        "base_tower_fp32_gib": round(n_params * 4 / 2**30, 3),
        "composed_weights_per_sample_fp32_gib": round(n_params * 4 / 2**30, 3),
        "guide_params": sum(p.numel() for p in guide.parameters()),
        "peak_rss_after_bank_gib": round(after_bank, 2),
        "peak_rss_after_step_gib": round(peak_gib(), 2),
        "step_increase_gib": round(peak_gib() - after_bank, 2),
        "step_seconds_cpu": round(seconds, 1),
    }
    print(json.dumps(result))
