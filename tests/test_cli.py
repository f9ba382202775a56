"""The `vtvc` command: layout contract, import hygiene, help, dry run, config replay, one meaning per flag."""

import json
import subprocess
import sys
import typing
from dataclasses import asdict, fields, is_dataclass

import pytest

from vtvc_pyro import config
from vtvc_pyro.cli import COMMANDS, build_parser, main
from vtvc_pyro.config import BuildConfig, FitConfig, SVIConfig

from .conftest import ROOT, run_inline


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


def test_python_dash_m_answers_help_without_heavy_imports():
    """A real process: ``python -m vtvc_pyro`` exits 0, and ``-X importtime`` lists every module it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vtvc_pyro", "fit", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--svi.kl_weight" in proc.stdout and "default: 0.01" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "vtvc_pyro.cli.commands" in imported and "jsonargparse" in imported  # the listing is real
    assert not {m for m in imported if m.split(".")[0] in ("torch", "pyro", "open_clip", "arviz", "matplotlib")}


def test_groups_list_their_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bank", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(name in out for name in ("build", "import", "truncate", "finetune", "pretrain"))


def test_the_table_is_the_one_list_of_subcommands():
    paths = [c.path for c in COMMANDS]
    assert len(set(paths)) == len(paths) and ("bank", "build") in paths and ("fit",) in paths
    for command in COMMANDS:
        assert command.help and callable(command.handler) and is_dataclass(command.settings), command.path
        assert command.handler.__name__ == "_".join(command.path), command.path  # one handler per line, named for it


def _flattened(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):  # --svi FILE and --svi.steps N
            yield prefix + f.name
            yield from _flattened(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c.path))
def test_every_flag_is_a_settings_field(command):
    """The parser of each subcommand has exactly its dataclass's fields: no flag written by hand."""
    parser = _subparser(build_parser(), command.path)
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config")}
    assert dests == set(_flattened(command.settings))


def _subparser(parser, path):
    for name in path:
        parser = parser._subcommands_action._name_parser_map[name]
    return parser


@pytest.mark.parametrize("stage, required", [("finetune", ["--base", "b", "--data", "d", "--out", "o"]), ("pretrain", [])])
def test_bank_stages_default_to_the_embedded_banks_settings(stage, required):
    opts = build_parser().parse_args(["bank", stage, *required]).bank[stage]
    built = BuildConfig()
    assert (opts.steps, opts.lr) == (getattr(built, f"{stage}_steps"), getattr(built, f"{stage}_lr"))
    assert (opts.arch, opts.batch_size, opts.seed) == (built.arch, built.batch_size, built.seed)


def test_switches_take_no_value_and_bool_settings_take_one():
    fit = build_parser().parse_args(["fit", "--quiet", "--routing", "false", "--svi.skip_nonfinite", "true"]).fit
    assert fit.quiet and not fit.overwrite and fit.routing is False and fit.svi.skip_nonfinite is True
    export = build_parser().parse_args(["export", "--overwrite", "RUN", "--out", "o", "--evaluate", "false"]).export
    assert export.run_dir == "RUN" and export.overwrite and export.evaluate is False  # a switch never eats RUN
    table = build_parser().parse_args(["table", "A", "B", "--out", "t"]).table
    assert table.run_dirs == ["A", "B"]


