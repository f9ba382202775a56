"""Runs you can watch: history.csv as the fit goes, its resumption, the ELBO split, progress off a terminal."""

import csv
import importlib.util
import io
import json
import math
import os
import signal
import warnings

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from vtvc_pyro import progress
from vtvc_pyro.bayes import svi
from vtvc_pyro.bayes.history import COLUMNS, History, elbo_split
from vtvc_pyro.bayes.priors import make_prior
from vtvc_pyro.bayes.registry import make_vtvc
from vtvc_pyro.config import FitConfig, SVIConfig
from vtvc_pyro.diagnostics import az
from vtvc_pyro.errors import ConfigError, FitInterrupted

from .conftest import run_inline
from .test_hierarchical import planted_problem

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
SETTINGS = {"steps": 10, "eval_every": 4, "batch_size": 16, "val_samples": 4, "checkpoint_every": 100, "kl_weight": 0.1}


@pytest.fixture(scope="module")
def problem():
    return planted_problem(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def hierarchical(problem):
    composer, head, data, _ = problem
    pyro.set_rng_seed(0)
    model, guide = make_vtvc("hierarchical", "amortized_gated", composer, head, make_prior("spike_slab"), 64)
    guide.initialize(data["train"].features)
    return model, guide


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_history_has_a_row_per_step_written_as_the_fit_goes(problem, tmp_path):
    _, _, data, _ = problem
    model, guide = hierarchical(problem)
    path = tmp_path / "history.csv"
    seen = []

    def score(model, guide, val):  # called at eval steps, before that step's row
        seen.append(len(read(path)))
        return 0.0

    svi.fit_svi(model, guide, data["train"], data["val"], SVIConfig(**SETTINGS), progress=False, score=score,
                history_path=path)
    assert seen == [3, 7, 9]  # steps 4, 8, 10: every earlier row is already on disk
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    rows = read(path)
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    evals = {4, 8, 10}
    for r in rows:
        step = int(r["step"])
        assert math.isfinite(float(r["elbo"])) and float(r["grad_norm"]) > 0
        assert float(r["lr"]) > 0 and float(r["global_lr"]) > 0  # the hierarchical guide has the global group
        assert 0 <= float(r["kept_fraction"]) <= 1
        assert bool(r["log_likelihood"]) == bool(r["kl"]) == bool(r["val_score"]) == (step in evals)
        assert r["val_nll"] == r["val_accuracy"] == ""  # a custom score has no NLL or accuracy
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # the cosine schedule
    assert float(rows[3]["log_likelihood"]) < 0


def test_resumed_fit_continues_its_history_exactly(problem, tmp_path, monkeypatch):
    _, _, data, _ = problem
    cfg = SVIConfig(**{**SETTINGS, "checkpoint_every": 5})
    model, guide = hierarchical(problem)
    svi.fit_svi(model, guide, data["train"], data["val"], cfg, progress=False, history_path=tmp_path / "ref.csv")
    reference = read(tmp_path / "ref.csv")
    assert reference[3]["val_nll"] and reference[3]["val_accuracy"] and not reference[4]["val_nll"]

    out = tmp_path / "run"
    checkpoint, path = out / "checkpoint.safetensors", out / "history.csv"
    weight = svi.kl_weight_at

    def interrupt_at_7(step, *args):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # _StopRequest: finish the step, checkpoint, stop
        return weight(step, *args)

    monkeypatch.setattr(svi, "kl_weight_at", interrupt_at_7)
    model, guide = hierarchical(problem)
    with pytest.raises(FitInterrupted, match="SIGINT at SVI step 7"):
        svi.fit_svi(model, guide, data["train"], data["val"], cfg, checkpoint, progress=False, history_path=path)
    monkeypatch.setattr(svi, "kl_weight_at", weight)
    assert [r["step"] for r in read(path)] == [str(s) for s in range(1, 8)]
    with open(path, "a") as f:  # a row past the checkpoint, as a process killed later would leave
        f.write("8,-1,,,,,,,,,\n")
    model, guide = hierarchical(problem)
    svi.fit_svi(model, guide, data["train"], data["val"], cfg, checkpoint, resume=True, progress=False,
                history_path=path)
    assert read(path) == reference  # same seed: the same rows, none twice


def test_watching_a_fit_changes_nothing_in_it(problem, tmp_path):
    _, _, data, _ = problem
    fits = []
    for path in (None, tmp_path / "history.csv"):
        model, guide = hierarchical(problem)
        fits.append(svi.fit_svi(model, guide, data["train"], data["val"], SVIConfig(**SETTINGS), progress=False,
                                history_path=path))
    assert fits[0].elbo_trace == fits[1].elbo_trace and fits[0].val_history == fits[1].val_history
    assert [float(r["elbo"]) for r in read(tmp_path / "history.csv")] == pytest.approx(fits[1].elbo_trace, rel=1e-6)


def test_elbo_split_is_the_trace_elbo_draw_split_at_the_likelihood(problem):
    _, _, data, _ = problem
    model, guide = hierarchical(problem)
    x, f, y = (t[:16] for t in (data["train"].images, data["train"].features, data["train"].labels))
    kwargs = {"num_data": 400, "kl_weight": 0.1, "temperature": 0.5}
    pyro.set_rng_seed(3)
    before = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        elbo, log_likelihood, kl = elbo_split(model, svi.image_only(guide), x, f, y, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG is untouched
    pyro.set_rng_seed(3)
    loss = Trace_ELBO(max_plate_nesting=1).loss(model, svi.image_only(guide), x, f, y, **kwargs)
    assert elbo == pytest.approx(-loss, rel=1e-5)
    assert kl == pytest.approx(log_likelihood - elbo) and log_likelihood < 0


def test_a_run_writes_the_history_of_every_candidate_and_history_csv_is_the_chosen_ones(short_run):
    run, _ = short_run
    for name in ("history-k1.csv", "history-k4.csv"):  # components [1, 4]: named after K
        rows = read(run / name)
        assert [int(r["step"]) for r in rows] == list(range(1, 31))
        assert [int(r["step"]) for r in rows if r["val_nll"]] == [15, 30]
    chosen = json.loads((run / "metrics.json").read_text())["svi"]["components"]
    assert (run / "history.csv").read_text() == (run / f"history-k{chosen}.csv").read_text()
    # its ELBO column is the chosen fit's own trace, as the posterior stores it
    trace = az.from_netcdf(run / "posterior.nc").svi_trace["elbo"].values
    assert [float(r["elbo"]) for r in read(run / "history.csv")] == pytest.approx(trace.tolist(), rel=1e-5)


def test_off_a_terminal_progress_is_a_few_plain_lines(capsys):
    bar = progress.track(range(1000), "loop", delay=0)
    assert isinstance(bar, progress.LineProgress)  # pytest's captured stderr is no terminal
    for i in bar:
        if i == 600:
            bar.set_postfix(elbo=f"{-35.25:.1f}")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 5  # start, 25 %, 50 %, 75 %, end
    assert all(line.startswith("loop: ") for line in lines)
    assert "1000/1000" in lines[-1] and "100%" in lines[-1] and "elbo=-35.2" in lines[-1]
    for i in progress.track(range(1000), "fast"):  # over within the default delay: nothing
        pass
    for i in progress.track(range(1000), "quiet", enabled=False, delay=0):
        pass
    assert capsys.readouterr().err == ""


def test_off_a_terminal_a_slow_phase_gets_a_line_every_interval(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = progress.track(None, "slow", total=10_000, delay=5, interval=60, file=out)
    for _ in range(10):  # 10 items of 30 s each: 5 s delay, then one line a minute
        now[0] += 30
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 4 + 1 and "10/10000" in lines[-1]  # first (30 s), 90, 150, 210, 270 s, end


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_logger_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"pip install 'vtvc-pyro\[tensorboard\]'"):
        FitConfig(logger="tensorboard").validate()
    with pytest.raises(ConfigError, match="tensorboard"):
        History(None, tensorboard=tmp_path / "tb")
    proc = run_inline("--logger", "tensorboard", "--dry_run")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "tensorboard" in proc.stderr


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the optional tensorboard package")
def test_tensorboard_logger_writes_the_same_scalars(problem, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, data, _ = problem
    model, guide = hierarchical(problem)
    svi.fit_svi(model, guide, data["train"], data["val"], SVIConfig(**SETTINGS), progress=False,
                history_path=tmp_path / "history.csv", tensorboard_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("svi/elbo")] == list(range(1, 11))
    assert [e.step for e in events.Scalars("svi/val_nll")] == [4, 8, 10]
    rows = read(tmp_path / "history.csv")
    assert events.Scalars("svi/grad_norm")[2].value == pytest.approx(float(rows[2]["grad_norm"]), rel=1e-5)
