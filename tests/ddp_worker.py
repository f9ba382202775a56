"""Run under ``python -m torch.distributed.run`` (or alone) by tests/test_distributed.py.

Fits a near-deterministic guide (tiny slab variance, gates always on) with :func:`fit_svi` on a
random-init ``vtvc-tiny`` bank and writes what each rank ended with to ``OUT/rank<r>.safetensors``
(a test artefact; the library's own outputs come from rank 0 only).
"""

import sys
from pathlib import Path

import pyro
import torch

from vtvc_pyro import backbone, distributed
from vtvc_pyro.bank.task_vectors import TaskVector, TaskVectorBank
from vtvc_pyro.bayes.guide import make_guide
from vtvc_pyro.bayes.model import VTVCModel
from vtvc_pyro.bayes.priors import make_prior
from vtvc_pyro.bayes.svi import fit_svi
from vtvc_pyro.compose.engine import Composer
from vtvc_pyro.config import SVIConfig
from vtvc_pyro.io import save_safetensors
from vtvc_pyro.data.split import Split


def fit(out: Path, accumulate: int = 1) -> dict[str, torch.Tensor]:
    """The fit every process runs; returns the final (best-on-val) guide state and the histories."""
    torch.manual_seed(0)
    model = backbone.create_clip(backbone.TINY_MODEL)
    base = backbone.image_tower_params(model)
    vectors = [TaskVector.from_state_dicts({k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}, base,
                                           backbone.TINY_MODEL, f"t{t}") for t in range(3)]
    composer = Composer(model.visual, TaskVectorBank.stack(vectors, base), "layer")
    images = torch.randn(40, 3, 16, 16)
    labels = torch.arange(40) % 4
    features = backbone.image_features(model, images)
    head = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1) * 20
    prior = make_prior("spike_slab")
    pyro.set_rng_seed(0)
    # log-variance -30, gate logit 20 and |μ| = 1 far above the keep threshold: posterior draws are
    # (numerically) their means and no gate is dropped at random, so one
    # process and two processes see the same loss whatever the random streams
    guide = make_guide("amortized_gated", feature_dim=64, num_tasks=3, num_groups=composer.num_groups, prior=prior,
                       slab_mean_init=1.0, gate_logit_init=20.0, slab_logvar_init=-30.0, logvar_min=-30.0)
    cfg = SVIConfig(steps=4, batch_size=8, eval_every=2, checkpoint_every=2, accumulate=accumulate)
    result = fit_svi(VTVCModel(composer, head, prior), guide, Split(images[:32], features[:32], labels[:32]),
                  Split(images[32:], features[32:], labels[32:]), cfg, checkpoint_path=out / "checkpoint.safetensors",
                  progress=False)
    state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    state["elbo_trace"] = torch.tensor(result.elbo_trace, dtype=torch.float64)
    state["val_accuracy"] = torch.tensor([h["val_accuracy"] for h in result.val_history], dtype=torch.float64)
    return state


def main(out: Path) -> None:
    distributed.init_from_env()
    save_safetensors(fit(out), out / f"rank{distributed.rank()}.safetensors", {"world_size": str(distributed.world_size())})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
