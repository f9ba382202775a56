"""Summaries and figures of a saved run, rebuilt from its files alone (no refit).

Reads ``posterior.nc``, ``predictions.safetensors`` and ``metrics.json`` of a run folder and
writes ``summary.json`` plus PNG figures under ``figures/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import (
    Figure,  # the object API: no pyplot state, no backend switch
)

from .compose.engine import block_groups
from .diagnostics import az, class_frequency_check, heldout_log_predictive_density, inclusion_summary
from .errors import ConfigError
from .evaluate import accuracy_coverage, mutual_information, predictive_entropy
from .io import atomic_write
from .run_folder import RunFolder

log = logging.getLogger(__name__)

BASELINE_ORDER = ("zeroshot", "task_arithmetic", "ties", "atlas", "adamerging", "router", "flat_twin", "vtvc_mc",
                  "vtvc_mean", "vtvc")  # plotted methods


def load_run(run_dir: str | Path):
    """``(idata, predictions, metrics)`` of a run folder; a clear error when a file is missing."""
    folder = RunFolder(run_dir)
    folder.require_complete()
    folder.require(RunFolder.POSTERIOR, RunFolder.PREDICTIONS, RunFolder.METRICS)
    try:
        idata = az.from_netcdf(folder.posterior)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{folder.posterior} is not a readable netCDF posterior ({type(err).__name__}: {err}): "
                          "rerun the fit with --overwrite") from None
    if "image" not in idata.posterior.dims:
        raise ConfigError(f"{folder.posterior} was written by an older vtvc_pyro (dim 'sample', no 'inclusion'): "
                          "refit the run with this version to report it")
    return idata, folder.read_predictions(), folder.read_metrics()


def layer_inclusion(idata) -> tuple[np.ndarray, list[str], list[str]]:
    """Posterior inclusion probability averaged into (task, layer): ``[T, L]``, task and layer labels."""
    gate = idata.posterior["inclusion"].mean(("chain", "draw", "image"))  # (task, block)
    blocks = [str(b) for b in gate["block"].values]
    if idata.posterior.attrs.get("granularity", "block") != "block":  # already layers, or one group
        return gate.values, [str(t) for t in gate["task"].values], blocks
    groups, labels = block_groups(blocks, "layer")
    values = gate.values
    table = np.stack([values[:, [i for i, g in enumerate(groups) if g == k]].mean(1) for k in range(len(labels))], 1)
    return table, [str(t) for t in gate["task"].values], labels


def summarize(idata, hdi_prob: float = 0.9) -> dict:
    """Per task, per (task, block) and per sample summaries (JSON-ready).

    ``lam_mean`` averages λ over draws and saved test samples; the HDI and the Monte Carlo error
    are those of the sample-averaged λ over draws. SVI draws are independent, so the MC error is
    sd / sqrt(draws); r_hat and ESS would be trivially ~1 and are not reported.
    """
    post = idata.posterior
    draws = post.sizes["draw"] * post.sizes["chain"]
    inc = inclusion_summary(idata)
    sample_mean = post["lam"].mean("image")  # λ averaged over the saved test images, per draw
    hdi = az.hdi(sample_mean, hdi_prob=hdi_prob)["lam"]  # (task, block, hdi)
    mcse = sample_mean.std(("chain", "draw")) / np.sqrt(draws)
    per_block = []
    for t in inc["task"].values:
        for b in inc["block"].values:
            per_block.append({
                "task": str(t), "block": str(b),
                "inclusion": float(inc["inclusion"].sel(task=t, block=b)),
                "lam_mean": float(inc["lam_mean"].sel(task=t, block=b)),
                "sample_mean_lam_hdi": [float(x) for x in hdi.sel(task=t, block=b).values],
                "lam_mcse": float(mcse.sel(task=t, block=b)),
            })
    per_task = {
        str(t): {
            "inclusion": float(inc["inclusion"].sel(task=t).mean()),
            "lam_mean": float(inc["lam_mean"].sel(task=t).mean()),
            "kept_fraction": float((post["inclusion"].sel(task=t) > 0).mean()),
        }
        for t in inc["task"].values
    }
    sample_probs = torch.tensor(idata.posterior_predictive["probs"].values[0])  # [S, N, C]
    probs = sample_probs.mean(0)
    labels = torch.tensor(idata.observed_data["obs"].values)
    per_sample = {
        "entropy": predictive_entropy(probs).tolist(),
        "mutual_information": mutual_information(sample_probs).tolist(),
        "correct": (probs.argmax(-1) == labels).tolist(),
    }
    check = class_frequency_check(idata)
    return {"draws": draws, "hdi_prob": hdi_prob, "per_task": per_task, "per_block": per_block,
            "per_sample": per_sample, "kept_fraction": float((post["inclusion"] > 0).mean()),
            "heldout_log_predictive_density": heldout_log_predictive_density(idata),
            "class_frequency_check": {"classes_outside_90": [str(c) for c in check["class"].values[check["outside"].values]],
                                      "num_classes": int(check.sizes["class"])}}


# ---------------------------------------------------------------- figures
def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` outside pyplot: nothing is registered globally, any backend stays as it is."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def legend_outside(ax, **kwargs) -> None:
    """The legend to the right of the axes, where it covers no data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", **kwargs)


