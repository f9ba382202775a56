"""Files and devices: atomic writes (safetensors, JSON, any writer), base-model fingerprints, device choice.

Every file the project writes goes through :func:`atomic_write`: the content is written to a unique
temporary name in the target folder, flushed to disk and renamed over the target, so a crash or a
second writer never leaves half a file, and an existing file is only replaced once the new one is
complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ConfigError


def process_umask() -> int:
    """The process umask, read without changing it where the system says (Linux), else by setting
    it and putting it straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The mode ``open()`` (0o666) or ``mkdir`` (0o777) would give under the process umask: 0o644 and
    0o755 under the usual 022. ``tempfile`` makes its files private (0o600), which nobody asked for."""
    return (0o777 if folder else 0o666) & ~process_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a unique temporary file beside ``path``, fsync it, then rename it to
    ``path``, with the mode a plain ``open()`` would give (:func:`default_mode`).

    Usage::

        atomic_write("runs/x/posterior.nc", lambda tmp: idata.to_netcdf(str(tmp)))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Tensors (moved to CPU, made contiguous) to a safetensors file, atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented, strict JSON, atomically: NaN and ±Infinity (which strict parsers reject)
    are written as ``null``."""
    text = json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@contextlib.contextmanager
def exclusive(path: str | Path, wait: bool = True, what: str = "it"):
    """Hold an exclusive lock on the file ``path`` (created if needed) for the ``with`` block.

    ``wait``: block until the other holder is done; else refuse at once. The operating system drops
    the lock when its process dies, so a killed holder never leaves a stale lock behind.

    Raises:
        ConfigError: ``wait=False`` and another process holds the lock.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ConfigError(f"another process is writing {what} (lock {path}): wait for it to finish, or pass "
                              "another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fingerprint(params: Mapping[str, torch.Tensor]) -> str:
    """A short SHA-256 of names, shapes and float32 bytes of ``params`` (identifies a base model)."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)
