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
