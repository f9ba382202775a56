"""``scripts/ablate.py --quick`` end to end on the real bank: files, resumption, refusals."""

import csv

from vtvc_pyro.config import GridConfig
from vtvc_pyro.protocols.ablation import cells, parse_method

from .conftest import run_script


def test_cells_run_seed_free_baselines_once():
    grid = GridConfig(methods=["zeroshot", "atlas", "vtvc/laplace/global"], seeds=[0, 1])
    assert cells(grid) == [("mixed", "zeroshot", 0), ("mixed", "atlas", 0), ("mixed", "atlas", 1),
                           ("mixed", "vtvc/laplace/global", 0), ("mixed", "vtvc/laplace/global", 1)]
    assert parse_method("vtvc/horseshoe/amortized") == ("vtvc", "horseshoe", "amortized")


def test_quick_grid_writes_tables_and_resumes(bank_path, tmp_path):
    out = tmp_path / "grid"
    first = run_script("--quick", "--bank", str(bank_path), "--out", str(out), script="ablate.py")
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [r["method"] for r in rows] == list(GridConfig.quick().methods)
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["nll"]) > 0 and float(r["seconds"]) >= 0
    by_method = {r["method"]: float(r["accuracy"]) for r in rows}
    assert by_method["vtvc/spike_slab/amortized_gated"] > by_method["zeroshot"]  # even 30 steps help on mixed
    md = (out / "ablation.md").read_text()
    assert "| mixed | atlas |" in md and (out / "ablation.png").stat().st_size > 1000
    before = (out / "ablation.csv").read_text()

    again = run_script("--quick", "--bank", str(bank_path), "--out", str(out), script="ablate.py")
    assert again.returncode == 0 and "[1/" not in again.stdout  # every cell was finished: nothing reran
    assert (out / "ablation.csv").read_text() == before

    other = run_script("--quick", "--steps", "10", "--bank", str(bank_path), "--out", str(out), script="ablate.py")
    assert other.returncode == 2 and "other settings (steps)" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert (out / "ablation.csv").read_text() == before  # a refused run costs nothing on disk
