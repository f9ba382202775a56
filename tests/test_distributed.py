"""torchrun with two CPU processes (gloo): ranks agree, rank 0 writes, results equal one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vtvc_pyro import distributed
from vtvc_pyro.bank.store import load_bank
from vtvc_pyro.data.benchmarks import clip_preprocess, load_benchmark

from .conftest import ROOT


def torchrun(*args, nproc=2, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                          check=False)


def test_two_processes_equal_one(tmp_path):
    """Same global batches, gradients averaged: parameters after 4 AdamW steps match a one-process fit."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    proc = torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(one)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1, single = (load_file(str(p)) for p in (two / "rank0.safetensors", two / "rank1.safetensors",
                                                    one / "rank0.safetensors"))
    for key in r0:  # the ranks agree exactly
        assert torch.equal(r0[key], r1[key]), key
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.safetensors", "rank0.safetensors", "rank1.safetensors"]
    # ... and equal the one-process fit up to summation order. The log-variance network is left
    # out: at σ = e^-15 its gradient is the reparameterisation noise (s − μ is below float32
    # resolution of μ = 1), which depends on the random stream and so on the process count.
    compared = [k for k in single if "logvar" not in k and k != "elbo_trace"]
    for key in compared:
        assert torch.allclose(r0[key].double(), single[key].double(), atol=1e-4), key
    assert r0["val_accuracy"].tolist() == single["val_accuracy"].tolist()
    # the ELBO values carry log q(s) of those draws: equal to well under 1 %
    assert torch.allclose(r0["elbo_trace"], single["elbo_trace"], rtol=0.01)
    start = load_file(str(two / "checkpoint.safetensors"))  # rank 0 checkpointed the same best guide
    assert all(torch.equal(start[f"best/{k}"], r0[k]) for k in compared if k != "val_accuracy")


def test_svi_fit_under_torchrun_writes_once_from_rank_0(real_world, real_bank, tmp_path):
    """The real script on an imported bank and a stand-in benchmark; base features sharded by DistributedSampler."""
    out = tmp_path / "run"
    spec = f"benchmark:SVHN@{real_world / 'data'}"
    proc = torchrun(str(ROOT / "scripts" / "svi_fit.py"), "--bank", str(real_bank), "--target", spec, "--svi.steps", "4",
                    "--svi.batch_size", "8", "--svi.eval_every", "2", "--eval_samples", "2", "--device", "cpu",
                    "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("target: benchmark:SVHN") == 1  # only rank 0 reports
    for name in ("config.json", "metrics.json", "guide.safetensors", "checkpoint.safetensors", "posterior.nc"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["DTD", "EuroSAT", "MNIST"] and metrics["num_test"] == 10
    # the gathered features equal a one-process pass over the split, in data set order
    bank = load_bank(real_bank)
    task = load_benchmark("SVHN", real_world / "data", clip_preprocess(bank.model))
    key = f"benchmark_SVHN_{str(real_world / 'data').replace('/', '_')}"
    for split in ("train", "val", "test"):
        cached = load_file(str(real_bank / "features" / f"{key}-{split}.safetensors"))["features"]
        expected = distributed.streamed_features(bank.model, task.split(split)[0])
        assert cached.shape == expected.shape and torch.allclose(cached, expected, atol=1e-5), split


def test_gradient_accumulation_gives_the_same_fit(tmp_path):
    """Micro-batches of 4 and 2 images (accumulate 2, 4) give the fit of whole batches of 8."""
    from .ddp_worker import fit

    whole = fit(tmp_path / "a", accumulate=1)
    for accumulate in (2, 4):
        parts = fit(tmp_path / f"b{accumulate}", accumulate=accumulate)
        for key in whole:
            if "logvar" not in key and key != "elbo_trace":  # as above: sampling noise
                assert torch.allclose(parts[key].double(), whole[key].double(), atol=1e-4), (accumulate, key)
        assert torch.allclose(parts["elbo_trace"], whole["elbo_trace"], rtol=0.01)


def test_one_process_helpers_are_identities():
    idx = torch.arange(10)
    assert torch.equal(distributed.shard(idx), idx) and distributed.is_main() and not distributed.active()
    assert distributed.all_true(True) and not distributed.any_true(False) and distributed.mean_scalar(2.5) == 2.5
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(distributed.gather_sharded(rows, 3), rows)


@pytest.mark.parametrize("world, n", [(2, 5), (3, 7)])
def test_gather_sharded_restores_data_set_order(world, n):
    """The DistributedSampler(shuffle=False) rule: rank r holds items r, r+W, ... padded to equal length."""
    from torch.utils.data.distributed import DistributedSampler

    data = list(range(n))
    parts = [list(DistributedSampler(data, num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    assert sorted({i for p in parts for i in p}) == data
    stacked = torch.tensor(parts).T.reshape(-1)[:n]  # what gather_sharded does after all_gather
    assert stacked.tolist() == data
