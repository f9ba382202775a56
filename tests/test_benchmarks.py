"""The 8 benchmarks read from stand-in folders in torchvision's exact layouts; the task-addition cost benchmark."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from vtvc_pyro import backbone
from vtvc_pyro.bench.addition import TASK_CLASSES
from vtvc_pyro.cli import main as cli_main
from vtvc_pyro.data import benchmarks
from vtvc_pyro.data.benchmarks import (
    BENCHMARKS,
    StreamedImages,
    clip_preprocess,
    load_benchmark,
    val_split,
)
from vtvc_pyro.data.specs import load_dataset
from vtvc_pyro.errors import DataError

from . import standins

# (train incl. val, test, classes) of each stand-in
SIZES = {"Cars": (12, 6, 3), "DTD": (12, 12, 3), "EuroSAT": (27, 3, 10), "GTSRB": (43, 12, 43), "MNIST": (30, 10, 10),
         "RESISC45": (12, 6, 3), "SUN397": (12, 6, 3), "SVHN": (30, 10, 10)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return standins.write_all(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def preprocess():
    return clip_preprocess(backbone.create_clip(backbone.TINY_MODEL))


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_each_benchmark_loads_from_its_layout(name, root, preprocess):
    task = load_benchmark(name, root, preprocess)
    n_train, n_test, n_classes = SIZES[name]
    n_val = int(0.1 * n_train)
    assert {k: len(v[1]) for k, v in task.splits.items()} == {"train": n_train - n_val, "val": n_val, "test": n_test}
    assert len(task.class_names) == n_classes and task.templates == BENCHMARKS[name].templates
    images, labels = task.split("test")
    x = images[torch.arange(3)]
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    # labels read from the index agree with the decoded samples
    assert [images.dataset[i][1] for i in range(3)] == labels[:3].tolist()
    assert torch.equal(images[1:2][0], images.dataset[1][0])


def test_labels_and_class_names_follow_the_published_conventions(root, preprocess):
    svhn = load_benchmark("SVHN", root, preprocess)
    # SVHN stores digit 0 as label 10; torchvision maps it back, stand-in test labels are 0..9 in order
    assert svhn.split("test")[1].tolist() == list(range(10)) and svhn.class_names == tuple("0123456789")
    gtsrb = load_benchmark("GTSRB", root, preprocess)
    assert gtsrb.split("test")[1].tolist() == [(5 * i) % 43 for i in range(12)]
    assert gtsrb.class_names[14] == "stop"
    assert load_benchmark("EuroSAT", root, preprocess).class_names[2] == "brushland or shrubland"
    assert load_benchmark("SUN397", root, preprocess).class_names == ("abbey", "bakery shop", "campus")
    assert load_benchmark("RESISC45", root, preprocess).class_names[1] == "baseball diamond"
    assert load_benchmark("Cars", root, preprocess).class_names[0] == "Maker Model0 Sedan 2010"
    assert len(BENCHMARKS["RESISC45"].templates) == 18 and BENCHMARKS["RESISC45"].templates[7] == "aerial imagery of a {}."
    assert BENCHMARKS["DTD"].templates[3] == "a photo of a {} object." and len(BENCHMARKS["Cars"].templates) == 8
    assert BENCHMARKS["MNIST"].templates == ('a photo of the number: "{}".',)


def test_val_protocol_matches_task_vectors():
    """10 %, at most 5,000, random_split seed 0: task_vectors asserts MNISTVal's first train index is 36044."""
    train, val = val_split(TensorDataset(torch.arange(60_000)))
    assert len(val) == 5000 and len(train) == 55_000 and train.indices[0] == 36044
    train, val = val_split(TensorDataset(torch.arange(1_880)))  # DTD's train split
    assert len(val) == 188 and set(train.indices).isdisjoint(val.indices)


def test_name_val_variant_holds_out_validation_as_test(root, preprocess):
    full = load_benchmark("MNIST", root, preprocess)
    val_task = load_benchmark("MNISTVal", root, preprocess)
    assert val_task.name == "MNISTVal" and set(val_task.splits) == {"train", "test"}
    assert torch.equal(val_task.split("test")[1], full.split("val")[1])
    assert torch.equal(val_task.split("train")[1], full.split("train")[1])


def test_spec_string_reaches_the_benchmarks(root, preprocess):
    task = load_dataset(f"benchmark:DTD@{root}", preprocess=preprocess)
    assert task.name == "DTD" and len(task.split("train")[1]) == 11


def test_missing_data_names_the_layout_and_downloads_nothing(tmp_path, preprocess):
    with pytest.raises(DataError, match=r"MNIST/raw/\{train,t10k\}.*vtvc data check --root ROOT --download"):
        load_benchmark("MNIST", tmp_path, preprocess)
    with pytest.raises(DataError, match="does not exist: create it"):
        load_benchmark("GTSRB", tmp_path / "absent", preprocess)
    with pytest.raises(DataError, match="cannot be downloaded automatically"):
        load_benchmark("Cars", tmp_path, preprocess, download=True)
    with pytest.raises(DataError, match="unknown benchmark 'ImageNet'"):
        load_benchmark("ImageNet", tmp_path, preprocess)
    assert list(tmp_path.iterdir()) == []  # nothing was fetched or created


