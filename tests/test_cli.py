"""The `vtvc` command: layout contract, import hygiene, help, dry run, config replay, one meaning per flag."""

import json
import subprocess
import sys

import pytest

from vtvc_pyro.cli import COMMANDS, build_parser, main
from vtvc_pyro.config import FitConfig

from .conftest import ROOT, run_inline


def test_layers_import_only_downward():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


IMPORT_EVERYTHING = """
import importlib, logging, pkgutil, sys, warnings
# third-party packages first: what they do on import is theirs; the snapshot isolates ours
for name in ("torch", "torchvision", "pyro", "open_clip", "arviz", "xarray", "matplotlib", "matplotlib.pyplot",
             "safetensors.torch", "tqdm.auto", "sklearn.datasets", "skimage.data", "jsonargparse"):
    importlib.import_module(name)
import matplotlib
def state():
    return (list(warnings.filters), logging.root.manager.disable, logging.root.level, list(logging.root.filters),
            list(logging.root.handlers), matplotlib.get_backend(), dict(matplotlib.rcParams))
before = state()
import vtvc_pyro
for info in pkgutil.walk_packages(vtvc_pyro.__path__, "vtvc_pyro."):
    if info.name != "vtvc_pyro.__main__":
        importlib.import_module(info.name)
print([i for i, (a, b) in enumerate(zip(before, state())) if a != b])
"""


def test_importing_every_module_changes_no_global_state():
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "MPLBACKEND": "svg"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]"]  # indices of the pieces of state that changed


def test_help_needs_no_heavy_import():
    code = ("import sys\nfrom vtvc_pyro.cli import main\ntry:\n    main(['fit', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'pyro', 'open_clip', 'arviz', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--svi.kl_weight" in proc.stdout and "default: 0.01" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "vtvc_pyro", "bank", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "truncate" in proc.stdout


def _leaves(table, path=()):
    for name, entry in table.items():
        yield from (_leaves(entry, (*path, name)) if isinstance(entry, dict) else [(*path, name)])


@pytest.mark.parametrize("path", list(_leaves(COMMANDS)), ids=" ".join)
def test_every_command_answers_help(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0 and "--config" in capsys.readouterr().out


def test_every_fit_setting_has_a_flag():
    fit = build_parser().parse_args(["fit"]).fit
    from dataclasses import fields

    from vtvc_pyro.config import SVIConfig

    assert {f.name for f in fields(FitConfig)} <= set(fit.keys()) | {"svi"}
    assert {f"svi.{f.name}" for f in fields(SVIConfig)} <= set(fit.keys())


def test_bad_flags_are_one_line(capsys):
    assert main(["fit", "--svi.steps", "many"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "svi.steps" in err


def test_dry_run_prints_the_plan_and_writes_nothing(bank_path, tmp_path):
    out = tmp_path / "never"
    bank_files = sorted((p, p.stat().st_mtime_ns) for p in bank_path.rglob("*"))
    proc = run_inline("--bank", str(bank_path), "--target", "imagefolder:" + str(ROOT / "nonexistent"), "--dry_run")
    assert proc.returncode == 2  # a bad target fails in the dry run as in a fit
    proc = run_inline("--bank", str(bank_path), "--target", "rot-noise", "--dry_run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["splits"] == {"train": 200, "val": 100, "test": 397} and plan["device"] == "cpu"
    assert len(plan["tasks"]) == 11 and "atlas" in plan["baselines"] and plan["composition"]
    assert not out.exists()
    assert sorted((p, p.stat().st_mtime_ns) for p in bank_path.rglob("*")) == bank_files  # no feature cache written


def test_replaying_a_runs_config_reproduces_its_metrics(short_run, tmp_path):
    run, _ = short_run
    replay = tmp_path / "replay"
    proc = run_inline("--config", str(run / "config.json"), "--out", str(replay), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (replay / "metrics.json").read_text() == (run / "metrics.json").read_text()
    recorded = json.loads((run / "config.json").read_text())["run"]
    assert recorded["argv"] and recorded["device"] == "cpu" and "torch_cuda" in recorded["environment"]


def test_writers_refuse_to_overwrite(short_run, tmp_path):
    run, _ = short_run
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    proc = run_inline(str(run), "--out", str(target), script="export_composed.py")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert target.read_bytes() == b"keep me"


def test_banks_live_in_the_per_user_cache_unless_told_otherwise(tmp_path):
    """Default: platformdirs' user cache; $VTVC_HOME moves it; $VTVC_BANK names the bank itself."""
    import os
    import subprocess
    import sys

    import platformdirs

    def default_bank(**env) -> str:
        clean = {k: v for k, v in os.environ.items() if k not in ("VTVC_HOME", "VTVC_BANK")}
        code = "from vtvc_pyro.config import DEFAULT_BANK; print(DEFAULT_BANK)"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**clean, **env}).stdout.strip()

    assert default_bank() == os.path.join(platformdirs.user_cache_dir("vtvc_pyro", appauthor=False), "banks", "embedded")
    assert default_bank(VTVC_HOME=str(tmp_path)) == str(tmp_path / "banks" / "embedded")
    assert default_bank(VTVC_HOME=str(tmp_path), VTVC_BANK="b") == "b"
