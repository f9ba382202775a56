"""The embedded offline suite: real images that installed packages ship, at 16 px.

Two disjoint pools of scikit-learn's 1,797 handwritten digits (split by seed):

* pool A (900 train / 200 test) feeds pretraining and the source tasks' ``train`` and ``test``;
* pool B (697) is never pretrained or fine-tuned on: the held-out targets use it as 200 train /
  100 val / 397 test, and its first 300 (the targets' train and val) are the source tasks' ``val``.

Source tasks are digits under one transform each (inverted, rotated, noisy, ...), digit parity,
five scikit-image textures and scikit-image's noisy faces versus non-faces. Every source task has a
``val`` split that neither pretraining nor fine-tuning saw and that no protocol tests on (digits:
pool B's first 300; textures: crops of a band of each image that train and test crops never touch;
faces: 40 images held back), so task addition can learn its coefficients on held-out data as
aTLAS does at real scale. Targets combine transforms that no single source covers; ``mixed`` gives
each image one of three different pairs, the case where a per-sample composition should beat one
shared composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

IMAGE_SIZE = 16
#: Version of the suite's data layout; a bank records the one it was built with. 2: held-out source
#: ``val`` splits (digits from pool B, a texture band, 40 faces held back).
VERSION = 2
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a picture of the number {}.", "the handwritten digit {}.")
TEXTURE_NAMES = ("brick", "grass", "gravel", "text", "coins")
TEXTURE_TEMPLATES = ("a photo of a {} texture.", "a close-up of {}.")
FACE_NAMES = ("face", "background")
FACE_TEMPLATES = ("a photo of a {}.", "a cropped photo of a {}.")
PARITY_NAMES = ("even", "odd")
PARITY_TEMPLATES = ("a photo of an {} number.", "an {} digit.")


@dataclass
class TaskData:
    """Images, labels and the text needed for a zero-shot head.

    Attributes:
        splits: split name (``train``, ``val``, ``test``) -> ``(images [N, 3, 16, 16] float32 in
            [0, 1], labels [N] int64)``.
        domains: split name -> ``[N]`` the domain each image was made in (an index into
            ``domain_sources``); empty when the data set does not record it.
        domain_sources: per domain, the source tasks whose transforms made it (the task vectors a
            composition should select).
    """

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    domains: dict[str, torch.Tensor] = field(default_factory=dict)
    domain_sources: tuple[tuple[str, ...], ...] = ()

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        from ..errors import DataError

        if name not in self.splits:
            raise DataError(f"data set {self.name!r} has no {name!r} split; it has {sorted(self.splits)}")
        return self.splits[name]


# ---------------------------------------------------------------- image transforms, [N,3,H,W] -> same
def _gray(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1, keepdim=True)


def inverted(x, g):
    return 1.0 - x


def rotated(x, g):
    return torch.rot90(x, 1, dims=(2, 3))


def noisy(x, g):
    return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def blurry(x, g):
    return gaussian_blur(x, kernel_size=7, sigma=1.3)


def tinted(x, g):
    gray = _gray(x)
    return torch.cat([gray, torch.zeros_like(gray), 1.0 - gray], 1)


def low_contrast(x, g):
    return 0.4 + 0.2 * x


def edges(x, g):
    gray = _gray(x)
    kx = gray.new_tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    mag = torch.sqrt(F.conv2d(gray, kx, padding=1) ** 2 + F.conv2d(gray, kx.transpose(2, 3), padding=1) ** 2)
    mag = mag / mag.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return mag.expand(-1, 3, -1, -1).contiguous()


def shifted(x, g, max_shift: int = 2):
    """Random translation by up to ``max_shift`` pixels (zero padding), one shift per image."""
    n = len(x)
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + IMAGE_SIZE, dx[i] : dx[i] + IMAGE_SIZE] for i in range(n)])


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] images to the model's input range [-1, 1]."""
    return (x - 0.5) / 0.5


def chain(*fns: Callable) -> Callable:
    def composed(x, g):
        for fn in fns:
            x = fn(x, g)
        return x

    return composed


DIGIT_TRANSFORMS: dict[str, Callable] = {
    "digits": lambda x, g: x,
    "digits-inverted": inverted,
    "digits-rotated": rotated,
    "digits-noisy": noisy,
    "digits-blurry": blurry,
    "digits-tinted": tinted,
    "digits-lowcontrast": low_contrast,
    "digits-edges": edges,
}

