"""Protocols by name, and the one skeleton of a fit: ``run_fit``, its dry run and its table.

Usage::

    from vtvc_pyro import FitConfig, run_fit
    metrics = run_fit(FitConfig(target="mixed"), "runs/mixed")
    metrics = run_fit(FitConfig.for_protocol("addition"), "runs/addition")

Adding a protocol: one module with a :class:`~vtvc_pyro.protocols.fitting.FitProtocol` subclass, one
line in :data:`PROTOCOLS`, and its name among the choices of ``FitConfig.protocol`` (a ``Literal``:
the command line and ``FitConfig.validate`` read it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from .. import distributed
from ..bayes.priors import make_prior
from ..config import DEFAULT_BANK, FitConfig
from ..errors import ConfigError
from ..io import resolve_device
from ..methods import baselines
from ..run_folder import RunFolder, device_description
from ..tables import layout_scores
from .addition import Addition
from .fitting import SPLITS, FitProtocol, fit_vtvc, posterior_data, prediction_tensors, run_record
from .transfer import Transfer

log = logging.getLogger(__name__)

PROTOCOLS: dict[str, FitProtocol] = {
    "transfer": Transfer(),
    "addition": Addition(),
}
"""Protocol name -> the protocol (``FitConfig.protocol`` names one)."""


def protocol_for(name: str) -> FitProtocol:
    """The registered protocol ``name``; a clear error for an unknown one."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def default_out(cfg: FitConfig) -> Path:
    """``runs/<target>-<timestamp>`` (``runs/addition-...`` for task addition)."""
    label = protocol_for(cfg.protocol).label(cfg)
    return Path("runs") / f"{label.replace(':', '_').replace('/', '_')}-{datetime.now():%Y%m%d-%H%M%S}"


def run_fit(cfg: FitConfig, out: str | Path, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Fit VTVC and the baselines under ``cfg.protocol``; write the run folder ``out``
    (:class:`~vtvc_pyro.run_folder.RunFolder`).

    Returns:
        the metrics dict (also in ``out/metrics.json``) plus ``timing`` (``out/timing.json``: every
        phase's wall time, SVI's throughput).
    """
    cfg.validate()
    protocol = protocol_for(cfg.protocol)
    out, overwrite = distributed.setup_run(Path(out), overwrite, resume)  # torchrun: only rank 0 writes to out
    with RunFolder(out).lock():  # one writer per run folder
        return _run_fit(cfg, protocol, out, overwrite, resume, progress)


def _run_fit(cfg: FitConfig, protocol: FitProtocol, out: Path, overwrite: bool, resume: bool, progress: bool) -> dict:
    device = resolve_device(cfg.device)
    phases: dict[str, float] = {}
    with timed(phases, "load_seconds"):  # the bank (built on first use), the data, the base features
        target = protocol.load(cfg, device, progress)
    learning = len(target.data["train"])
    if cfg.svi.batch_size > learning:
        log.warning("--svi.batch_size %d is more than the %d learning images: every step of every learned method "
                    "uses all %d", cfg.svi.batch_size, learning, learning)
    settings = json.loads(json.dumps(asdict(cfg)))  # JSON-normalised
    folder = RunFolder(out).prepare(settings, overwrite, resume)  # after every input is known to be usable
    if not resume:
        folder.write_config(settings, run_record(cfg, protocol, target, device))
    with timed(phases, "baselines_seconds"):
        baselines = protocol.run_baselines(cfg, target, progress)
    with timed(phases, "vtvc_seconds"):  # SVI of every candidate and both predictions
        vtvc = fit_vtvc(cfg, target, folder, resume, progress)
    methods = {**baselines.probs, **vtvc.methods}
    metrics = protocol.metrics(cfg, target, methods, baselines, vtvc)
    metrics["prediction"] = vtvc.prediction  # which prediction `vtvc` is (chosen on val)
    metrics["splits"] = {split: len(target.data[split]) for split in SPLITS}  # after --shots: what was learned from
    metrics["warnings"] = fit_warnings(metrics)
    folder.write_metrics(metrics)  # no timings here: same seed and device, same file
    with timed(phases, "outputs_seconds"):
        folder.write_predictions(prediction_tensors(target, methods))
        folder.write_posterior(posterior_data(cfg, target, vtvc))
    timing = {"svi_seconds": round(vtvc.result.seconds, 2),
              "svi_samples_per_second": round(vtvc.result.samples_per_second, 1),
              **phases, "total_seconds": round(sum(phases.values()), 2)}
    folder.write_timing(timing)
    folder.write_complete()  # last: readers refuse the folder until here
    metrics["timing"] = timing
    return metrics


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str):
    """Add the wall time of the ``with`` block to ``phases[name]`` (seconds, 2 decimals)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - start, 2)


