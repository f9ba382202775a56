"""The 8 standard task-vector benchmarks from a local root, read through torchvision's data set classes.

Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397 and SVHN, with the class names and prompt
templates that task_vectors and aTLAS use, the ``<Name>Val`` protocol (validation held out from
train: 10 %, at most 5,000 images, ``torch.utils.data.random_split`` with seed 0) and open_clip's
evaluation preprocessing of the chosen model.

Images are never held in memory as a whole: a split is a :class:`StreamedImages` view that decodes
only the images a mini-batch asks for (thread pool) or streams a split through a ``DataLoader``.
Labels are read from the data set's index without decoding any image.

Nothing downloads unless ``download=True`` (``vtvc data check --root ROOT --download``); a missing
root or data set raises :class:`~vtvc_pyro.errors.DataError` naming the folder layout expected
and how to obtain it.

Usage::

    task = load_benchmark("MNIST", "/data", preprocess=clip_preprocess(model))
    images, labels = task.split("train")           # StreamedImages [N,3,H,W] (lazy), labels [N]
    x = images[torch.tensor([0, 5, 7])]            # decodes three images -> [3, 3, H, W]
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, random_split

from ..errors import DataError
from .suite import TaskData

log = logging.getLogger(__name__)

#: Default data root when a spec names none (``benchmark:MNIST``).
DATA_ROOT_ENV = "VTVC_DATA_ROOT"
VAL_FRACTION, MAX_VAL, SPLIT_SEED = 0.1, 5000, 0

# ---------------------------------------------------------------- prompt templates (task_vectors' templates)
_CARS = ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
         "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.")
_DTD = tuple(f"a photo of {a} {{}} {kind}." for a in ("a", "the") for kind in ("texture", "pattern", "thing", "object"))
_EUROSAT = ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
            "a centered satellite photo of the {}.")
_GTSRB = ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
          'a close up photo of a "{}" traffic sign.')
_DIGITS = ('a photo of the number: "{}".',)
_RESISC45 = tuple(f"{src} {kind} of {art}{{}}." for art in ("", "a ", "the ")
                  for src, kind in (("satellite", "imagery"), ("aerial", "imagery"), ("satellite", "photo"),
                                    ("aerial", "photo"), ("satellite", "view"), ("aerial", "view")))
_SUN397 = ("a photo of a {}.", "a photo of the {}.")

# ---------------------------------------------------------------- fixed class names
_DIGIT_NAMES = tuple(str(i) for i in range(10))
# EuroSAT folder -> the CLIP-paper wording task_vectors uses
_EUROSAT_NAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}
# GTSRB ClassId 0..42 -> the CLIP-paper descriptions task_vectors uses
_GTSRB_NAMES = tuple(
    [f"red and white circle {v} kph speed limit" for v in (20, 30, 50, 60, 70, 80)]
    + ["end / de-restriction of 80 kph speed limit"]
    + [f"red and white circle {v} kph speed limit" for v in (100, 120)]
    + [
        "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing",
        "red and white triangle road intersection warning",
        "white and yellow diamond priority road",
        "red and white upside down triangle yield right-of-way",
        "stop",
        "empty red and white circle",
        "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry",
        "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning",
        "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning",
        "red and white triangle with child and person walking warning",
        "red and white triangle with bicyle warning",
        "red and white triangle with snowflake / ice warning",
        "red and white triangle with deer warning",
        "white circle with gray strike bar no speed limit",
        "blue circle with white right turn arrow mandatory",
        "blue circle with white left turn arrow mandatory",
        "blue circle with white forward arrow mandatory",
        "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory",
        "blue circle with white keep right arrow mandatory",
        "blue circle with white keep left arrow mandatory",
        "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended",
    ]
)


# ---------------------------------------------------------------- builders: (root, split, transform, download) -> Dataset
def _mnist(root, split, transform, download):
    from torchvision.datasets import MNIST

    return MNIST(str(root), train=split == "train", transform=transform, download=download)


def _svhn(root, split, transform, download):
    from torchvision.datasets import SVHN

    class LocalSVHN(SVHN):
        """torchvision's SVHN; a present file is accepted without its MD5 (the MD5 guards downloads)."""

        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file() or super()._check_integrity()

    return LocalSVHN(str(root / "svhn"), split=split, transform=transform, download=download)


def _cars(root, split, transform, download):
    from torchvision.datasets import StanfordCars

    return StanfordCars(str(root), split=split, transform=transform, download=download)


def _dtd(root, split, transform, download):
    from torchvision.datasets import DTD

    return DTD(str(root), split=split, partition=1, transform=transform, download=download)


