"""Fault injection: interrupted and half-written runs, corrupt files, names that try to leave their
folder, I/O errors, signals outside SVI, concurrent writers, bad fits. Each case: the exit status,
one line that says what to do, and nothing already on disk lost."""

import errno
import json
import shutil
import signal
import threading

import pytest
from safetensors.torch import save_file

from vtvc_pyro.bank import store
from vtvc_pyro.bank.store import build_embedded_bank, load_bank
from vtvc_pyro.cli import main
from vtvc_pyro.config import BuildConfig
from vtvc_pyro.errors import EXIT_STATUS, BankError, ConfigError
from vtvc_pyro.io import write_json
from vtvc_pyro.protocols.fit import fit_warnings
from vtvc_pyro.run_folder import RunFolder

from .conftest import run_inline

TINY = ["--components", "[1]", "--svi.steps", "4", "--svi.eval_every", "2", "--eval_samples", "2",
        "--baselines=[zeroshot]", "--quiet"]


def one_line(stderr: str) -> bool:
    return stderr.count("\n") == 1


@pytest.fixture
def run_copy(short_run, tmp_path):
    """A copy of the session's finished run, to break."""
    return shutil.copytree(short_run[0], tmp_path / "run")


def readers(run, tmp_path):
    """Every command that reads a run folder, as ``(name, exit status, stderr)``."""
    return [
        ("table", run_inline(str(run), "--out", str(tmp_path / "table"), script="table.py")),
        ("report", run_inline(str(run), "--overwrite", script="report.py")),
        ("predict", run_inline(str(run), "--data", "mixed", "--out", str(tmp_path / "p.csv"), script="predict.py")),
        ("export", run_inline(str(run), "--out", str(tmp_path / "export"), script="export_composed.py")),
    ]


def test_every_reader_refuses_an_unfinished_run_and_says_how_to_finish_it(run_copy, tmp_path):
    (run_copy / "complete.json").unlink()  # killed after metrics.json, before the end
    for name, proc in readers(run_copy, tmp_path):
        assert proc.returncode == 2 and one_line(proc.stderr), (name, proc.stderr)
        assert "unfinished run" in proc.stderr and "--resume" in proc.stderr and "--overwrite" in proc.stderr, name
    # a folder written before the completion record existed is read as it is
    config = json.loads((run_copy / "config.json").read_text())
    del config["run"]["run_folder"]
    (run_copy / "config.json").write_text(json.dumps(config))
    assert run_inline(str(run_copy), "--out", str(tmp_path / "t2"), script="table.py").returncode == 0


def test_overwrite_removes_the_earlier_runs_outputs_before_writing(run_copy, tmp_path):
    """`vtvc fit --overwrite --seed 1` killed early must not leave seed 0's results looking like seed 1's."""
    (run_copy / "notes.txt").write_text("mine")
    settings, _ = RunFolder(run_copy).read_config()
    RunFolder(run_copy).prepare({**settings, "seed": 1}, overwrite=True)
    left = sorted(p.name for p in run_copy.rglob("*") if p.is_file() and p.name != RunFolder.LOCK)
    assert left == ["notes.txt"]  # the outputs are gone, the user's file stays
    proc = run_inline(str(run_copy), "--out", str(tmp_path / "table"), script="table.py")
    assert proc.returncode == 2 and "no run" in proc.stderr


