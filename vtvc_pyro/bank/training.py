"""Plain PyTorch training used to build the embedded bank: CLIP pretraining and task fine-tuning."""

from __future__ import annotations

import logging
import random
from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbone import tokenizer_for
from ..data import suite
from ..progress import track

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)


def pretrain_clip(
    model: torch.nn.Module,
    model_name: str,
    images: torch.Tensor,
    keys: Sequence[str],
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Contrastive image-text pretraining where every image with the same class counts as positive.

    Captions are drawn per image from the templates of its domain (``suite.CAPTION_TEMPLATES``),
    images get random ±2 px shifts.

    Args:
        images: ``[M, 3, H, W]`` in [0, 1].
        keys: ``M`` class keys ``"domain/class"``.

    Returns:
        the loss of every step.
    """
    g = torch.Generator().manual_seed(seed)
    tokenizer = tokenizer_for(model_name)
    device = next(model.parameters()).device
    key_ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    labels = torch.tensor([key_ids[k] for k in keys])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in track(range(steps), "pretrain", enabled=progress, leave=False):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = suite.normalize(suite.shifted(images[idx], g)).to(device)
        captions = []
        for i in idx.tolist():
            domain, name = keys[i].split("/")
            templates = suite.CAPTION_TEMPLATES[domain]
            captions.append(templates[int(torch.randint(len(templates), (1,), generator=g))].format(name))
        text = tokenizer(captions).to(device)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        same = (labels[idx, None] == labels[None, idx]).float().to(device)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: scale <= 100
        losses.append(loss.item())
    model.eval()
    return losses


def finetune_image_tower(
    model: torch.nn.Module,
    head: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    desc: str = "finetune",
) -> list[float]:
    """Fine-tune ``model.visual`` with cross-entropy through a frozen zero-shot head.

    Args:
        head: ``[C, D]`` frozen head (``logits = normalize(f(x)) @ head.T``).
        images: ``[N, 3, H, W]`` model-ready; labels: ``[N]``.
    """
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    head = head.to(device)
    visual = model.visual
    visual.train()
    opt = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in track(range(steps), desc, enabled=progress, leave=False):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        logits = F.normalize(visual(images[idx].to(device)), dim=-1) @ head.T
        loss = F.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    visual.eval()
    return losses


@torch.no_grad()
def accuracy(model: torch.nn.Module, head: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model``'s image tower with ``head`` on ``images``."""
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), 512):
        logits = F.normalize(model.encode_image(images[i : i + 512].to(device)), dim=-1) @ head.to(device).T
        correct += (logits.argmax(-1).cpu() == labels[i : i + 512]).sum().item()
    return correct / max(len(images), 1)
