"""vtvc_pyro: Variational Task Vector Composition in Pyro over open_clip CLIP models.

The package is layered; each layer imports only the ones below it (an import-linter contract in
``pyproject.toml`` checks it)::

    cli                         the `vtvc` command
    protocols                   experiments: run_fit and the protocol registry (transfer, addition), negation,
                                ablation, export, predict, truncation
    methods | bayes | report    baselines | the Pyro model, guides, SVI | figures
    compose                     per-sample and shared composed forward passes
    bank                        task vectors, bank folders, low-rank banks, the embedded bank's training
    data                        data set specs, the offline suite, the 8 benchmarks, mini-batches
    backbone | diagnostics | evaluate | distributed
    run_folder                  the files of a run folder
    config | io | progress
    errors

Names below are imported on first use, so ``import vtvc_pyro`` is cheap and changes no global state.

Usage::

    from vtvc_pyro import FitConfig, run_fit
    metrics = run_fit(FitConfig(target="mixed"), "runs/mixed")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AmortizedGatedGuide": "bayes.guide", "GUIDES": "bayes.guide", "make_guide": "bayes.guide",
    "PRIORS": "bayes.priors", "make_prior": "bayes.priors", "VTVCModel": "bayes.model", "fit_svi": "bayes.svi",
    "mean_probs": "bayes.predictive", "sample_draws": "bayes.predictive",
    "HierarchicalModel": "bayes.hierarchical", "HierarchicalGuide": "bayes.hierarchical",
    "MODELS": "bayes.registry", "make_vtvc": "bayes.registry",
    "BuildConfig": "config", "FitConfig": "config", "GridConfig": "config", "NegationConfig": "config",
    "SVIConfig": "config", "VTVCError": "errors",
    "Composer": "compose.engine",
    "TaskVector": "bank.task_vectors", "TaskVectorBank": "bank.task_vectors",
    "build_embedded_bank": "bank.store", "import_bank": "bank.store", "load_bank": "bank.store",
    "import_hf_bank": "bank.hf",
    "truncate_bank": "bank.low_rank", "create_clip": "backbone", "load_benchmark": "data.benchmarks",
    "classification_metrics": "evaluate", "BASELINES": "methods.baselines",
    "run_fit": "protocols.fit", "PROTOCOLS": "protocols.fit", "plan_fit": "protocols.fit", "run_negation": "protocols.negation", "run_grid": "protocols.ablation",
    "export_composed": "protocols.export", "export_folder": "protocols.export", "export_run": "protocols.export",
    "truncation_report": "protocols.truncation", "Predictor": "protocols.predict",
    "RunFolder": "run_folder", "Split": "data.split", "GuideSettings": "bayes.guide",
    "TaskHeads": "compose.heads", "build_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vtvc_pyro' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
