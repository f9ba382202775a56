"""Shared fixtures. The embedded bank is built once per session (about 3 minutes) or reused."""

import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# the session's bank sits in the checkout (the library's default is the per-user cache folder):
# every test, subprocess and notebook kernel uses this one
os.environ.setdefault("VTVC_BANK", str(Path(__file__).resolve().parents[1] / "banks" / "embedded"))


import pytest  # noqa: E402
import torch  # noqa: E402

from vtvc_pyro import backbone  # noqa: E402
from vtvc_pyro.bank.store import build_embedded_bank, load_bank  # noqa: E402
from vtvc_pyro.bank.task_vectors import TaskVector, TaskVectorBank  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BANK = Path(os.environ.get("VTVC_BANK", ROOT / "banks" / "embedded"))


@pytest.fixture(scope="session")
def bank_path() -> Path:
    """The real embedded bank (pretrained tiny CLIP + fine-tuned source tasks)."""
    return build_embedded_bank(BANK, progress=False)


@pytest.fixture(scope="session")
def loaded_bank(bank_path):
    return load_bank(bank_path)


def random_bank(num_tasks: int = 3, scale: float = 0.05, seed: int = 0, arch: str = backbone.TINY_MODEL):
    """A random-init open_clip model and ``num_tasks`` random task vectors of it."""
    torch.manual_seed(seed)
    model = backbone.create_clip(arch)
    base = backbone.image_tower_params(model)
    vectors = [
        TaskVector.from_state_dicts({k: v + scale * torch.randn_like(v) for k, v in base.items()}, base, arch, f"t{t}")
        for t in range(num_tasks)
    ]
    return model, base, vectors, TaskVectorBank.stack(vectors, base)


@contextlib.contextmanager
def root_logger_kept():
    """Undo what a command run in this process did to the root logger (``main()`` calls ``logging.basicConfig``,
    whose handler would keep writing to this test's captured stderr)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(autouse=True)
def _root_logger_kept():
    with root_logger_kept():
        yield


def vtvc_names(metrics: dict) -> set[str]:
    """VTVC's two predictions in a run's ``metrics.json``: ``vtvc`` (chosen on val) and the other one."""
    return {"vtvc", {"mean": "vtvc_mc", "mc": "vtvc_mean"}[metrics["prediction"]["vtvc"]]}


def run_inline(*args, script="svi_fit.py"):
    """Run ``scripts/<script>`` in this interpreter, as ``python scripts/<script> ARGS`` would (same
    argument parsing, errors and exit status) without a new interpreter's ~6 s of imports.

    Returns a CompletedProcess with the exit status and the captured stdout and stderr.
    """
    out, err = io.StringIO(), io.StringIO()
    saved_argv, code = sys.argv, 0
    sys.argv = [script, *args]
    try:
        with root_logger_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run_script(*args, script="svi_fit.py", env_extra=None):
    """Run ``scripts/<script>`` in a fresh interpreter, offline; returns the CompletedProcess. Only for what needs
    a real process (its exit status, signals, environment read at import); everything else uses :func:`run_inline`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="session")
def short_run(bank_path, tmp_path_factory):
    """A 30-step ``svi_fit.py`` run (in this process) on the real bank (target mixed): ``(run folder, stdout)``."""
    out = tmp_path_factory.mktemp("run") / "mixed"
    proc = run_inline("--bank", str(bank_path), "--svi.steps", "30", "--svi.eval_every", "15", "--eval_samples", "4",
                      "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


# ---------------------------------------------------------------- real-scale path on stand-ins (issue 8)
REAL_ARCH = backbone.TINY_MODEL
REAL_TASKS = ["DTD", "EuroSAT", "MNIST", "SVHN"]


@pytest.fixture(scope="session")
def real_world(tmp_path_factory):
    """Stand-in benchmark folders, a base CLIP saved as an open_clip state dict, and fine-tuned
    checkpoints as task_vectors publishes them (pickled ImageEncoder modules)."""
    from vtvc_pyro.io import save_safetensors

    from . import standins

    root = tmp_path_factory.mktemp("real")
    standins.write_all(root / "data")
    torch.manual_seed(0)
    save_safetensors(backbone.create_clip(REAL_ARCH).state_dict(), root / "base.safetensors")
    standins.write_published_checkpoints(root / "ckpt", REAL_ARCH, root / "base.safetensors", REAL_TASKS)
    return root


@pytest.fixture(scope="session")
def real_bank(real_world):
    """Those checkpoints imported by scripts/import_checkpoints.py (bf16 storage)."""
    out = real_world / "bank"
    proc = run_inline("--arch", REAL_ARCH, "--base", str(real_world / "base.safetensors"), "--checkpoints",
                      str(real_world / "ckpt"), "--trust_pickle", "--dtype", "bfloat16", "--out", str(out), "--quiet",
                      script="import_checkpoints.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MNIST" in proc.stdout and "32 blocks" in proc.stdout
    return out
