"""How many posterior draws a fitted run's predictive needs: test NLL, accuracy and selective
accuracy of the one composed pass at the posterior mean and of the Monte Carlo predictive with S
draws, on the run's own test images (every image counted once, not averaged per task).

    python scripts/predictive_draws.py runs/v3/add-expect/s0 1 4 20

Selective AUC is the accuracy averaged over the accuracy-coverage curve (the images with the
highest predictive entropy rejected first): how well each prediction's own uncertainty ranks its
errors. The draws use the run's seed, as the run's predictive does.
"""

from __future__ import annotations

import sys

from vtvc_pyro.bayes.predictive import mean_probs, sample_draws
from vtvc_pyro.compose.engine import Composer
from vtvc_pyro.evaluate import accuracy_coverage
from vtvc_pyro.io import resolve_device
from vtvc_pyro.methods.merges import accuracy, nll
from vtvc_pyro.protocols.fit import protocol_for
from vtvc_pyro.protocols.fitting import build_vtvc, fit_config_of, load_guide_from_run
from vtvc_pyro.run_folder import RunFolder


def main(run_dir: str, draws: list[int]) -> None:
    folder = RunFolder(run_dir)
    folder.require_complete()
    settings, _ = folder.read_config()
    cfg = fit_config_of(settings)
    device = resolve_device("cpu")
    target = protocol_for(cfg.protocol).load(cfg, device)
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    test = target.data["test"]
    guide = load_guide_from_run(run_dir, composer, target.head, test.features.shape[1])
    model, _ = build_vtvc(cfg, composer, target.head, test.features.shape[1], getattr(guide, "components", 1))
    rows = {"one pass (posterior mean)": mean_probs(model, guide, test.images, test.features, classes=test.classes)}
    for s in draws:
        probs_s, _, _ = sample_draws(model, guide, test.images, test.features, s, cfg.svi.eval_temperature,
                                     generator_seed=cfg.seed, classes=test.classes)
        rows[f"Monte Carlo, {s} draws"] = probs_s.mean(0)
    print(f"{run_dir}: {len(test)} test images")
    for name, probs in rows.items():
        _, selective = accuracy_coverage(probs, test.labels)
        print(f"  {name:28s} accuracy {100 * accuracy(probs, test.labels):5.2f} %  NLL {nll(probs, test.labels):.4f}  "
              f"selective AUC {float(selective.mean()):.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/predictive_draws.py RUN_DIR S [S ...]")
    main(sys.argv[1], [int(s) for s in sys.argv[2:]])