def _gtsrb(root, split, transform, download):
    from torchvision.datasets import GTSRB

    return GTSRB(str(root), split=split, transform=transform, download=download)


def _seeded_half(ds: Dataset, split: str, test_fraction: float) -> Dataset:
    """A fixed train/test split (seed 0) for data sets torchvision ships without one."""
    n_test = round(test_fraction * len(ds))
    train, test = random_split(ds, [len(ds) - n_test, n_test], generator=torch.Generator().manual_seed(SPLIT_SEED))
    return train if split == "train" else test


def _eurosat(root, split, transform, download):
    from torchvision.datasets import EuroSAT, ImageFolder

    splits = root / "EuroSAT_splits"  # task_vectors' prepared split, used when present
    if (splits / "train").is_dir() and (splits / "test").is_dir():
        return ImageFolder(str(splits / split), transform=transform)
    # torchvision's EuroSAT has no split: 10 % test (2,700 of 27,000), seed 0
    return _seeded_half(EuroSAT(str(root), transform=transform, download=download), split, 0.1)


def _sun397(root, split, transform, download):
    from torchvision.datasets import SUN397

    ds = SUN397(str(root), transform=transform, download=download)
    part = ds._data_dir / f"{'Training' if split == 'train' else 'Testing'}_01.txt"
    if part.is_file():  # the official partition 1 (task_vectors' protocol), when Partitions.zip is unpacked
        files = [ds._data_dir.joinpath(*line.strip()[1:].split("/")) for line in part.read_text().splitlines() if line.strip()]
        ds._image_files = files
        ds._labels = [ds.class_to_idx["/".join(p.relative_to(ds._data_dir).parts[1:-1])] for p in files]
        return ds
    log.warning("SUN397: no Training_01.txt/Testing_01.txt in %s; using a seeded 50/50 split", ds._data_dir)
    return _seeded_half(ds, split, 0.5)


def _resisc45(root, split, transform, download):
    from torchvision.datasets import ImageFolder

    if download:
        raise DataError("RESISC45 cannot be downloaded automatically: get NWPU-RESISC45 and the split files by hand "
                        "(see the layout in the README's real-scale section)")
    split_file = root / "resisc45" / f"resisc45-{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(split_file)
    names = {line.strip() for line in split_file.read_text().splitlines() if line.strip()}
    return ImageFolder(str(root / "resisc45" / "NWPU-RESISC45"), transform=transform,
                       is_valid_file=lambda p: os.path.basename(p) in names)