def save_figure(fig: Figure, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, atomically."""
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_elbo(idata, path: Path) -> Path:
    elbo = idata.svi_trace["elbo"].values
    fig, ax = new_figure(figsize=(7.5, 3.8))
    ax.plot(np.arange(1, len(elbo) + 1), elbo, lw=0.6, alpha=0.4, label="per step")
    window = max(1, len(elbo) // 30)
    if len(elbo) >= window:
        smooth = np.convolve(elbo, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(elbo) + 1), smooth, lw=1.8, label=f"moving mean ({window} steps)")
    ax.set(xlabel="SVI step", ylabel="ELBO (nats)", title="ELBO trace of the chosen candidate\n"
           "(one mini-batch estimate per step, scaled to the data set)")
    legend_outside(ax)
    return save_figure(fig, path)


def plot_class_frequencies(idata, path: Path) -> Path:
    """The categorical predictive check: observed class counts of the saved test images against the
    counts the posterior predictive draws (mean and 90 % interval)."""
    check = class_frequency_check(idata)
    names = [str(c) for c in check["class"].values]
    x = np.arange(len(names))
    fig, ax = new_figure(figsize=(min(14.0, max(6.5, 0.45 * len(names) + 2)), 4.4))  # many classes: no wider
    predicted = check["predicted"].values
    err = np.stack([predicted - check["low"].values, check["high"].values - predicted])
    ax.bar(x, predicted, width=0.6, color="tab:blue", alpha=0.5, yerr=err, capsize=3,
           label="drawn from the predictive (mean, 90 % interval)")
    ax.plot(x, check["observed"].values, "o", color="black", label="observed")
    if len(names) <= 40:  # beyond that the names are unreadable: the bars keep the class order
        ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    else:
        ax.set_xlabel(f"class (index of {len(names)})")
    lpd = heldout_log_predictive_density(idata)
    ax.set(ylabel="images", title=f"Class frequencies of {lpd['n']} held-out test images\n"
                                  f"log predictive density {lpd['elpd']:.1f} ± {lpd['se']:.1f}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize="small")
    return save_figure(fig, path)


def plot_inclusion_heatmap(idata, path: Path) -> Path:
    table, tasks, layers = layer_inclusion(idata)
    fig, ax = new_figure(figsize=(1.2 + 0.9 * len(layers), 0.9 + 0.35 * len(tasks)))
    im = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(layers)):
            ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if table[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="P(gate = 1), mean over samples and blocks")
    ax.set_title("Posterior inclusion probability: task × layer")
    return save_figure(fig, path)


def plot_lambda_forest(idata, path: Path) -> Path:
    """Per task, λ averaged over blocks; every (draw, sample) is one value (spread = across samples)."""
    lam = idata.posterior["lam"].mean("block")  # (chain, draw, image, task)
    values = lam.stack(point=("chain", "draw", "image")).transpose("task", "point").values
    tasks = [str(t) for t in lam["task"].values]
    fig, ax = new_figure(figsize=(7.2, 0.9 + 0.4 * len(tasks)))
    lo, q25, med, q75, hi = np.percentile(values, [5, 25, 50, 75, 95], axis=1)
    y = np.arange(len(tasks))[::-1]
    ax.hlines(y, lo, hi, lw=1.2, color="C0", label="5–95 %")
    ax.hlines(y, q25, q75, lw=4, color="C0", label="25–75 %")
    ax.plot(med, y, "o", color="white", mec="C0", label="median")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_yticks(y, tasks)
    ax.set(xlabel="λ (mean over blocks) across test samples and posterior draws", title="Coefficients per task vector")
    legend_outside(ax)
    return save_figure(fig, path)


def plot_sample_profiles(idata, path: Path, num: int = 4) -> Path:
    """Posterior mean λ per task (mean over blocks) for a few test samples of different classes."""
    labels = idata.observed_data["obs"].values
    picks, seen = [], set()
    for i, y in enumerate(labels):
        if y not in seen:
            picks.append(i)
            seen.add(y)
        if len(picks) == num:
            break
    lam = idata.posterior["lam"].mean(("chain", "draw", "block"))  # (image, task)
    incl = idata.posterior["inclusion"].mean(("chain", "draw", "block"))
    tasks = [str(t) for t in lam["task"].values]
    classes = [str(c) for c in idata.constant_data["class_name"].values]
    fig, axes = new_figure(1, len(picks), figsize=(3 * len(picks), 0.8 + 0.3 * len(tasks)), sharey=True)
    for ax, i in zip(np.atleast_1d(axes), picks):
        ax.barh(range(len(tasks)), lam.isel(image=i).values, color="C1", label="mean λ")
        ax.plot(incl.isel(image=i).values, range(len(tasks)), "k.", label="P(included)")
        ax.axvline(0, color="grey", lw=0.8)
        index = int(idata.predictions_constant_data["image_index"].values[i])
        ax.set_title(f"test image {index} ({classes[labels[i]]})", fontsize=9)
    np.atleast_1d(axes)[0].set_yticks(range(len(tasks)), tasks)
    np.atleast_1d(axes)[0].invert_yaxis()
    legend_outside(np.atleast_1d(axes)[-1])
    fig.suptitle("Per-sample composition (mean over blocks)")
    return save_figure(fig, path)


def _methods(predictions: dict) -> list[str]:
    return [m for m in BASELINE_ORDER if m in predictions]


def plot_reliability(predictions: dict, path: Path, num_bins: int = 15) -> Path:
    labels = predictions["labels"]
    fig, ax = new_figure(figsize=(6.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    edges = np.linspace(0, 1, num_bins + 1)
    for name in _methods(predictions):
        conf, pred = predictions[name].max(-1)
        correct = (pred == labels).float().numpy()
        conf = conf.numpy()
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (conf > lo) & (conf <= hi)
            if sel.sum() >= 5:  # bins with fewer samples are noise
                xs.append(conf[sel].mean())
                ys.append(correct[sel].mean())
        ax.plot(xs, ys, "o-", ms=3, label=name)
    ax.set(xlabel="confidence (bins with ≥ 5 test samples)", ylabel="accuracy", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    legend_outside(ax)
    return save_figure(fig, path)


def plot_accuracy_coverage(predictions: dict, path: Path) -> Path:
    labels = predictions["labels"]
    fig, ax = new_figure(figsize=(7, 4))
    for name in _methods(predictions):
        cov, acc = accuracy_coverage(predictions[name], labels)
        ax.plot(cov.numpy(), acc.numpy(), label=name)
    ax.set(xlabel="coverage (fraction kept, lowest predictive entropy first)", ylabel="accuracy on kept samples",
           title="Selective prediction", xlim=(0, 1), ylim=(0, 1.02))
    legend_outside(ax)
    return save_figure(fig, path)


def plot_uncertainty_vs_error(summary: dict, path: Path) -> Path:
    ps = summary["per_sample"]
    correct = np.array(ps["correct"], dtype=bool)
    fig, axes = new_figure(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "entropy", "predictive entropy (total)"),
                           (axes[1], "mutual_information", "mutual information (epistemic)")):
        values = np.array(ps[key])
        bins = np.linspace(0, max(values.max(), 1e-6), 25)
        ax.hist(values[correct], bins=bins, alpha=0.6, density=True, label=f"correct ({correct.sum()})")
        ax.hist(values[~correct], bins=bins, alpha=0.6, density=True, label=f"wrong ({(~correct).sum()})")
        ax.set(xlabel=f"{title}, nats", ylabel="density")
        ax.legend(fontsize=8)
    fig.suptitle("VTVC uncertainty of correct vs wrong predictions (saved test samples)")
    return save_figure(fig, path)


def plot_selection(selection: dict, tasks: list[str], path: Path) -> Path:
    """Selection per domain: how often the image's top-k task vectors are its transforms' (left), and
    the mean importance Σ_g inclusion × |E λ| of each task vector per domain (right)."""
    fig, (left, right) = new_figure(1, 2, figsize=(13, 0.5 * len(selection["domains"]) + 3),
                                    gridspec_kw={"width_ratios": [1, 2]})
    y = np.arange(len(selection["domains"]))
    left.barh(y, [100 * v for v in selection["per_domain"]], color="tab:blue", label="VTVC")
    left.scatter([100 * c for c in selection["chance"]], y, color="k", marker="|", s=200, label="chance")
    left.set_yticks(y, selection["domains"], fontsize=8)
    left.invert_yaxis()
    left.set(xlabel="top-k task vectors = the domain's (%)", xlim=(0, 100),
             title=f"selection accuracy {100 * selection['overall']:.0f}%")
    left.legend(loc="lower right", fontsize=8, framealpha=0.9)
    image = right.imshow(np.asarray(selection["score_by_domain"]), aspect="auto", cmap="viridis")
    right.set_xticks(np.arange(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
    right.set_yticks(y, selection["domains"], fontsize=8)
    right.set_title("mean Σ_g inclusion × |E λ| per domain")
    fig.colorbar(image, ax=right)
    return save_figure(fig, path)


def plot_routing(routing: dict, path: Path) -> Path:
    """Task addition: the mean weight Σ_g inclusion × |E λ| of every task vector (columns) over the
    images of every task (rows), one panel per method; a good router is diagonal-dominant."""
    fig, axes = new_figure(1, len(routing), figsize=(6.5 * len(routing), 5.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], routing.items()):
        weight = np.asarray(r["weight"], dtype=float)
        image = ax.imshow(weight / np.nanmax(weight, axis=1, keepdims=True).clip(1e-12), vmin=0, vmax=1,
                          cmap="viridis", aspect="auto")
        ticks = np.arange(len(r["tasks"]))
        ax.set_xticks(ticks, r["tasks"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(ticks, [f"{t} ({100 * r['routing_accuracy_by_task'].get(t, np.nan):.0f}%)" for t in r["tasks"]],
                      fontsize=8)
        ax.set(xlabel="task vector", ylabel="image's task (routing accuracy)",
               title=f"{name}: routing accuracy {100 * r['routing_accuracy']:.0f}%")
        fig.colorbar(image, ax=ax, label="weight / the row's largest")
    return save_figure(fig, path)


def build_report(run_dir: str | Path) -> dict:
    """Rebuild ``summary.json`` and every figure of a run; returns the summary."""
    folder = RunFolder(run_dir)
    idata, predictions, metrics = load_run(folder.path)
    folder.figures.mkdir(exist_ok=True)
    summary = summarize(idata)
    summary["target"] = metrics["target"]
    summary["figures"] = []  # the same key order as before figures were listed here
    figures = [
        plot_elbo(idata, folder.figure("elbo")),
        plot_inclusion_heatmap(idata, folder.figure("inclusion_heatmap")),
        plot_lambda_forest(idata, folder.figure("lambda_forest")),
        plot_sample_profiles(idata, folder.figure("sample_profiles")),
        plot_reliability(predictions, folder.figure("reliability")),
        plot_accuracy_coverage(predictions, folder.figure("accuracy_coverage")),
        plot_uncertainty_vs_error(summary, folder.figure("uncertainty_vs_error")),
        plot_class_frequencies(idata, folder.figure("class_frequencies")),
    ]
    if metrics.get("routing"):
        summary["routing_accuracy"] = {name: r["routing_accuracy"] for name, r in metrics["routing"].items()}
        figures.append(plot_routing(metrics["routing"], folder.figure("routing")))
    selection = metrics.get("composition", {}).get("selection")
    if selection:
        figures.append(plot_selection(selection, metrics["tasks"], folder.figure("selection")))
    summary["figures"] = [str(p.relative_to(folder.path)) for p in figures]
    folder.write_summary(summary)
    return summary


def plot_shot_curves(rows: list[dict], path: Path) -> Path:
    """Test accuracy against learning images per class (transfer) or per task (addition), one panel
    per target, mean ± sd over seeds (rows of :func:`vtvc_pyro.tables.shot_curves`)."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}  # one per method, all panels
    fig, axes = new_figure(1, len(targets), figsize=(4.2 * len(targets) + 1.8, 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        mine = [r for r in rows if r["target"] == target]
        shots = list(dict.fromkeys(r["shots"] for r in mine))
        for method in dict.fromkeys(r["method"] for r in mine):
            points = [next((r for r in mine if r["shots"] == k and r["method"] == method), None) for k in shots]
            xs = [i for i, p in enumerate(points) if p]
            ax.errorbar(xs, [points[i]["accuracy"] for i in xs], yerr=[points[i]["accuracy_sd"] for i in xs],
                        marker="o", ms=3, capsize=2, label=method, color=colors[method])
        ax.set_xticks(range(len(shots)), shots)
        ax.set(xlabel="learning images per class (addition: per task)", ylabel="test accuracy %", title=target)
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0, fontsize="small")
    return save_figure(fig, path)
