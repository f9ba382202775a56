"""Full training state of an SVI fit in one safetensors file, for exact resumption.

Tensors: guide parameters (``guide/``), the best-on-val guide (``best/``), optimizer moments
(``opt/<param index>/<key>``), torch's RNG state and the mini-batch sampler (``rng/``).
Metadata (JSON strings): step, optimizer param groups, scheduler state, ELBO trace, val history.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from ..errors import VTVCError
from ..io import save_safetensors

FORMAT = "vtvc-svi-checkpoint/1"


def save_training_state(path: Path, step: int, guide: torch.nn.Module, best_state: dict, opt: torch.optim.Optimizer,
                        sched, sampler_state: dict, history: dict) -> None:
    """Write everything needed to continue after ``step`` (atomically)."""
    tensors = {f"guide/{k}": v for k, v in guide.state_dict().items()}
    tensors.update({f"best/{k}": v for k, v in best_state.items()})
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt/{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    tensors.update({f"rng/{k}": v for k, v in sampler_state.items()})
    meta = {
        "format": FORMAT,
        "step": str(step),
        "param_groups": json.dumps(opt_state["param_groups"]),
        "scheduler": json.dumps(sched.state_dict()),
        "history": json.dumps(history),
    }
    save_safetensors(tensors, path, meta)


def load_training_state(path: Path, guide: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> dict:
    """Restore guide, optimizer, scheduler and torch RNG; returns step, best state, sampler state, history."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise VTVCError(f"checkpoint {path} is unreadable ({err}); start again without --resume") from err
    if meta.get("format") != FORMAT:
        raise VTVCError(f"{path} is not an SVI checkpoint of this version; start again without --resume")
    guide.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("guide/")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    sched.load_state_dict(json.loads(meta["scheduler"]))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng/cuda"]))
    return {
        "step": int(meta["step"]),
        "best_state": {k[5:]: v for k, v in tensors.items() if k.startswith("best/")},
        "sampler": {k[4:]: v for k, v in tensors.items() if k.startswith("rng/") and k not in ("rng/torch", "rng/cuda")},
        "history": json.loads(meta["history"]),
    }
