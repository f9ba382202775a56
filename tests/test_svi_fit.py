"""End to end: ``scripts/svi_fit.py`` on the real embedded bank, and its command-line errors."""

import importlib.metadata
import json
import stat

import arviz as az
import numpy as np
import pytest

from vtvc_pyro.bayes.guide import GUIDES
from vtvc_pyro.bayes.priors import PRIORS
from vtvc_pyro.diagnostics import class_frequency_check, heldout_log_predictive_density
from vtvc_pyro.io import default_mode

from .conftest import run_inline, run_script, vtvc_names


def test_fit_writes_every_output(short_run):
    out, stdout = short_run
    for name in ("config.json", "metrics.json", "timing.json", "guide.safetensors", "checkpoint.safetensors",
                 "checkpoint-k4.safetensors", "posterior.nc", "predictions.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target"] == "mixed"
    assert {"vtvc", "zeroshot", "task_arithmetic", "atlas"} <= set(metrics["methods"])
    for values in metrics["methods"].values():
        assert {"accuracy", "nll", "ece", "brier", "interval95", "val", "temperature", "temperature_scaled"} <= set(values)
        assert 0 <= values["accuracy"] <= 1 and values["nll"] > 0
        for k in ("accuracy", "nll", "brier"):
            low, high = values["interval95"][k]
            assert low <= values[k] <= high
        assert values["temperature_scaled"]["accuracy"] == values["accuracy"]  # a temperature keeps the argmax
    # `vtvc` is whichever of the one-pass gated mean and the Monte Carlo predictive had the lower val NLL
    prediction, methods = metrics["prediction"], metrics["methods"]
    other = (vtvc_names(metrics) - {"vtvc"}).pop()
    assert methods["vtvc"]["val"]["nll"] == pytest.approx(min(prediction["val_nll"].values()), rel=1e-5)
    assert methods[other]["val"]["nll"] == pytest.approx(max(prediction["val_nll"].values()), rel=1e-5)
    svi = metrics["svi"]
    assert set(svi["val_nll_by_components"]) == {"1", "4"}  # both candidates were fitted; the lower val NLL won
    assert svi["val_nll_by_components"][str(svi["components"])] == min(svi["val_nll_by_components"].values())
    comp = metrics["composition"]
    assert 0 <= comp["mean_inclusion"] <= 1 and set(comp["inclusion_by_task"]) == set(metrics["tasks"])
    assert len(comp["selection"]["per_domain"]) == 3 and comp["selection"]["chance"][0] == pytest.approx(1 / 55)
    assert "mixed" not in metrics["tasks"] and len(metrics["tasks"]) == 11
    config = json.loads((out / "config.json").read_text())
    assert config["svi"]["steps"] == 30
    assert config["run"]["environment"]["packages"]["pyro-ppl"] == importlib.metadata.version("pyro-ppl")
    assert "vtvc" in stdout and "task_arithmetic" in stdout
    # readable by others as far as the umask allows (0644 under 022), not tempfile's private 0600
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(modes, default_mode())