def test_incomplete_layout_is_a_data_error(tmp_path, preprocess):
    standins.write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="GTSRB not found or incomplete.*GT-final_test.csv"):
        load_benchmark("GTSRB", tmp_path, preprocess)


def test_streamed_images_behave_like_a_tensor_for_the_fit(root, preprocess):
    images, _ = load_benchmark("EuroSAT", root, preprocess).split("train")
    assert isinstance(images, StreamedImages) and len(images) == 25 and images.shape == (25, 3, 16, 16)
    idx = torch.tensor([4, 0, 4])
    batch = images[idx]
    assert torch.equal(batch[0], batch[2]) and torch.equal(batch[1], images.dataset[0][0])
    assert images.to("cpu")[[1, 2]].shape == (2, 3, 16, 16)
    streamed = torch.cat([x for x, _ in images.loader(batch_size=10)])
    assert torch.equal(streamed, images[:])


def test_default_root_comes_from_the_environment(root, preprocess, monkeypatch):
    monkeypatch.setenv(benchmarks.DATA_ROOT_ENV, str(root))
    assert len(load_dataset("benchmark:svhn", preprocess=preprocess).class_names) == 10


def test_addition_benchmark_rows_on_the_tiny_model(tmp_path, capsys):
    """Every (bank, step) row with its fields, on the stacked 8-task heads; times positive, never compared."""
    out = tmp_path / "addition.json"
    assert cli_main(["bench", "addition", "--models", "[tiny]", "--batch", "[8]", "--components", "[1,2]",
                     "--repeats", "1", "--warmup", "0", "--markdown", "true", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    bases, rows = result["rows"][:2], result["rows"][2:]
    # the two base passes every step is read against: open_clip's module and the engine's own forward
    assert [(r["bank"], r["step"]) for r in bases] == [("-", "base"), ("-", "engine base")]
    assert bases[0]["ratio_to_base"] == 1.0 and bases[1]["ratio_to_engine_base"] == 1.0
    assert [(r["bank"], r["step"]) for r in rows] == [(b, s) for b in ("dense", "lowrank")
                                                      for s in ("atlas", "vtvc K=1", "vtvc K=2")]
    fields = {"model", "layers", "tasks", "classes", "batch", "bank", "rank", "dtype", "step", "components", "step_s",
              "ratio_to_atlas", "ratio_to_base", "ratio_to_engine_base", "peak_mib", "task_vectors_mib",
              "learned_params"}
    for r in rows:
        assert r["ratio_to_engine_base"] == pytest.approx(r["step_s"] / bases[1]["step_s"], rel=0.05)
        assert fields <= set(r)
        assert r["model"] == "tiny" and r["tasks"] == 8 and r["batch"] == 8
        assert r["classes"] == sum(TASK_CLASSES.values()) == 758
        assert r["step_s"] > 0 and r["ratio_to_atlas"] > 0 and r["learned_params"] > 0
        assert (r["rank"] == 16) == (r["bank"] == "lowrank")
        assert r["components"] == (None if r["step"] == "atlas" else int(r["step"][-1]))
        if r["step"] == "atlas":
            assert r["ratio_to_atlas"] == 1.0
    low, dense = rows[3], rows[0]
    assert low["task_vectors_mib"] < dense["task_vectors_mib"]
    assert {"command", "device", "torch", "repeats", "warmup"} <= set(result["meta"])
    assert "| tiny | 2 | 8 | 758 | 8 | low-rank r = 16 | vtvc K=2 |" in printed
    assert cli_main(["bench", "addition", "--from_json", str(out)]) == 0
    assert capsys.readouterr().out.count("| tiny |") == len(rows) + 2


def test_gradient_benchmark_measures_both_gatings_on_a_fitted_run(short_run, tmp_path, capsys):
    run, _ = short_run
    out = tmp_path / "gradients.json"
    assert cli_main(["bench", "gradients", str(run), "--batch", "8", "--seeds", "3", "--device", "cpu",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["gating"]: r for r in result["rows"]}
    assert set(rows) == {"drop", "expect"} and result["batch"] == 8 and result["fitted_with"] == "drop"
    assert rows["drop"]["variance_ratio"] == 1.0 and rows["expect"]["seeds"] == 3
    assert all(r["total_variance"] > 0 and r["loss_sd"] >= 0 for r in rows.values())
    assert rows["expect"]["variance_ratio"] == pytest.approx(rows["expect"]["total_variance"] / rows["drop"]["total_variance"])
    assert "| expect |" in capsys.readouterr().out
    assert cli_main(["bench", "gradients", str(run), "--gatings", "[sometimes]"]) == 2


def test_composition_benchmark_times_the_one_pass_prediction(tmp_path):
    out = tmp_path / "composition.json"
    assert cli_main(["bench", "composition", "--models", "[tiny]", "--tasks", "[2]", "--batch", "[4]",
                     "--strategies", "[base,predict]", "--tiny_repeats", "1", "--quiet", "true", "--out", str(out)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    predict = rows["predict"]
    assert predict["fwd_s"] > 0 and predict["fwd_ratio"] == pytest.approx(predict["fwd_s"] / rows["base"]["fwd_s"], rel=0.01)
    assert predict["rank"] == 16 and predict["task_vectors_mib"] > 0  # it composes the low-rank bank
