"""Interrupted runs (SIGKILL, SIGTERM), exact resumption, numerical faults."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from vtvc_pyro.bayes.svi import fit_svi
from vtvc_pyro.config import SVIConfig
from vtvc_pyro.errors import NumericalError
from vtvc_pyro.data.split import Split

from .conftest import ROOT, run_inline
from .test_vtvc import tiny_problem

# a few baselines, not all: resuming re-runs them, and the router alone would be six more fits
ARGS = ["--baselines", "[zeroshot,task_arithmetic,atlas]", "--svi.steps", "120", "--svi.eval_every", "20",
        "--svi.checkpoint_every", "20", "--eval_samples", "4", "--quiet"]


def checkpoint_step(path):
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:  # noqa: BLE001 - not there yet, or being renamed into place
        return 0


def start_and_wait(bank_path, out, min_step=40):
    """Start svi_fit in the background and wait until a checkpoint of step >= min_step exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "svi_fit.py"), "--bank", str(bank_path),
                             "--out", str(out), *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while checkpoint_step(out / "checkpoint.safetensors") < min_step:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(bank_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_inline("--bank", str(bank_path), "--out", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "metrics.json").read_text())


def test_sigkill_then_resume_gives_the_same_metrics(bank_path, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start_and_wait(bank_path, out)
    proc.kill()
    proc.wait()
    killed_at = checkpoint_step(out / "checkpoint.safetensors")
    assert 40 <= killed_at < 120 and not (out / "metrics.json").exists()
    resumed = run_inline("--bank", str(bank_path), "--out", str(out), "--resume", *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == uninterrupted  # the whole file: same seed and device give the same metrics.json


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(bank_path, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait(bank_path, out, min_step=20)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143  # 128 + SIGTERM: a scheduler requeues it, unlike bad input (2)
    assert "interrupted: SIGTERM at SVI step" in stderr and "--resume" in stderr and stderr.strip().count("\n") == 0
    assert checkpoint_step(out / "checkpoint.safetensors") >= 20


def test_resume_refuses_changed_settings_or_missing_checkpoint(bank_path, tmp_path, uninterrupted):
    proc = run_inline("--bank", str(bank_path), "--out", str(tmp_path / "none"), "--resume", *ARGS)
    assert proc.returncode == 2 and "holds no run to resume" in proc.stderr
    out = tmp_path / "run"
    first = start_and_wait(bank_path, out, min_step=20)
    first.kill()
    first.wait()
    proc = run_inline("--bank", str(bank_path), "--out", str(out), "--resume", *ARGS[:-1], "--svi.lr", "0.1", "--quiet")
    assert proc.returncode == 2 and "other settings (svi)" in proc.stderr


# a skipped step still advances the schedule (it stays aligned with the step count); torch warns about that
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_nan_stops_the_fit_naming_the_step():
    model, guide, x, f, y = tiny_problem()
    with torch.no_grad():
        guide.heads["slab_loc"][2].bias.fill_(float("nan"))
    with pytest.raises(NumericalError, match="SVI step 1 .*no checkpoint had been written yet"):  # true advice
        fit_svi(model, guide, Split(x, f, y), Split(x, f, y), SVIConfig(steps=3, eval_every=1), progress=False)
    # skipping them is allowed, but a fit whose steps were mostly skipped is not a fit
    with pytest.raises(NumericalError, match="3 of 3 SVI steps were skipped as non-finite"):
        fit_svi(model, guide, Split(x, f, y), Split(x, f, y), SVIConfig(steps=3, eval_every=1, skip_nonfinite=True),
                progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("train_temperature", -0.1, "train_temperature must be > 0"),
    ("eval_temperature", 0.0, "eval_temperature must be > 0"),
    ("lr", 0.0, "lr must be > 0"),
    ("num_particles", 0, "num_particles must be > 0"),
    ("elbo", "renyi", "unknown ELBO"),
    ("kl_reduction", "max", "kl_reduction must be"),
])
def test_invalid_svi_settings_are_refused(field, value, message):
    from vtvc_pyro.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SVIConfig(**{field: value}).validate()


def test_empty_data_root_is_refused(tmp_path):
    from vtvc_pyro.data import specs
    from vtvc_pyro.errors import DataError

    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        specs.load_dataset(f"imagefolder:{tmp_path}")