def test_posterior_is_arviz_native(short_run, tmp_path):
    """The ArviZ calls users make work on a real run (extract, summary, hdi, plot_forest), and the
    held-out predictive diagnostics: log predictive density and the class-frequency check."""
    out, _ = short_run
    idata = az.from_netcdf(out / "posterior.nc")
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "predictions_constant_data",
            "sample_stats", "constant_data", "svi_trace"} <= set(idata.groups())
    lam = idata.posterior["lam"]
    assert lam.dims == ("chain", "draw", "image", "task", "block")
    assert lam.sizes["draw"] == 4 and lam.sizes["task"] == 11 and lam.sizes["block"] == 32
    assert "transformer.resblocks.0.mlp.c_fc.weight" in list(idata.posterior["block"].values)
    # the prior's own sites by name: the hierarchical model's global gate and slab, and the routes
    assert idata.posterior["slab"].dims[-2:] == ("task", "block") and idata.posterior["route"].dims[-2:] == ("image", "task")
    assert set(np.unique(idata.posterior["gate"].values)) <= {0.0, 1.0}
    # λ = route · gate · slab (one composition: K = 1 in a 30-step run unless K = 4 wins on val)
    if "component" not in idata.posterior:
        expected = idata.posterior["route"] * idata.posterior["gate"] * idata.posterior["slab"]
        assert np.allclose(expected.transpose(*lam.dims).values, lam.values, atol=1e-6)
    stacked = az.extract(idata, var_names=["lam"])
    assert stacked.sizes["sample"] == 4 and "image" in stacked.dims
    summary = az.summary(idata, var_names=["lam"], coords={"image": [0], "block": ["proj"]}, kind="stats")
    assert len(summary) == 11
    hdi = az.hdi(idata, var_names=["lam"], hdi_prob=0.9)
    assert hdi["lam"].sizes["hdi"] == 2
    assert len(az.plot_forest(idata, var_names=["lam"], coords={"image": [0], "block": ["proj"]}, combined=True)) == 1
    # posterior predictive: one label per draw; the log-likelihood of the true labels
    obs = idata.posterior_predictive["obs"]
    assert obs.dims == ("chain", "draw", "image") and int(obs.max()) < 10
    probs = idata.posterior_predictive["probs"].values
    labels = idata.observed_data["obs"].values
    log_lik = np.log(np.take_along_axis(probs, labels[None, None, :, None], -1)[..., 0])
    assert np.allclose(idata.log_likelihood["obs"].values, log_lik, atol=1e-5)
    # the held-out images' log predictive density, computed directly (PSIS-LOO is for fitted data)
    lpd = heldout_log_predictive_density(idata)
    mixture = probs[0].mean(0)[np.arange(len(labels)), labels]  # mean_s p(y_i | s)
    assert lpd["n"] == len(labels) and lpd["elpd"] == pytest.approx(float(np.log(mixture).sum()), rel=1e-5)
    assert lpd["se"] == pytest.approx(float(np.sqrt(len(labels)) * np.log(mixture).std(ddof=1)), rel=1e-4)
    # the categorical predictive check: observed class counts against the counts drawn per draw
    check = class_frequency_check(idata)
    assert check["observed"].values.tolist() == np.bincount(labels, minlength=10).tolist()
    per_draw = [np.bincount(row, minlength=10) for row in obs.values.reshape(-1, obs.sizes["image"]).astype(int)]
    assert np.allclose(check["predicted"].values, np.mean(per_draw, 0))
    assert ((check["low"] <= check["predicted"]) & (check["predicted"] <= check["high"])).all()
    assert idata.sample_stats["sum_log_likelihood"].dims == ("chain", "draw")
    assert idata.svi_trace["elbo"].sizes["step"] == 30
    assert idata.predictions_constant_data["image_index"].values.tolist() == list(range(lam.sizes["image"]))


