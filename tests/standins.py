"""Tiny stand-ins of the 8 benchmarks, written in the exact on-disk layouts torchvision's classes read.

Real files throughout: JPEG/PPM/PNG images, MNIST's IDX files, SVHN's and Stanford Cars' MATLAB
``.mat`` files, GTSRB's ``;``-separated CSV, DTD's and SUN397's split lists. Images are small,
deterministic and coloured by class (so a class is learnable).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image

GTSRB_CLASSES = 43
EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")


def _image(label: int, index: int, size: int = 12) -> np.ndarray:
    """``[size, size, 3]`` uint8: a class colour plus seeded noise."""
    rng = np.random.default_rng(1000 * label + index)
    colour = np.array([(37 * label) % 256, (91 * label + 40) % 256, (151 * label + 80) % 256])
    return np.clip(colour + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)


def _save(path: Path, label: int, index: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(label, index)).save(path, format=fmt)


def write_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.stack([_image(int(y), i, 28)[..., 0] for i, y in enumerate(labels)])
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def write_svhn(root: Path, n_train: int = 30, n_test: int = 10) -> None:
    from scipy.io import savemat

    (root / "svhn").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        digits = np.arange(n) % 10
        x = np.stack([_image(int(d), i, 32) for i, d in enumerate(digits)], axis=-1)  # [32, 32, 3, N]
        y = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)  # SVHN labels digit 0 as 10
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": x, "y": y})


def write_cars(root: Path, classes: int = 3, n_train: int = 12, n_test: int = 6) -> list[str]:
    from scipy.io import savemat

    base = root / "stanford_cars"
    names = [f"Maker Model{c} Sedan 20{10 + c}" for c in range(classes)]
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object).reshape(1, -1)})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for split, n, ann_path, folder in (("train", n_train, base / "devkit" / "cars_train_annos.mat", "cars_train"),
                                       ("test", n_test, base / "cars_test_annos_withlabels.mat", "cars_test")):
        records = np.zeros((1, n), dtype=fields)
        for i in range(n):
            label = i % classes
            fname = f"{i + 1:05d}.jpg"
            _save(base / folder / fname, label, i + (0 if split == "train" else 500))
            records[0, i] = (1, 1, 11, 11, label + 1, fname)  # the .mat counts classes from 1
        savemat(ann_path, {"annotations": records})
    return names


def write_dtd(root: Path, classes=("banded", "bubbly", "zigzagged"), per_class: int = 4) -> None:
    data = root / "dtd" / "dtd"
    lines = {"train": [], "val": [], "test": []}
    for c, name in enumerate(classes):
        for i in range(3 * per_class):
            fname = f"{name}_{i:04d}.jpg"
            _save(data / "images" / name / fname, c, i)
            lines[("train", "val", "test")[i % 3]].append(f"{name}/{fname}")
    (data / "labels").mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")


def write_eurosat(root: Path, per_class: int = 3) -> None:
    for c, folder in enumerate(EUROSAT_FOLDERS):
        for i in range(per_class):
            _save(root / "eurosat" / "2750" / folder / f"{folder}_{i + 1}.jpg", c, i)


def write_gtsrb(root: Path, per_class: int = 1, n_test: int = 12) -> None:
    base = root / "gtsrb"
    for c in range(GTSRB_CLASSES):
        for i in range(per_class):
            _save(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{i:05d}.ppm", c, i, "PPM")
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(n_test):
        label = (5 * i) % GTSRB_CLASSES
        _save(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", label, 900 + i, "PPM")
        rows.append(f"{i:05d}.ppm;12;12;1;1;11;11;{label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def write_resisc45(root: Path, classes=("airplane", "baseball_diamond", "sea_ice"), per_class: int = 6) -> None:
    base = root / "resisc45"
    split_rows = {"train": [], "val": [], "test": []}
    for c, name in enumerate(classes):
        for i in range(per_class):
            fname = f"{name}_{i + 1:03d}.jpg"
            _save(base / "NWPU-RESISC45" / name / fname, c, i)
            split_rows["test" if i % 3 == 2 else "train"].append(fname)
    for split, rows in split_rows.items():
        (base / f"resisc45-{split}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))


def write_sun397(root: Path, classes=("/a/abbey", "/b/bakery/shop", "/c/campus"), per_class: int = 6) -> None:
    data = root / "SUN397"
    data.mkdir(parents=True, exist_ok=True)
    (data / "ClassName.txt").write_text("\n".join(classes) + "\n")
    train, test = [], []
    for c, cls in enumerate(classes):
        for i in range(per_class):
            rel = f"{cls}/sun_{c}{i:04d}.jpg"
            _save(data.joinpath(*rel[1:].split("/")), c, i)
            (test if i % 3 == 2 else train).append(rel)
    (data / "Training_01.txt").write_text("\n".join(train) + "\n")
    (data / "Testing_01.txt").write_text("\n".join(test) + "\n")


WRITERS = {"Cars": write_cars, "DTD": write_dtd, "EuroSAT": write_eurosat, "GTSRB": write_gtsrb,
           "MNIST": write_mnist, "RESISC45": write_resisc45, "SUN397": write_sun397, "SVHN": write_svhn}


def write_all(root: Path) -> Path:
    """All 8 stand-ins under ``root``."""
    for writer in WRITERS.values():
        writer(root)
    return root


# ---------------------------------------------------------------- published checkpoint formats
_PICKLER = r'''
import sys, torch, open_clip
from pathlib import Path
from safetensors.torch import load_file
import vtvc_pyro.backbone  # registers vtvc-tiny
from src.modeling import ImageEncoder

arch, base, folder, layout = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
tasks = sys.argv[5:]

def encoder(shift_seed):
    clip, _, val_preprocess = open_clip.create_model_and_transforms(arch)
    clip.load_state_dict(load_file(base))
    if shift_seed is not None:
        g = torch.Generator().manual_seed(shift_seed)
        with torch.no_grad():
            for p in clip.visual.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return ImageEncoder(clip, val_preprocess)

zs_name = "zeroshot.pt" if layout == "task_vectors" else "nonlinear_zeroshot.pt"
ft_name = "finetuned.pt" if layout == "task_vectors" else "nonlinear_finetuned.pt"
if layout == "task_vectors":
    torch.save(encoder(None), folder / zs_name)
for i, task in enumerate(tasks):
    sub = folder / (task + "Val")
    sub.mkdir(parents=True, exist_ok=True)
    torch.save(encoder(i + 1), sub / ft_name)
    if layout == "atlas":
        torch.save(encoder(None), sub / zs_name)
'''

_MODELING = '''
import torch


class ImageEncoder(torch.nn.Module):
    """As task_vectors' src.modeling.ImageEncoder: an open_clip CLIP without its text tower."""

    def __init__(self, model, val_preprocess):
        super().__init__()
        self.model = model
        self.val_preprocess = val_preprocess
        delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)
'''


def write_published_checkpoints(folder: Path, arch: str, base_weights: Path, tasks: list[str],
                                 layout: str = "task_vectors") -> Path:
    """Pickled ``src.modeling.ImageEncoder`` modules (``torch.save`` of the whole module) in the
    task_vectors layout (``zeroshot.pt``, ``<Task>Val/finetuned.pt``) or aTLAS's
    (``<Task>Val/nonlinear_{zeroshot,finetuned}.pt``).

    They are written by a separate interpreter where ``src.modeling`` exists, so the reading side
    meets the classes of a project it does not have, as with the real files.
    """
    import os
    import subprocess
    import sys
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp()) / "src"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "modeling.py").write_text(_MODELING)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src.parent), str(root)]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _PICKLER, arch, str(base_weights), str(folder), layout, *tasks],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return folder
