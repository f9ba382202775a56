"""Files the project writes: atomic, and readable by others as far as the process umask allows."""

import contextlib
import os
import stat

import pytest
import torch

from vtvc_pyro.io import default_mode, process_umask, save_safetensors, write_json
from vtvc_pyro.protocols.export import export_folder

from .conftest import random_bank


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_and_exports_keep_the_umask_mode(mask, file_mode, folder_mode, tmp_path):
    """tempfile makes private files (0600); what the project writes has the mode open() would give."""
    with umask(mask):
        assert process_umask() == mask and default_mode() == file_mode and default_mode(folder=True) == folder_mode
        assert mode_of(write_json(tmp_path / "m.json", {"a": 1})) == file_mode
        assert mode_of(save_safetensors({"x": torch.ones(2)}, tmp_path / "t.safetensors")) == file_mode
        model, _, _, bank = random_bank(num_tasks=2)
        out = export_folder(tmp_path / "export", model, bank, torch.zeros(2, 1), granularity="task")
        assert mode_of(out) == folder_mode
        assert {p.name: mode_of(p) for p in out.iterdir()} == {p.name: file_mode for p in out.iterdir()}
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".export.*"))