def test_print_config_replays_and_a_run_record_is_ignored(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--svi.steps", "7", "--quiet", "--print_config"])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0 and "steps: 7" in printed and "quiet: true" in printed
    (tmp_path / "fit.yaml").write_text(printed)
    record = {**json.loads(json.dumps(asdict(FitConfig()))), "target": "rot-noise", "run": {"argv": ["vtvc", "fit"]}}
    (tmp_path / "config.json").write_text(json.dumps(record))
    parser = build_parser()
    replayed = parser.parse_args(["fit", "--config", str(tmp_path / "fit.yaml")]).fit
    assert replayed.svi.steps == 7 and replayed.quiet
    recorded = parser.parse_args(["fit", "--config", str(tmp_path / "config.json"), "--svi.steps", "3"]).fit
    assert recorded.target == "rot-noise" and recorded.svi.steps == 3 and recorded.run == {"argv": ["vtvc", "fit"]}
    assert "--run" not in parser.format_help() and "--run " not in _subparser(parser, ("fit",)).format_help()


def test_each_protocol_takes_its_own_defaults_unless_a_flag_or_file_sets_them(tmp_path):
    from vtvc_pyro.cli import _parse

    def fit(*argv):
        return _parse(["fit", *argv]).fit

    transfer, addition = fit(), fit("--protocol", "addition")
    assert (transfer.model, transfer.svi.steps, transfer.svi.lr, transfer.gating) == ("hierarchical", 600, 5e-3, "drop")
    assert (addition.model, addition.svi.steps, addition.svi.lr, addition.gating) == ("flat", 1500, 1e-2, "expect")
    mine = fit("--protocol", "addition", "--model", "hierarchical", "--svi.steps", "9")
    assert (mine.model, mine.svi.steps, mine.svi.lr) == ("hierarchical", 9, 1e-2)
    (tmp_path / "c.json").write_text(json.dumps({"protocol": "addition", "svi": {"lr": 0.5}}))
    from_file = fit("--config", str(tmp_path / "c.json"))
    assert (from_file.model, from_file.svi.steps, from_file.svi.lr) == ("flat", 1500, 0.5)
    python = FitConfig.for_protocol("addition", seed=3, svi={"steps": 20})
    assert (python.model, python.svi.steps, python.svi.lr, python.seed) == ("flat", 20, 1e-2, 3)
    assert FitConfig.for_protocol("addition", svi=SVIConfig(steps=5)).svi == SVIConfig(steps=5)  # taken whole
    # a run's own config.json written before `gating` existed replays with what it meant then
    (tmp_path / "old.json").write_text(json.dumps({"protocol": "addition", "model": "flat", "run": {"argv": ["vtvc"]}}))
    assert fit("--config", str(tmp_path / "old.json")).gating == "drop"
    assert fit("--config", str(tmp_path / "old.json"), "--gating", "expect").gating == "expect"


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


def test_a_misspelt_flag_names_the_closest_and_is_never_taken_as_an_abbreviation(capsys):
    assert main(["fit", "--svi.step", "5"]) == 2
    err = capsys.readouterr().err
    assert err == "error: vtvc fit has no flag --svi.step: did you mean --svi.steps? (see vtvc fit --help)\n"
    assert main(["bank", "build", "--out_dir", "x"]) == 2
    assert "vtvc bank build has no flag --out_dir: did you mean --out?" in capsys.readouterr().err


@pytest.mark.parametrize("habit, usual", [
    (["fit", "--dry-run", "--svi.batch-size", "8"], ["fit", "--dry_run", "--svi.batch_size", "8"]),
    (["fit", "svi.steps=10", "target=rot-noise"], ["fit", "--svi.steps=10", "--target=rot-noise"]),
    (["fit", "--baselines", "atlas,ties", "--components=1,4"], ["fit", "--baselines", "[atlas,ties]", "--components=[1,4]"]),
    (["fit", "--quiet", "-v", "--log-level", "INFO"], ["-v", "--log_level", "INFO", "fit", "--quiet"]),
    (["ablate", "--sweep", "svi.lr=0.1,0.2", "--sweep", "seed=1"], ["ablate", "--sweep", "svi.lr=0.1,0.2", "--sweep", "seed=1"]),
    (["export", "--overwrite", "RUN", "--out", "o"], ["export", "--overwrite", "RUN", "--out", "o"]),
    (["fit", "--svi.lr=-1e-3", "--baselines=[]"], ["fit", "--svi.lr=-1e-3", "--baselines=[]"]),
    (["fit", "--baselines+", "atlas"], ["fit", "--baselines+", "atlas"]),  # jsonargparse's append: one item
    (["ablate", "--sweep=svi.lr=0.1,0.2"], ["ablate", "--sweep", "svi.lr=0.1,0.2"]),
    (["bank", "import", "--arch", "a", "--out", "o", "--tasks", "null"], ["bank", "import", "--arch", "a", "--out", "o",
                                                                         "--tasks", "null"]),
    (["table", "out=x"], ["table", "out=x"]),  # a run folder named out=x, not --out x
])
def test_habits_from_other_tools_mean_what_they_say(habit, usual):
    """Dashes for underscores, Hydra's key=value, comma lists, -v after the subcommand."""
    from vtvc_pyro.cli import _repeated_flags, _tree
    from vtvc_pyro.cli.argv import forgive

    assert forgive(habit, _tree(COMMANDS)) == usual
    parser = build_parser()
    assert parser.parse_args(_repeated_flags(forgive(habit, _tree(COMMANDS)))) == parser.parse_args(_repeated_flags(usual))


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


def test_banks_live_in_the_per_user_cache_unless_told_otherwise(tmp_path, monkeypatch):
    """Default: platformdirs' user cache; $VTVC_HOME moves it; $VTVC_BANK names the bank itself."""
    import os

    import platformdirs

    assert config.DEFAULT_BANK == config.default_bank()  # this session's ($VTVC_BANK, set by conftest)
    monkeypatch.delenv("VTVC_HOME", raising=False)
    monkeypatch.delenv("VTVC_BANK", raising=False)
    assert config.default_bank() == os.path.join(platformdirs.user_cache_dir("vtvc_pyro", appauthor=False), "banks",
                                                 "embedded")
    monkeypatch.setenv("VTVC_HOME", str(tmp_path))
    assert config.default_bank() == str(tmp_path / "banks" / "embedded")
    monkeypatch.setenv("VTVC_BANK", "b")
    assert config.default_bank() == "b"
