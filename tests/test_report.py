"""Diagnostics: InferenceData, ArviZ on it, report.py and the notebook."""

import json

import numpy as np

from vtvc_pyro.diagnostics import az
from vtvc_pyro.report import layer_inclusion, summarize

from .conftest import ROOT, run_inline

FIGURES = ("elbo", "inclusion_heatmap", "lambda_forest", "sample_profiles", "reliability", "accuracy_coverage",
           "uncertainty_vs_error", "class_frequencies")


def test_netcdf_round_trip_and_arviz_tools(short_run, tmp_path):
    out, _ = short_run
    idata = az.from_netcdf(out / "posterior.nc")
    idata.to_netcdf(str(tmp_path / "copy.nc"))
    back = az.from_netcdf(tmp_path / "copy.nc")
    assert back.posterior["lam"].equals(idata.posterior["lam"])
    assert list(back.constant_data["task_name"].values) == list(idata.posterior["task"].values)
    axes = az.plot_forest(idata, var_names=["lam"], coords={"image": [0], "block": ["proj"]}, combined=True)
    assert len(axes) == 1
    table, tasks, layers = layer_inclusion(idata)
    assert table.shape == (11, 4) and layers == ["embed", "layer0", "layer1", "head"]
    assert ((table >= 0) & (table <= 1)).all()


def test_summaries_are_consistent(short_run):
    out, _ = short_run
    idata = az.from_netcdf(out / "posterior.nc")
    summary = summarize(idata)
    assert len(summary["per_block"]) == 11 * 32 and len(summary["per_task"]) == 11
    row = summary["per_block"][0]
    assert row["sample_mean_lam_hdi"][0] <= row["sample_mean_lam_hdi"][1]
    # the MC error of the image-averaged λ: sd over the (independent) draws / sqrt(draws), from the file's own draws
    lam = idata.posterior["lam"]
    means = lam.values.mean(lam.dims.index("image")).reshape(-1, lam.sizes["task"], lam.sizes["block"])
    sd = means.std(0)
    mcse = np.array([r["lam_mcse"] for r in summary["per_block"]]).reshape(sd.shape)
    assert np.isfinite(mcse).all() and np.allclose(mcse, sd / np.sqrt(len(means)), rtol=1e-5, atol=1e-9)
    assert (mcse[sd > 0] < sd[sd > 0]).all() and (mcse > 0).any()
    assert all(x >= -1e-9 for x in summary["per_sample"]["mutual_information"])
    assert 0 <= summary["kept_fraction"] <= 1
    lpd = summary["heldout_log_predictive_density"]
    assert lpd["n"] == idata.posterior.sizes["image"] and lpd["elpd"] < 0 and lpd["se"] > 0


def test_report_script_rebuilds_figures(short_run):
    out, _ = short_run
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    refused = run_inline(str(out), script="report.py")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr  # summary.json is there
    proc = run_inline(str(out), "--overwrite", script="report.py")
    assert proc.returncode == 0, proc.stderr
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000, name
    assert json.loads((out / "summary.json").read_text())["target"] == "mixed"


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = run_inline(str(tmp_path), script="report.py")
    assert proc.returncode == 2 and "holds no run" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_notebook_executes_top_to_bottom_and_draws(short_run):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "posterior_analysis.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook stripped"
    parameters = nb.cells[1]
    assert parameters.source.startswith("# Parameters")
    parameters.source = f"RUN_DIRS = [{str(short_run[0])!r}]"  # reuse the session's run instead of fitting one
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert not [o for out in outputs.values() for o in out if o.output_type == "error"]
    warned = [o["text"] for out in outputs.values() for o in out if o.get("name") == "stderr" and "Warning" in o["text"]]
    assert not warned, warned[:3]  # no warning floods (ArviZ's over tens of thousands of summary rows)
    assert any("target: mixed" in o.get("text", "") for out in outputs.values() for o in out)
    # every cell that draws shows its figure (a backend switched by the library would leave them blank)
    drawing = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "plt.show()" in c.source]
    assert len(drawing) == 2  # cells, each with several figures
    for i in drawing:
        assert any("image/png" in o.get("data", {}) for o in outputs[i]), f"cell {i} drew no image"


def test_curves_command_tabulates_and_draws_few_shot_runs(short_run, tmp_path, capsys):
    from vtvc_pyro.cli import main
    from vtvc_pyro.tables import shot_curves

    run, _ = short_run
    for shots, seed in (("4", 0), ("4", 1), ("all", 0)):  # the same run standing in for three
        (tmp_path / "runs" / "mixed" / f"k{shots}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / "mixed" / f"k{shots}" / f"s{seed}").symlink_to(run)
    rows = shot_curves(tmp_path / "runs")
    assert [r["shots"] for r in rows if r["method"] == "vtvc"] == ["4", "all"]
    vtvc = next(r for r in rows if r["method"] == "vtvc")
    metrics = json.loads((run / "metrics.json").read_text())
    assert vtvc["seeds"] == 2 and vtvc["accuracy"] == 100 * metrics["methods"]["vtvc"]["accuracy"]
    assert vtvc["accuracy_sd"] == 0.0 and "accuracy_vs_vtvc" not in vtvc
    atlas = next(r for r in rows if r["method"] == "atlas")
    paired = metrics["methods"]["atlas"]["paired_vs_vtvc"]["accuracy"]
    assert atlas["accuracy_vs_vtvc"] == 100 * paired["difference"]
    assert atlas["accuracy_vs_vtvc_above"] == 2 * (paired["interval95"][0] > 0)
    assert main(["curves", str(tmp_path / "runs"), "--out", str(tmp_path / "curves")]) == 0
    assert "| mixed | 4 | vtvc | 2 |" in (tmp_path / "curves.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 5000
    assert main(["curves", str(tmp_path / "runs"), "--out", str(tmp_path / "curves")]) == 2  # never replaced silently
    capsys.readouterr()
