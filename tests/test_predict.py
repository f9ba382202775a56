"""The predictor (issue 16): a fitted run applied to new images, in Python and as `vtvc predict`."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vtvc_pyro.data.specs import load_dataset, load_image_files
from vtvc_pyro.errors import ConfigError
from vtvc_pyro.protocols.predict import Predictor

from .conftest import run_inline


def test_predictor_reproduces_the_runs_own_test_predictive(short_run):
    """Same run, same draws: the predictor's probabilities on the target's test split are the run's."""
    out, _ = short_run
    predictor = Predictor.from_run(out)
    result = predictor.predict("mixed", split="test")
    saved = load_file(str(out / "predictions.safetensors"))
    assert torch.allclose(result.probs, saved["vtvc"], atol=1e-5)
    assert torch.equal(result.labels, saved["labels"])
    assert result.lam.shape == (397, 11) and ((result.inclusion >= 0) & (result.inclusion <= 1)).all()
    assert (result.mutual_information >= -1e-6).all()
    # both of VTVC's predictions, whichever the run reports as `vtvc`; the one pass needs no draws
    chosen = json.loads((out / "metrics.json").read_text())["prediction"]["vtvc"]
    assert predictor.prediction == chosen
    names = {"mean": "vtvc_mean", "mc": "vtvc_mc"}
    for kind, name in names.items():
        predictor.prediction = kind
        probs = predictor.predict("mixed", split="test").probs
        assert torch.allclose(probs, saved["vtvc" if kind == chosen else name], atol=1e-5), kind
    mc = predictor.predict("mixed", split="test")  # the Monte Carlo predictive's entropy holds its epistemic part
    assert (mc.entropy >= mc.mutual_information - 1e-6).all()
    predictor.prediction = "mean"
    one_pass = predictor.predict("mixed", split="test", num_samples=0)
    assert torch.allclose(one_pass.probs, saved["vtvc" if chosen == "mean" else "vtvc_mean"], atol=1e-5)
    assert one_pass.mutual_information.isnan().all() and one_pass.inclusion.isnan().all()
    predictor.prediction = "mc"
    with pytest.raises(ConfigError, match="needs posterior draws"):
        predictor.predict("mixed", split="test", num_samples=0)


def test_vtvc_predict_writes_a_csv_for_an_image_folder(short_run, tmp_path):
    out, _ = short_run
    folder = tmp_path / "images"
    x, y = load_dataset("mixed").split("test")
    for i in range(5):  # the suite's own images as PNG files, in nested folders
        path = folder / f"class{int(y[i])}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = ((x[i].permute(1, 2, 0).numpy() + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
    csv_path = tmp_path / "predictions.csv"
    proc = run_inline(str(out), "--data", f"imagefolder:{folder}", "--out", str(csv_path), script="predict.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 5 and rows[0]["image"].endswith(".png")
    assert {"prediction", "probability", "entropy", "mutual_information", "p[seven]", "lam[digits-rotated]",
            "inclusion[digits-rotated]"} <= set(rows[0])
    assert all(abs(sum(float(v) for k, v in r.items() if k.startswith("p[")) - 1) < 1e-4 for r in rows)
    # the files decode to the images the run saw, up to 8-bit rounding
    images, names = load_image_files(folder, Predictor.from_run(out).transform)
    order = [int(n.split("/")[-1].removesuffix(".png")) for n in names]
    assert (images - x[order]).abs().max() <= 2 / 255 + 1e-6
    again = run_inline(str(out), "--data", f"imagefolder:{folder}", "--out", str(csv_path), script="predict.py")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    empty = run_inline(str(out), "--data", f"imagefolder:{tmp_path / 'nothing'}", "--out", str(tmp_path / "x.csv"),
                       script="predict.py")
    assert empty.returncode == 2 and "not a folder" in empty.stderr