def test_existing_out_is_refused_and_kept(short_run):
    out, _ = short_run
    before = (out / "metrics.json").read_bytes()
    proc = run_inline("--out", str(out), "--svi.steps", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--overwrite" in proc.stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prior", "nope"], "unknown prior"),
        (["--prior_args", "{pi: 2}"], "pi must lie in (0, 1)"),
        (["--svi.steps", "0"], "steps must be > 0"),
        (["--svi.batch_size", "0"], "batch_size must be > 0"),
        (["--prior", "gaussian", "--prior_args", "{slab_scale: -1}"], "slab_scale must be > 0"),
        (["--svi.kl_weight", "0"], "kl_weight must be > 0"),
        (["--target", "imagefolder:/nonexistent"], "needs train/<class>"),
        (["--target", "imagenet"], "unknown data set spec"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path, bank_path):
    proc = run_inline("--bank", str(bank_path), "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_bad_input_exits_2_from_a_real_process(tmp_path, bank_path):
    proc = run_script("--bank", str(bank_path), "--out", str(tmp_path / "x"), "--device", "cuda",
                      env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_list_priors():
    proc = run_inline("--list_priors")
    assert proc.returncode == 0 and "spike_slab" in proc.stdout and "gaussian" in proc.stdout


# every prior and guide of the registries, paired so each appears at least once (the default pair runs in short_run)
PAIRS = [("spike_slab_continuous", "global"), ("task_spike_slab", "amortized"), ("spike_slab_negative", "amortized_gated"),
         ("gaussian", "amortized"), ("laplace", "global"), ("horseshoe", "amortized_gated")]
FLAT = {"task_spike_slab", "spike_slab_negative"}  # these two fit the flat model; the others the hierarchical


def test_the_pairs_cover_both_registries():
    assert {p for p, _ in PAIRS} | {"spike_slab"} == set(PRIORS)
    assert {g for _, g in PAIRS} == set(GUIDES)


@pytest.mark.parametrize("prior, guide", PAIRS)
def test_every_prior_and_guide_fits_end_to_end(prior, guide, bank_path, tmp_path):
    out = tmp_path / prior
    model = "flat" if prior in FLAT else "hierarchical"
    proc = run_inline("--bank", str(bank_path), "--model", model, "--prior", prior, "--guide", guide, "--svi.steps", "5",
                      "--baselines=[]",
                      "--svi.eval_every", "5", "--eval_samples", "2", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    idata = az.from_netcdf(out / "posterior.nc")
    assert (idata.posterior.attrs["model"], idata.posterior.attrs["prior"], idata.posterior.attrs["guide"]) == (model, prior, guide)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == vtvc_names(metrics)  # --baselines= runs none
    lam = idata.posterior["lam"]
    assert bool(np.isfinite(lam).all())
    inclusion = idata.posterior["inclusion"]
    assert set(np.unique(inclusion.values)) <= {0.0, 1.0}
    if PRIORS[prior].gate_site is None:  # no gate site: only whole task vectors are routed off, never a block
        assert "gate" not in idata.posterior and bool((inclusion == inclusion.isel(block=0)).all())
    else:
        assert PRIORS[prior].gate_site in idata.posterior
    if prior == "spike_slab_negative":
        assert float(lam.max()) <= 0.0


def test_low_rank_bank_fits_end_to_end(bank_path, tmp_path):
    out = tmp_path / "r4"
    proc = run_inline("--bank", str(bank_path), "--low_rank", "4", "--svi.steps", "5", "--svi.eval_every", "5",
                      "--eval_samples", "2", "--baselines=[zeroshot,ties]", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"zeroshot", "ties"} | vtvc_names(metrics)
    assert json.loads((out / "config.json").read_text())["low_rank"] == 4
    bad = run_inline("--bank", str(bank_path), "--low_rank", "-1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "low_rank must be >= 0" in bad.stderr


def test_few_shot_fit_learns_from_k_images_per_class_and_pairs_every_method(bank_path, tmp_path):
    """--shots, the paired intervals, and one learning-rate grid searched alike by VTVC, its twin and aTLAS."""
    out = tmp_path / "shots"
    proc = run_inline("--bank", str(bank_path), "--target", "rot-noise", "--shots", "3", "--components", "[1]",
                      "--svi.steps", "4", "--svi.eval_every", "2", "--svi.batch_size", "16", "--eval_samples", "2",
                      "--lr_factors", "[0.5,2]", "--baselines=[zeroshot,atlas,router]", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    classes = 10
    assert metrics["splits"]["train"] == 3 * classes and metrics["num_test"] == metrics["splits"]["test"]
    assert 2 * classes <= metrics["splits"]["val"] < 50  # shrunk in proportion, at least 2 per class
    assert json.loads((out / "config.json").read_text())["shots"] == 3
    for name in ("zeroshot", "atlas", *vtvc_names(metrics) - {"vtvc"}):
        paired = metrics["methods"][name]["paired_vs_vtvc"]["accuracy"]
        expected = metrics["methods"][name]["accuracy"] - metrics["methods"]["vtvc"]["accuracy"]
        assert paired["difference"] == pytest.approx(expected, abs=1e-12)
        assert paired["interval95"][0] <= paired["difference"] <= paired["interval95"][1]
    assert "acc - vtvc, points, paired 95%" in proc.stdout
    budget = {"fits": 2, "steps": 4, "batch_size": 16}
    assert metrics["svi"]["budget"] == metrics["baselines"]["router"]["budget"] == budget
    assert metrics["baselines"]["atlas"]["budget"] == budget
    assert set(metrics["baselines"]["atlas"]["valnll_by_lr"]) == {"0.025", "0.1"}  # 5e-2 × the same factors
    assert set(metrics["svi"]["val_nll_by_setting"]) == {"K=1, lr×0.5", "K=1, lr×2"}
    assert metrics["svi"]["lr_factor"] in (0.5, 2)
    assert (out / "checkpoint.safetensors").is_file() and (out / "checkpoint-k1-lrx2.safetensors").is_file()
    bad = run_inline("--bank", str(bank_path), "--shots", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "shots must be a positive number" in bad.stderr
    bad = run_inline("--bank", str(bank_path), "--lr_factors", "[1,1]", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "lr_factors must be distinct positive numbers" in bad.stderr


def test_run_notes_say_what_was_chosen_and_warn_when_the_best_step_is_the_last():
    from vtvc_pyro.protocols.fit import LEGEND, run_notes

    metrics = {"svi": {"components": 4, "lr_factor": 2.0, "best_step": 600, "budget": {"fits": 6, "steps": 600}},
               "prediction": {"vtvc": "mean", "val_nll": {"mean": 0.8, "mc": 0.9}}}
    notes = run_notes(metrics)
    assert notes[0].startswith("VTVC chose K = 4, learning rates × 2 (6 fits") and "one pass" in notes[0]
    assert notes[1].startswith("warning: VTVC's best val score came at its last step (600)")
    metrics["svi"]["best_step"] = 400
    assert not any(n.startswith("warning") for n in run_notes(metrics))
    assert run_notes(metrics)[-1] == LEGEND and "TS: after temperature scaling" in LEGEND
