"""Data set spec strings -> :class:`TaskData`.

Accepted specs:

* ``NAME`` or ``suite:NAME``: a task of the embedded offline suite (``vtvc_pyro.data.suite``);
  sources: ``digits``, ``digits-inverted``, ..., ``parity``, ``textures``, ``faces``; held-out
  targets: ``rot-noise``, ``inv-tint``, ``mixed``.
* ``imagefolder:PATH``: ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*.png`` (optional
  ``PATH/val``), read with torchvision's ``ImageFolder``.
* ``benchmark:NAME`` or ``benchmark:NAME@ROOT``: one of the 8 task-vector benchmarks (``Cars``,
  ``DTD``, ``EuroSAT``, ``GTSRB``, ``MNIST``, ``RESISC45``, ``SUN397``, ``SVHN``, or ``<Name>Val``)
  under ``ROOT`` (default ``$VTVC_DATA_ROOT``), images streamed from disk
  (:mod:`vtvc_pyro.data.benchmarks`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import DataError
from . import suite
from .suite import TaskData

SUITE_TASKS = (*suite.SOURCES, *suite.TARGETS)


def load_dataset(spec: str, seed: int = 0, image_size: int = suite.IMAGE_SIZE, preprocess=None) -> TaskData:
    """Resolve a spec string to images, labels, class names and templates.

    ``preprocess`` (the model's open_clip transform) is used by ``benchmark:`` specs only.

    Usage::

        task = load_dataset("mixed", seed=0)
        images, labels = task.split("test")
    """
    kind, _, rest = spec.partition(":") if ":" in spec else ("suite", "", spec)
    if kind == "suite":
        if rest in suite.TARGETS:
            return suite.target_task(rest, seed)
        if rest in suite.SOURCES:
            return suite.source_task(rest, seed)
        raise DataError(f"unknown data set spec {spec!r}: use one of {', '.join(SUITE_TASKS)} or imagefolder:PATH")
    if kind == "imagefolder":
        return _imagefolder(Path(rest), image_size)
    if kind == "benchmark":
        from . import benchmarks

        name, root = benchmarks.parse_spec(rest)
        return benchmarks.load_benchmark(name, root, preprocess)
    raise DataError(f"unknown data set spec {spec!r}: use one of {', '.join(SUITE_TASKS)}, imagefolder:PATH "
                    "or benchmark:NAME[@ROOT]")


def suite_transform(image_size: int = suite.IMAGE_SIZE):
    """The embedded suite's image transform: resize, centre crop, 3 channels in [-1, 1] (PIL image -> ``[3, H, W]``)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Lambda(lambda x: suite.normalize(x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3])),
    ])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


def load_image_files(root: str | Path, transform) -> tuple[torch.Tensor, list[str]]:
    """Every image under ``root`` (recursively, sorted by path) through ``transform``:
    ``(images [N, 3, H, W], paths relative to root)``. No labels: for prediction on new images."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass a folder of images (imagefolder:PATH)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}): put image files there")
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(transform(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read {path} as an image ({err}): remove it or replace it") from err
    return torch.stack(images), [str(p.relative_to(root)) for p in files]


def _imagefolder(root: Path, image_size: int) -> TaskData:
    from torchvision import datasets

    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"imagefolder root {root} needs train/<class>/ and test/<class>/ subfolders of images")
    tf = suite_transform(image_size)
    splits, classes = {}, None
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        try:
            ds = datasets.ImageFolder(str(root / split), transform=tf)
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"{root / split} holds no class folders with images ({err}); "
                            f"put images in {root / split}/<class>/") from err
        if classes is not None and ds.classes != classes:
            raise DataError(f"{root / split} has classes {ds.classes}, but train has {classes}; use the same class folders")
        classes = ds.classes
        if len(ds) == 0:
            raise DataError(f"{root / split} holds no images: put images in {root / split}/<class>/")
        splits[split] = _read_all(ds)
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder ({', '.join(classes)}): a classifier needs at least "
                        "two; put each class's images in its own folder under train/ and test/")
    names = tuple(c.replace("_", " ") for c in classes)
    return TaskData(f"imagefolder:{root}", names, ("a photo of a {}.",), splits)


def _read_all(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a torchvision ``ImageFolder``: ``([N, 3, H, W], labels [N])``; a file that is
    not an image is one clear error naming it."""
    from PIL import UnidentifiedImageError

    xs, ys = [], []
    for i, (path, _) in enumerate(ds.samples):
        try:
            x, y = ds[i]
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read {path} as an image ({err}): remove it or replace it") from None
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


def with_validation(task: TaskData, seed: int = 0, fraction: float = 0.1) -> TaskData:
    """Return ``task`` with a ``val`` split, carved from train (``fraction``, seeded) when missing."""
    if "val" in task.splits:
        return task
    x, y = task.split("train")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * len(x))))
    splits = dict(task.splits)
    splits["val"] = (_take(x, perm[:n_val]), y[perm[:n_val]])
    splits["train"] = (_take(x, perm[n_val:]), y[perm[n_val:]])
    return TaskData(task.name, task.class_names, task.templates, splits)


def _take(images, index: torch.Tensor):
    """``images[index]``; images streamed from disk stay streamed (a view of the subset, nothing decoded)."""
    if torch.is_tensor(images):
        return images[index]
    from torch.utils.data import Subset

    view = copy.copy(images)
    view.dataset, view._pool = Subset(images.dataset, index.tolist()), None
    return view
