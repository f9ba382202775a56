"""``scripts/ablate.py --quick`` end to end on the real bank: files, resumption, refusals."""

import csv
import time

import numpy as np
import pytest

from vtvc_pyro.config import FitConfig, GridConfig
from vtvc_pyro.errors import ConfigError
from vtvc_pyro.protocols.ablation import (
    aggregate,
    apply_setting,
    cells,
    parse_method,
    parse_sweep,
)

from .conftest import run_inline


def test_cells_run_seed_free_baselines_once():
    grid = GridConfig(methods=["zeroshot", "atlas", "vtvc/laplace/global"], seeds=[0, 1])
    assert cells(grid) == [("mixed", "zeroshot", 0, {}), ("mixed", "atlas", 0, {}), ("mixed", "atlas", 1, {}),
                           ("mixed", "vtvc/laplace/global", 0, {}), ("mixed", "vtvc/laplace/global", 1, {})]
    assert parse_method("vtvc/horseshoe/amortized") == ("vtvc", "horseshoe", "amortized", None)
    assert parse_method("vtvc/flat/gaussian/amortized") == ("vtvc", "gaussian", "amortized", "flat")


def test_sweeps_expand_for_vtvc_only_and_reach_every_field():
    grid = GridConfig(methods=["atlas", "vtvc/spike_slab/amortized_gated"], seeds=[0],
                      sweep=["svi.kl_weight=0.1,1", "prior.pi=0.3", "route_b=3"])
    assert cells(grid) == [("mixed", "atlas", 0, {}),
                           *[("mixed", "vtvc/spike_slab/amortized_gated", 0, {"svi.kl_weight": w, "prior.pi": 0.3,
                                                                               "route_b": 3}) for w in (0.1, 1)]]
    cfg = apply_setting(FitConfig(), "svi.kl_weight", 0.1)
    cfg = apply_setting(apply_setting(cfg, "prior.pi", 0.3), "route_b", 3)
    assert (cfg.svi.kl_weight, cfg.prior_args, cfg.route_b) == (0.1, {"pi": 0.3}, 3)
    assert apply_setting(FitConfig(), "components", 4).components == [4]  # a list field gets a one-item list
    for bad in ("svi.nope=1", "nope=1", "svi=1", "svi.kl_weight"):
        with pytest.raises(ConfigError, match="sweep"):
            parse_sweep([bad])


def test_aggregate_marks_the_val_best_setting():
    rows = [{"target": "mixed", "method": "vtvc", "setting": s, "seed": k, "val_nll": v + k * 0.01, "val_accuracy": 0.5,
             "accuracy": 0.5, "nll": 1.0, "ece": 0.1, "brier": 0.5, "seconds": 1.0}
            for s, v in (("a=1", 1.2), ("a=2", 0.9)) for k in (0, 1)]
    table = aggregate(rows)
    assert [(r["setting"], r["val_best"], r["n"]) for r in table] == [("a=1", False, 2), ("a=2", True, 2)]
    assert table[1]["val_nll"] == pytest.approx(0.905)


def test_quick_grid_writes_tables_and_resumes(bank_path, tmp_path):
    out = tmp_path / "grid"
    start = time.perf_counter()
    first = run_inline("--quick", "--bank", str(bank_path), "--out", str(out), script="ablate.py")
    wall = time.perf_counter() - start
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [r["method"] for r in rows] == list(GridConfig.quick().methods)
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["nll"]) > 0
        # seconds: the method alone, within its cell's wall time (rounded to 0.01 s: a merge may read 0.0)
        assert 0 <= float(r["seconds"]) <= float(r["wall_seconds"]) and np.isfinite(float(r["wall_seconds"]))
        if r["method"] in ("atlas", "adamerging") or r["method"].startswith("vtvc/"):  # 30 optimiser steps
            assert float(r["seconds"]) > 0
    assert sum(float(r["wall_seconds"]) for r in rows) <= wall  # the cells ran inside this call
    by_method = {r["method"]: float(r["accuracy"]) for r in rows}
    assert by_method["vtvc/spike_slab/amortized_gated"] > by_method["zeroshot"]  # even 30 steps help on mixed
    md = (out / "ablation.md").read_text()
    assert "| mixed | atlas |" in md and (out / "ablation.png").stat().st_size > 1000
    before = (out / "ablation.csv").read_text()

    again = run_inline("--quick", "--bank", str(bank_path), "--out", str(out), script="ablate.py")
    assert again.returncode == 0 and "[1/" not in again.stdout  # every cell was finished: nothing reran
    assert (out / "ablation.csv").read_text() == before

    other = run_inline("--quick", "--steps", "10", "--bank", str(bank_path), "--out", str(out), script="ablate.py")
    assert other.returncode == 2 and "other settings (steps)" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert (out / "ablation.csv").read_text() == before  # a refused run costs nothing on disk
