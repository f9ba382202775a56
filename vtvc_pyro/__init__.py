"""vtvc_pyro: Variational Task Vector Composition in Pyro over open_clip CLIP models.

Usage::

    from vtvc_pyro import FitConfig, run_fit
    metrics = run_fit(FitConfig(target="mixed"), "runs/mixed")
"""

from .bank import build_embedded_bank, load_bank
from .composition import Composer
from .errors import VTVCError
from .guide import GUIDES, AmortizedGatedGuide, make_guide
from .infer import SVIConfig, fit_svi
from .model import VTVCModel
from .pipeline import FitConfig, run_fit
from .priors import PRIORS, make_prior
from .task_vectors import TaskVector, TaskVectorBank

__version__ = "0.1.0"
__all__ = [
    "AmortizedGatedGuide", "Composer", "FitConfig", "GUIDES", "PRIORS", "SVIConfig", "TaskVector",
    "TaskVectorBank", "VTVCError", "VTVCModel", "build_embedded_bank", "fit_svi", "load_bank", "make_guide",
    "make_prior", "run_fit",
]