def test_resume_finishes_a_run_interrupted_after_svi_and_removes_stale_temporary_files(bank_path, tmp_path):
    out = tmp_path / "run"
    first = run_inline("--bank", str(bank_path), "--out", str(out), *TINY)
    assert first.returncode == 0, first.stderr
    finished = json.loads((out / "metrics.json").read_text())
    for name in ("metrics.json", "predictions.safetensors", "posterior.nc", "timing.json", "complete.json"):
        (out / name).unlink()  # killed while writing the outputs
    (out / ".posterior.nc.abc123.tmp").write_bytes(b"half a file")
    again = run_inline("--bank", str(bank_path), "--out", str(out), *TINY)
    assert again.returncode == 2 and "pass --resume to finish it" in again.stderr and one_line(again.stderr)
    resumed = run_inline("--bank", str(bank_path), "--out", str(out), "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text()) == finished
    assert (out / "complete.json").is_file() and not list(out.glob(".*.tmp"))
    done = run_inline("--bank", str(bank_path), "--out", str(out), "--resume", *TINY)
    assert done.returncode == 2 and "is complete, nothing to resume" in done.stderr


def test_resume_finishes_a_run_interrupted_in_its_baselines(bank_path, tmp_path):
    out = tmp_path / "run"
    first = run_inline("--bank", str(bank_path), "--out", str(out), *TINY)
    assert first.returncode == 0, first.stderr
    for path in out.iterdir():  # killed before SVI began: only config.json was written
        if path.name != "config.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_inline("--bank", str(bank_path), "--out", str(out), "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert RunFolder(out).is_complete()


def test_corrupt_run_files_are_one_line(run_copy, tmp_path):
    guide = run_copy / "guide.safetensors"
    guide.write_bytes(guide.read_bytes()[:100])
    proc = run_inline(str(run_copy), "--data", "mixed", "--out", str(tmp_path / "p.csv"), script="predict.py")
    assert proc.returncode == 2 and one_line(proc.stderr) and "truncated or corrupt" in proc.stderr
    (run_copy / "posterior.nc").write_bytes(b"not netCDF at all")
    proc = run_inline(str(run_copy), "--overwrite", script="report.py")
    assert proc.returncode == 2 and one_line(proc.stderr) and "not a readable netCDF" in proc.stderr
    (run_copy / "metrics.json").write_text("{ half")
    proc = run_inline(str(run_copy), "--out", str(tmp_path / "table"), script="table.py")
    assert proc.returncode == 2 and one_line(proc.stderr) and "not valid JSON" in proc.stderr


def _imagefolder(root, classes, corrupt=False):
    from PIL import Image

    for split in ("train", "test"):
        for c, value in zip(classes, (40, 200)):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (value, value, value)).save(folder / f"{i}.png")
    if corrupt:
        (root / "train" / classes[0] / "broken.png").write_bytes(b"\x89PNG but not really")


def test_imagefolder_faults_are_one_line(bank_path, tmp_path):
    _imagefolder(tmp_path / "one", ["cat"])
    proc = run_inline("--bank", str(bank_path), "--target", f"imagefolder:{tmp_path / 'one'}", "--out",
                      str(tmp_path / "r1"), *TINY)
    assert proc.returncode == 2 and one_line(proc.stderr) and "needs at least two" in proc.stderr
    _imagefolder(tmp_path / "bad", ["cat", "dog"], corrupt=True)
    proc = run_inline("--bank", str(bank_path), "--target", f"imagefolder:{tmp_path / 'bad'}", "--out",
                      str(tmp_path / "r2"), *TINY)
    assert proc.returncode == 2 and one_line(proc.stderr) and "broken.png as an image" in proc.stderr


def test_task_names_cannot_leave_the_bank(bank_path, tmp_path):
    checkpoint = tmp_path / "ft.safetensors"
    save_file({k: v.contiguous() for k, v in load_file_visual(bank_path).items()}, str(checkpoint))
    parent = tmp_path / "B"
    parent.mkdir()
    before = sorted(p.name for p in parent.rglob("*"))
    code = main(["bank", "import", "--arch", "vtvc-tiny", "--base", str(bank_path / "base.safetensors"),
                 "--finetuned", json.dumps({"../../escape": str(checkpoint)}), "--out", str(parent / "bank"), "--quiet"])
    assert code == 2 and sorted(p.name for p in parent.rglob("*")) == before and not (tmp_path / "escape.safetensors").exists()
    # a manifest that points outside the bank's task_vectors/ is refused, not followed
    fake = tmp_path / "fake"
    shutil.copytree(bank_path, fake, ignore=shutil.ignore_patterns("features"))
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest["tasks"]["digits"]["file"] = "../outside.safetensors"
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="outside the bank's task_vectors"):
        load_bank(fake)


def load_file_visual(bank_path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(bank_path / "base.safetensors")).items() if k.startswith("visual.")}