#: Held-out targets, built only from pool B: name -> transforms (one is drawn per image when several).
TARGETS: dict[str, tuple[Callable, ...]] = {
    "rot-noise": (chain(rotated, noisy),),
    "inv-tint": (chain(inverted, tinted),),
    "mixed": (chain(rotated, blurry), chain(inverted, noisy), chain(edges, tinted)),
}

#: The source tasks behind each transform of :data:`TARGETS`, in the same order.
TARGET_SOURCES: dict[str, tuple[tuple[str, ...], ...]] = {
    "rot-noise": (("digits-rotated", "digits-noisy"),),
    "inv-tint": (("digits-inverted", "digits-tinted"),),
    "mixed": (("digits-rotated", "digits-blurry"), ("digits-inverted", "digits-noisy"),
              ("digits-edges", "digits-tinted")),
}

#: Transformed digits shown during pretraining, per source transform: enough for zero-shot above
#: chance on every digit transform, far from saturation (inverted digits need more to get off chance).
#: Parity's zero-shot stays at chance: its prompts are not what pretraining captioned.
GLIMPSE_PER_TRANSFORM = {
    "digits-inverted": 90, "digits-rotated": 30, "digits-noisy": 30, "digits-blurry": 30,
    "digits-tinted": 30, "digits-lowcontrast": 30, "digits-edges": 30,
}

SOURCES = (*DIGIT_TRANSFORMS, "parity", "textures", "faces-noisy")


# ---------------------------------------------------------------- raw images
@lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``[N, 3, 16, 16]`` in [0, 1] and labels ``[N]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target, dtype=torch.long)


def digit_pools(seed: int) -> dict[str, torch.Tensor]:
    """Indices of pool A (train/test), pool B (train/val/test) and the source tasks' val for a seed."""
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    return {
        "A-train": perm[:900],
        "A-test": perm[900:1100],
        "B-train": perm[1100:1300],
        "B-val": perm[1300:1400],
        "B-test": perm[1400:],
        # the source tasks' val: pool B's learning part (never a test image of any protocol)
        "source-val": perm[1100:1400],
    }


#: The horizontal band of each texture image (fractions of its width) that a split's crops lie in:
#: disjoint, so no two splits share a pixel.
TEXTURE_BANDS = {"train": (0.0, 0.55), "val": (0.55, 0.7), "test": (0.7, 1.0)}
TEXTURE_CROPS = {"train": 200, "val": 40, "test": 100}