def plan_fit(cfg: FitConfig) -> dict:
    """What ``run_fit(cfg)`` would use, resolved without writing anything (``vtvc fit --dry_run``).

    Returns:
        ``{"device", "bank", "target", "splits", "tasks", "coefficients", "composition", "baselines", ...}``;
        where the embedded bank is not built yet, the parts that need it say so.
    """
    cfg.validate()
    protocol = protocol_for(cfg.protocol)
    make_prior(cfg.prior, **cfg.prior_args)  # unknown names and bad arguments fail here, as in a run
    plan = {"device": device_description(resolve_device(cfg.device)), "bank": str(cfg.bank),
            "protocol": protocol.name, "target": protocol.label(cfg), "model": cfg.model, "prior": cfg.prior,
            "guide": cfg.guide, "baselines": baselines.expand_names(cfg.baselines, cfg.model),
            "svi": f"{cfg.svi.steps} steps of batch {cfg.svi.batch_size}, seed {cfg.seed}"}
    if not (Path(cfg.bank) / "manifest.json").is_file():
        if Path(cfg.bank) != Path(DEFAULT_BANK):
            raise ConfigError(f"{cfg.bank} holds no bank (manifest.json): build or import one, or pass --bank")
        plan["bank"] += " (not built yet: the fit builds it first, about 3 minutes on 2 cores)"
    plan.update(protocol.plan(cfg))
    if cfg.shots is not None:
        plan["shots"] = (f"{cfg.shots} learning images per {protocol.shot_unit} "
                         f"(seed {cfg.seed}); val shrunk in proportion, at least 2 per class")
    return plan


def format_table(metrics: dict) -> str:
    """A plain-text results table of a run's metrics (of any protocol)."""
    return protocol_for(metrics.get("protocol", "transfer")).format(metrics)


LEGEND = ("acc: accuracy; NLL: negative log-likelihood per image (nats); ECE: expected calibration error "
          "(15 bins); TS: after temperature scaling fitted on val; paired 95%: bootstrap over the same test images")


def run_notes(metrics: dict) -> list[str]:
    """The lines printed under a run's table: what VTVC chose on val, a warning when its best val
    score came at its last step (the fit may still have been improving), and a legend."""
    svi, lines = metrics.get("svi", {}), []
    if "components" in svi:
        choice = metrics.get("prediction", {})
        kind = {"mean": "one pass at the gated posterior mean", "mc": "the Monte Carlo predictive"}.get(choice.get("vtvc"))
        line = (f"VTVC chose K = {svi['components']}, learning rates × {svi.get('lr_factor', 1):g} "
                f"({svi.get('budget', {}).get('fits', 1)} fits, lowest val NLL)")
        if kind:
            nll = choice["val_nll"]
            line += f"; vtvc is {kind} (val NLL {nll['mean']:.3f} one pass, {nll['mc']:.3f} Monte Carlo)"
        lines.append(line)
    lines += [f"warning: {w}" for w in metrics.get("warnings", fit_warnings(metrics))]
    return [*lines, LEGEND]


def fit_warnings(metrics: dict) -> list[str]:
    """What a run's numbers say is wrong with its fit (``metrics.json`` → ``warnings``): the best val
    score at the last step, steps skipped as non-finite, VTVC below zero-shot on val."""
    svi, methods, out = metrics.get("svi", {}), metrics.get("methods", {}), []
    steps = svi.get("budget", {}).get("steps")
    if steps and svi.get("best_step") == steps:
        out.append(f"VTVC's best val score came at its last step ({steps}): the fit may not have converged; "
                   "try more --svi.steps")
    if svi.get("skipped_steps"):
        out.append(f"{svi['skipped_steps']} SVI steps were skipped as non-finite")
    val = {name: layout_scores(methods[name].get("val", {})).get("accuracy") for name in ("vtvc", "zeroshot")
           if name in methods}
    if None not in val.values() and len(val) == 2 and val["vtvc"] < val["zeroshot"]:
        out.append(f"VTVC's val accuracy ({100 * val['vtvc']:.1f} %) is below zero-shot's ({100 * val['zeroshot']:.1f} %): "
                   "the fit failed; check the data, --svi.lr and --svi.steps")
    return out