def test_a_full_disk_is_one_line_with_status_74_and_the_folder_stays_unfinished(bank_path, tmp_path, monkeypatch):
    def full(self, idata):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.posterior))

    monkeypatch.setattr(RunFolder, "write_posterior", full)
    out = tmp_path / "run"
    proc = run_inline("--bank", str(bank_path), "--out", str(out), *TINY)
    assert proc.returncode == 74 and one_line(proc.stderr) and "No space left on device" in proc.stderr
    assert str(out / "posterior.nc") in proc.stderr and not RunFolder(out).is_complete()
    assert 74 in EXIT_STATUS and 143 in EXIT_STATUS


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_a_signal_outside_svi_ends_in_one_line_and_its_own_status(bank_path, tmp_path, monkeypatch, signum, status, word):
    from vtvc_pyro.protocols import transfer

    def load_then_signal(*args, **kwargs):
        # arrives while the data loads, before SVI's own handler is installed; raise_signal delivers it
        # to this (the main) thread, so its handler runs before the next line: os.kill may hand it
        # to a torch or tqdm thread, and the main thread would notice it only later
        signal.raise_signal(signum)
        raise AssertionError("the signal should have stopped the run")

    monkeypatch.setattr(transfer, "load_target", load_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    # Python's own SIGINT handler, as at a terminal: a shell that starts the suite in the background
    # without job control hands it SIGINT ignored, and then no signal would arrive at all
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = run_inline("--bank", str(bank_path), "--out", str(tmp_path / "run"), *TINY)
    finally:
        signal.signal(signal.SIGINT, interactive)
    assert proc.returncode == status and one_line(proc.stderr) and word in proc.stderr
    assert signal.getsignal(signal.SIGTERM) == before  # the command put the handler back


def test_a_run_folder_has_one_writer_at_a_time(bank_path, tmp_path):
    out = tmp_path / "run"
    with RunFolder(out).lock():
        proc = run_inline("--bank", str(bank_path), "--out", str(out), *TINY)
    assert proc.returncode == 2 and one_line(proc.stderr) and "another process is writing" in proc.stderr


def test_two_bank_builds_at_once_build_it_once(tmp_path, monkeypatch):
    builds = []
    real = store._build_embedded_bank

    def counted(*args, **kwargs):
        builds.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_build_embedded_bank", counted)
    cfg = BuildConfig(tasks=["digits"], pretrain_steps=3, finetune_steps=2, batch_size=32)
    out, results = tmp_path / "bank", []
    threads = [threading.Thread(target=lambda: results.append(build_embedded_bank(out, cfg, progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert results == [out, out] and len(builds) == 1 and (out / "manifest.json").is_file()


def test_metrics_are_strict_json_and_bad_fits_are_flagged(tmp_path):
    path = write_json(tmp_path / "m.json", {"nll": float("nan"), "ece": [float("inf"), 0.5]})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"nll": None,
                                                                                               "ece": [None, 0.5]}
    metrics = {"svi": {"best_step": 600, "budget": {"steps": 600}, "skipped_steps": 3},
               "methods": {"vtvc": {"val": {"accuracy": 0.08}}, "zeroshot": {"val": {"accuracy": 0.23}}}}
    warnings = fit_warnings(metrics)
    assert len(warnings) == 3 and "last step" in warnings[0] and "3 SVI steps were skipped" in warnings[1]
    assert "below zero-shot's (23.0 %)" in warnings[2]
    addition = {"methods": {"vtvc": {"val": {"average": {"accuracy": 0.9}}},
                            "zeroshot": {"val": {"average": {"accuracy": 0.6}}}}}
    assert fit_warnings(addition) == []


def test_a_run_config_missing_settings_says_what_it_fills_in(monkeypatch):
    from dataclasses import asdict

    from vtvc_pyro.config import FitConfig
    from vtvc_pyro.protocols import fitting

    settings = json.loads(json.dumps(asdict(FitConfig(seed=3))))
    del settings["components"], settings["fit_split"], settings["svi"]["steps"]
    said = []
    monkeypatch.setattr(fitting.log, "warning", lambda message, *args: said.append(message % args))
    cfg = fitting.fit_config_of(settings, "RUN/config.json")
    assert said == ["RUN/config.json does not record components, svi.steps: using today's defaults for them"]
    assert cfg.seed == 3 and cfg.fit_split == "train"  # a run without fit_split predates it: it learned on train


def test_resume_accepts_a_run_written_before_newer_settings_existed(tmp_path):
    """A run's config.json without ``gating`` and ``svi.local_kl_weight`` (written before them)
    resumes under today's settings when those mean what the run did (drop; no local weight), and is
    still refused when they do not."""
    from dataclasses import asdict

    from vtvc_pyro.config import FitConfig

    settings = json.loads(json.dumps(asdict(FitConfig())))
    older = {k: v for k, v in settings.items() if k != "gating"}
    older["svi"] = {k: v for k, v in settings["svi"].items() if k != "local_kl_weight"}
    folder = RunFolder(tmp_path / "run")
    folder.prepare(older)
    folder.write_config(older, {"argv": ["vtvc", "fit"]})
    assert folder.prepare(settings, resume=True) is folder
    with pytest.raises(ConfigError, match="used other settings \\(gating\\)"):
        folder.prepare({**settings, "gating": "expect"}, resume=True)