def _base(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _classes_from_folders(ds, rename: Callable[[str], str]) -> tuple[str, ...]:
    return tuple(rename(c) for c in _base(ds).classes)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how to read it, its class names and templates, and where it must lie."""

    name: str
    build: Callable
    templates: tuple[str, ...]
    class_names: Callable[[Dataset], tuple[str, ...]]
    layout: str
    obtain: str
    downloadable: bool = True


def _sun_name(c: str) -> str:
    return c.replace("/", " ").replace("_", " ")


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("Cars", _cars, _CARS, lambda ds: tuple(_base(ds).classes),
              "ROOT/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg, "
              "cars_test_annos_withlabels.mat, cars_test/*.jpg}",
              "torchvision.datasets.StanfordCars cannot download any more; get the archives from a mirror "
              "(e.g. Kaggle 'stanford-cars-dataset') and unpack them in that layout", downloadable=False),
    Benchmark("DTD", _dtd, _DTD, lambda ds: _classes_from_folders(ds, lambda c: c.replace("_", " ")),
              "ROOT/dtd/dtd/{images/<class>/*.jpg, labels/train1.txt, labels/val1.txt, labels/test1.txt}",
              "vtvc data check --root ROOT --download (torchvision.datasets.DTD)"),
    Benchmark("EuroSAT", _eurosat, _EUROSAT,
              lambda ds: _classes_from_folders(ds, lambda c: _EUROSAT_NAMES.get(c, c)),
              "ROOT/eurosat/2750/<class>/*.jpg (or task_vectors' ROOT/EuroSAT_splits/{train,test}/<class>/)",
              "vtvc data check --root ROOT --download (torchvision.datasets.EuroSAT)"),
    Benchmark("GTSRB", _gtsrb, _GTSRB, lambda ds: _GTSRB_NAMES,
              "ROOT/gtsrb/{GTSRB/Training/<00000..00042>/*.ppm, GTSRB/Final_Test/Images/*.ppm, GT-final_test.csv}",
              "vtvc data check --root ROOT --download (torchvision.datasets.GTSRB)"),
    Benchmark("MNIST", _mnist, _DIGITS, lambda ds: _DIGIT_NAMES,
              "ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
              "vtvc data check --root ROOT --download (torchvision.datasets.MNIST)"),
    Benchmark("RESISC45", _resisc45, _RESISC45, lambda ds: _classes_from_folders(ds, lambda c: c.replace("_", " ")),
              "ROOT/resisc45/{NWPU-RESISC45/<class>/*.jpg, resisc45-train.txt, resisc45-test.txt} "
              "(one file name per line)",
              "download NWPU-RESISC45 and the split lists resisc45-{train,val,test}.txt of 'In-domain representation "
              "learning for remote sensing' (storage.googleapis.com/remote_sensing_representations) by hand",
              downloadable=False),
    Benchmark("SUN397", _sun397, _SUN397, lambda ds: tuple(_sun_name(c) for c in _base(ds).classes),
              "ROOT/SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg, Training_01.txt, Testing_01.txt}",
              "vtvc data check --root ROOT --download (torchvision.datasets.SUN397; unpack Partitions.zip into "
              "ROOT/SUN397 for the official partition 1)"),
    Benchmark("SVHN", _svhn, _DIGITS, lambda ds: _DIGIT_NAMES,
              "ROOT/svhn/{train_32x32.mat, test_32x32.mat}",
              "vtvc data check --root ROOT --download (torchvision.datasets.SVHN)"),
)}


def resolve_name(name: str) -> tuple[Benchmark, bool]:
    """``"MNIST"`` -> (MNIST, False); ``"MNISTVal"`` -> (MNIST, True). Case-insensitive."""
    key = name[:-3] if name.lower().endswith("val") else name
    for bench in BENCHMARKS.values():
        if bench.name.lower() == key.lower():
            return bench, key != name
    raise DataError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)} (or <Name>Val)")


def open_split(bench: Benchmark, root: str | Path, split: str, transform=None, download: bool = False) -> Dataset:
    """torchvision's data set of one split (``train`` or ``test``), with an error naming the layout when absent."""
    root = Path(root).expanduser()
    if download and not bench.downloadable:
        raise DataError(f"{bench.name} cannot be downloaded automatically: {bench.obtain}")
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: create it and put {bench.name} there as {bench.layout}; "
                        f"to obtain it: {bench.obtain}")
    try:
        return bench.build(root, split, transform, download)
    except DataError:
        raise
    except (RuntimeError, FileNotFoundError, OSError, ValueError, KeyError, IndexError) as err:
        raise DataError(f"{bench.name} not found or incomplete under {root} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''}): expected {bench.layout}; "
                        f"to obtain it: {bench.obtain}") from err


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """All labels ``[N]`` of a torchvision data set (or a ``Subset`` of one) without decoding images."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return torch.as_tensor(list(getattr(ds, attr)) if not torch.is_tensor(getattr(ds, attr)) else getattr(ds, attr),
                                   dtype=torch.long)
    if hasattr(ds, "_samples"):
        return torch.tensor([t for _, t in ds._samples], dtype=torch.long)
    return torch.tensor([ds[i][1] for i in range(len(ds))], dtype=torch.long)


def val_split(train: Dataset, fraction: float = VAL_FRACTION, max_val: int = MAX_VAL,
              seed: int = SPLIT_SEED) -> tuple[Subset, Subset]:
    """The ``<Name>Val`` protocol of task_vectors/aTLAS: ``(train minus val, val)``.

    ``val = min(int(fraction · N), max_val)`` images, chosen by ``random_split`` with ``seed``.
    """
    n = len(train)
    n_val = min(int(n * fraction), max_val)
    if n_val <= 0 or n_val >= n:
        raise DataError(f"a train split of {n} images is too small to hold out {fraction:.0%} for validation")
    rest, val = random_split(train, [n - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return rest, val


def clip_preprocess(model: torch.nn.Module | None = None, image_size: int = 224):
    """open_clip's evaluation transform of ``model`` (its ``visual.preprocess_cfg``), or the default CLIP one."""
    from open_clip.transform import PreprocessCfg, image_transform, image_transform_v2

    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    if cfg:
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    return image_transform(image_size, is_train=False)