def _texture_crops(n_per_class: int, part: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 48-px crops of five scikit-image textures from the band ``TEXTURE_BANDS[part]``,
    resized to 16 px: ``([5 * n_per_class, 3, 16, 16], labels)``."""
    from skimage import data

    images, labels = [], []
    for label, name in enumerate(TEXTURE_NAMES):
        img = torch.tensor(np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0)
        if img.ndim == 3:
            img = img.mean(-1)
        h, w = img.shape
        lo, hi = (int(f * w) for f in TEXTURE_BANDS[part])
        crop = 48
        xs = torch.randint(lo, hi - crop, (n_per_class,), generator=g)
        ys = torch.randint(0, h - crop, (n_per_class,), generator=g)
        patches = torch.stack([img[y : y + crop, x : x + crop] for x, y in zip(xs.tolist(), ys.tolist())])
        images.append(F.interpolate(patches.unsqueeze(1), size=IMAGE_SIZE, mode="area"))
        labels.append(torch.full((n_per_class,), label))
    return torch.cat(images).expand(-1, 3, -1, -1).contiguous(), torch.cat(labels)


@lru_cache(maxsize=None)
def _faces() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's ``lfw_subset``: 100 faces then 100 non-faces, 25 px -> 16 px."""
    from skimage import data

    x = torch.tensor(data.lfw_subset(), dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    return x.expand(-1, 3, -1, -1).contiguous(), y


def face_split(seed: int) -> dict[str, torch.Tensor]:
    """Indices of the 110 train, 40 val and 50 test images of ``lfw_subset`` for a seed."""
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(seed))
    return {"train": perm[:110], "val": perm[110:150], "test": perm[150:]}


# ---------------------------------------------------------------- tasks
SOURCE_SPLITS = ("train", "val", "test")


def source_task(name: str, seed: int = 0) -> TaskData:
    """A source task: digits on pool A (``train``/``test``) with ``val`` from pool B, or
    textures/faces from their own images; ``val`` is never pretrained or fine-tuned on."""
    g = torch.Generator().manual_seed(seed * 1000 + SOURCES.index(name))
    if name in DIGIT_TRANSFORMS or name == "parity":
        x, y = _digits()
        pools = digit_pools(seed)
        rows = {"train": pools["A-train"], "val": pools["source-val"], "test": pools["A-test"]}
        fn = DIGIT_TRANSFORMS.get(name, DIGIT_TRANSFORMS["digits"])
        splits = {s: (normalize(fn(x[rows[s]], g)), y[rows[s]]) for s in SOURCE_SPLITS}
        if name == "parity":
            splits = {s: (img, lab % 2) for s, (img, lab) in splits.items()}
            return TaskData(name, PARITY_NAMES, PARITY_TEMPLATES, splits)
        return TaskData(name, DIGIT_NAMES, DIGIT_TEMPLATES, splits)
    if name == "textures":
        splits = {s: _texture_crops(TEXTURE_CROPS[s], s, g) for s in SOURCE_SPLITS}
        splits = {s: (normalize(img), lab) for s, (img, lab) in splits.items()}
        return TaskData(name, TEXTURE_NAMES, TEXTURE_TEMPLATES, splits)
    if name == "faces-noisy":
        # Clean faces are trivial after pretraining (zero-shot 100 %); sensor noise leaves room to learn.
        x, y = _faces()
        x = noisy(x, g)
        rows = face_split(seed)
        splits = {s: (normalize(x[rows[s]]), y[rows[s]]) for s in SOURCE_SPLITS}
        return TaskData(name, FACE_NAMES, FACE_TEMPLATES, splits)
    raise KeyError(name)


def target_task(name: str, seed: int = 0) -> TaskData:
    """A held-out target on pool B with ``train`` (200), ``val`` (100) and ``test`` (397) splits."""
    x, y = _digits()
    pools = digit_pools(seed)
    fns = TARGETS[name]
    g = torch.Generator().manual_seed(seed * 1000 + 100 + list(TARGETS).index(name))
    splits, domains = {}, {}
    for s in ("train", "val", "test"):
        idx = pools[f"B-{s}"]
        imgs = x[idx]
        which = torch.randint(0, len(fns), (len(idx),), generator=g)
        out = torch.empty_like(imgs)
        for k, fn in enumerate(fns):
            sel = which == k
            if sel.any():
                out[sel] = fn(imgs[sel], g)
        splits[s] = (normalize(out), y[idx])
        domains[s] = which
    return TaskData(name, DIGIT_NAMES, DIGIT_TEMPLATES, splits, domains, TARGET_SOURCES[name])


def pretraining_corpus(seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Captioned images for contrastive pretraining: plain digits, textures, faces.

    The source transforms are mostly kept out of pretraining on purpose: when the base model has
    seen much of them, zero-shot accuracy on the sources saturates and the task vectors carry
    little. A glimpse of a few dozen images per transform (``GLIMPSE_PER_TRANSFORM``) keeps zero-shot above chance.

    Returns:
        images ``[M, 3, 16, 16]`` in [0, 1] (augment, then :func:`normalize`) and one class caption key per image (``"digits/seven"``).
    """
    x, y = _digits()
    pools = digit_pools(seed)
    g = torch.Generator().manual_seed(seed + 7)
    tex_x, tex_y = _texture_crops(TEXTURE_CROPS["train"], "train", g)
    face_x, face_y = _faces()
    face_train = face_split(seed)["train"]
    face_x, face_y = face_x[face_train], face_y[face_train]
    # A glimpse of each source transform (a few dozen images) lifts zero-shot above chance on
    # every source without saturating it.
    seen, seen_keys = [], []
    for name, fn in DIGIT_TRANSFORMS.items():
        glimpse = pools["A-train"][: GLIMPSE_PER_TRANSFORM.get(name, 0)]
        seen.append(fn(x[glimpse], g))
        seen_keys += [f"digits/{DIGIT_NAMES[i]}" for i in y[glimpse].tolist()]
    images = torch.cat([x[pools["A-train"]], *seen, tex_x, face_x])
    keys = (
        [f"digits/{DIGIT_NAMES[i]}" for i in y[pools["A-train"]].tolist()]
        + seen_keys
        + [f"textures/{TEXTURE_NAMES[i]}" for i in tex_y.tolist()]
        + [f"faces/{FACE_NAMES[i]}" for i in face_y.tolist()]
    )
    return images, keys


CAPTION_TEMPLATES = {"digits": DIGIT_TEMPLATES, "textures": TEXTURE_TEMPLATES, "faces": FACE_TEMPLATES}