class StreamedImages:
    """A read-only, tensor-like view ``[N, 3, H, W]`` of a data set whose images stay on disk.

    Supports what the fit and the baselines do with image tensors: ``len``, indexing by an index
    tensor, list or slice (returns a real ``[M, 3, H, W]`` tensor on :attr:`device`), ``.to(device)``
    and ``.device``. Images are decoded on demand by ``num_workers`` threads; :meth:`loader` streams
    the whole split through a ``DataLoader`` instead.
    """

    def __init__(self, dataset: Dataset, device: str | torch.device = "cpu", num_workers: int | None = None):
        self.dataset = dataset
        self.device = torch.device(device)
        self.num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._load([0]).shape[1:]) if len(self) else (0,)

    def to(self, device) -> StreamedImages:
        out = copy.copy(self)
        out.device, out._pool = torch.device(device), None
        return out

    def _load(self, indices: Sequence[int]) -> torch.Tensor:
        if self.num_workers > 1 and len(indices) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers)
            images = list(self._pool.map(lambda i: self.dataset[i][0], indices))
        else:
            images = [self.dataset[i][0] for i in indices]
        return torch.stack(images) if images else torch.zeros(0)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            indices = list(range(len(self)))[key]
        elif torch.is_tensor(key):
            indices = key.reshape(-1).tolist()
        elif isinstance(key, int):
            return self._load([key])[0].to(self.device)
        else:
            indices = list(key)
        return self._load(indices).to(self.device)

    def loader(self, batch_size: int = 256, sampler=None, num_workers: int = 0) -> DataLoader:
        """A ``DataLoader`` over the split in order (or over ``sampler``, e.g. a ``DistributedSampler``)."""
        return DataLoader(self.dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers)

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}


def load_benchmark(name: str, root: str | Path | None = None, preprocess=None, download: bool = False,
                   device: str | torch.device = "cpu") -> TaskData:
    """A benchmark as :class:`TaskData` with lazily loaded ``train``, ``val`` and ``test`` splits.

    ``<Name>`` gives train (minus the held-out val), val and the official test split; ``<Name>Val``
    gives task_vectors' validation data set: ``train`` (minus val) and ``test`` = the held-out val.

    Args:
        root: the data root (default ``$VTVC_DATA_ROOT``, else ``./data``).
        preprocess: the image transform (default: :func:`clip_preprocess` at 224 px).
    """
    bench, is_val = resolve_name(name)
    root = Path(root or os.environ.get(DATA_ROOT_ENV, "data"))
    transform = preprocess or clip_preprocess()
    train_full = open_split(bench, root, "train", transform, download)
    train, val = val_split(train_full)
    if is_val:
        parts = {"train": train, "test": val}
    else:
        parts = {"train": train, "val": val, "test": open_split(bench, root, "test", transform, download)}
    splits = {k: (StreamedImages(ds, device), dataset_labels(ds)) for k, ds in parts.items()}
    names = bench.class_names(train_full)
    top = max(int(y.max()) for _, y in splits.values() if len(y))
    if top >= len(names):
        raise DataError(f"{bench.name} under {root} has label {top} but {len(names)} classes: the folder layout is "
                        f"incomplete or not {bench.layout}")
    return TaskData(bench.name + ("Val" if is_val else ""), names, bench.templates, splits)


def parse_spec(rest: str) -> tuple[str, str | None]:
    """``"MNIST@/data"`` -> ``("MNIST", "/data")``; ``"MNIST"`` -> ``("MNIST", None)``."""
    name, _, root = rest.partition("@")
    return name, (root or None)


class ConcatImages:
    """Several image splits (tensors or :class:`StreamedImages`) seen as one ``[N, 3, H, W]``, in order.

    Indexing by an index tensor, list or slice returns a real tensor on :attr:`device`, as
    :class:`StreamedImages` does; task addition trains on the union of the tasks' splits through it.
    """

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        sizes = torch.tensor([len(p) for p in self.parts])
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    def to(self, device) -> ConcatImages:
        return ConcatImages([p.to(device) for p in self.parts])

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self[[key]][0]
        index = torch.arange(len(self))[key] if isinstance(key, slice) else torch.as_tensor(key).reshape(-1).cpu()
        part = torch.searchsorted(self.starts, index, right=True) - 1
        out = None
        for p in part.unique().tolist():
            rows = (part == p).nonzero().squeeze(1)
            images = self.parts[p][(index[rows] - self.starts[p]).to(self.parts[p].device)].to(self.device)
            if out is None:
                out = images.new_empty((len(index), *images.shape[1:]))
            out[rows.to(self.device)] = images
        return out if out is not None else torch.zeros(0, device=self.device)


def concat_images(parts: Sequence):
    """``torch.cat`` of image tensors, or a :class:`ConcatImages` view when any part is streamed from disk."""
    if all(torch.is_tensor(p) for p in parts):
        return torch.cat(list(parts))
    return ConcatImages(parts)
