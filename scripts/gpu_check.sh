#!/usr/bin/env bash
# The prepared GPU check (issue 16, item 7): on a CUDA machine, in about 5 minutes,
#   1. the environment (nvidia-smi, torch.cuda, versions),
#   2. the embedded bank (built on first use when banks/embedded is absent: copy it along to skip),
#   3. the tests marked `cuda` (pytest -m cuda; they skip on CPU),
#   4. a short fit of the embedded default with --device cuda on the fp32 bank,
#   5. the same fit on a bf16-stored copy of the bank,
#   6. the composition benchmark on the GPU (small grid),
# then OUT/summary.json: wall time and status of every phase, peak CUDA memory, the fits' accuracies,
# the benchmark's peaks and versions. A phase that fails is recorded (its log is OUT/<phase>.log)
# and the others still run; the exit status is 1 when any phase failed.
#
# Usage: scripts/gpu_check.sh [OUT]        (default gpu_check/)
# Knobs (environment): PYTHON (default .venv/bin/python, else python), VTVC_BANK (default
# banks/embedded), GPU_CHECK_DEVICE (cuda), GPU_CHECK_STEPS (100), GPU_CHECK_BENCH_MODELS
# ([tiny,vit-b-32]), GPU_CHECK_TIMEOUT (seconds per phase, 150).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-gpu_check}
OUT=${OUT%/}
if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python}; fi
BANK=${VTVC_BANK:-banks/embedded}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=${GPU_CHECK_STEPS:-100}
BENCH_MODELS=${GPU_CHECK_BENCH_MODELS:-[tiny,vit-b-32]}
TIMEOUT=${GPU_CHECK_TIMEOUT:-150}
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1

mkdir -p "$OUT"
PHASES="$OUT/phases.jsonl"
: >"$PHASES"
FAILED=0

# phase NAME LIMIT CMD...: run CMD (a command or one of the functions below) for at most LIMIT seconds,
# its output in OUT/NAME.log; append {phase, exit_status, seconds} to OUT/phases.jsonl
phase() {
    local name=$1 limit=$2 rc=0 start ms
    shift 2
    echo "== $name" >&2
    start=$(date +%s%N)
    timeout --signal=TERM --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        echo "   failed (exit $rc$([[ $rc -eq 124 ]] && echo ", timed out after $limit s")); see $OUT/$name.log" >&2
    fi
    printf '{"phase": "%s", "exit_status": %d, "seconds": %d.%03d}\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) >>"$PHASES"
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
        >"$OUT/nvidia-smi.csv" 2>&1 || echo "nvidia-smi failed or is absent" >"$OUT/nvidia-smi.csv"
    "$PYTHON" - "$OUT/environment.json" "$DEVICE" <<'PY'
import json, platform, sys
from importlib.metadata import PackageNotFoundError, version
import torch
out, device = sys.argv[1], sys.argv[2]
def pkg(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
       "cuda_available": torch.cuda.is_available(), "device": device,
       "packages": {p: pkg(p) for p in ("open_clip_torch", "pyro-ppl", "torchvision", "vtvc_pyro")}}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
               capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count())
json.dump(env, open(out, "w"), indent=2)
print(json.dumps(env, indent=2))
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU: the CUDA phases will fail")
PY
}

build_bank() {
    if [[ -f "$BANK/manifest.json" ]]; then
        echo "reusing $BANK"
    else
        "$PYTHON" -m vtvc_pyro bank build --out "$BANK" --quiet
    fi
}

# a bf16-stored copy of the bank (vtvc bank has no dtype conversion for a whole bank folder)
bf16_bank() {
    "$PYTHON" - "$BANK" "$OUT/bank-bf16" <<'PY'
import json, shutil, sys
from pathlib import Path
from vtvc_pyro.bank.task_vectors import TaskVector
from vtvc_pyro.io import write_json
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if dst.exists():
    shutil.rmtree(dst)  # our own copy from an earlier check
(dst / "task_vectors").mkdir(parents=True)
manifest = json.loads((src / "manifest.json").read_text())
for name in ("base.safetensors", "heads.safetensors"):
    if (src / name).is_file():
        shutil.copy2(src / name, dst / name)
if (src / "features").is_dir():  # base features depend on the base model only
    shutil.copytree(src / "features", dst / "features")
for task, info in manifest["tasks"].items():
    TaskVector.load(src / info["file"]).save(dst / info["file"], "bfloat16")
manifest.setdefault("config", {})["dtype"] = "bfloat16"
write_json(dst / "manifest.json", manifest)
print(f"wrote {dst}: {len(manifest['tasks'])} task vectors in bfloat16")
PY
}

# fit NAME BANK: the embedded default (target mixed, every baseline), short, on DEVICE; records the peak memory
fit() {
    "$PYTHON" - "$2" "$OUT/$1" "$DEVICE" "$STEPS" <<'PY'
import json, sys, time
import torch
from vtvc_pyro.cli import main
bank, out, device, steps = sys.argv[1:5]
cuda = device.startswith("cuda") and torch.cuda.is_available()
if cuda:
    torch.cuda.reset_peak_memory_stats()
start = time.time()
rc = main(["fit", "--bank", bank, "--device", device, "--svi.steps", steps, "--svi.eval_every", str(max(1, int(steps) // 2)),
           "--out", out, "--overwrite", "--quiet"])
record = {"exit_status": rc, "seconds": round(time.time() - start, 2),
          "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
          "max_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None}
json.dump(record, open(f"{out}.memory.json", "w"), indent=2)
print(json.dumps(record))
sys.exit(rc)
PY
}

export OUT PYTHON BANK DEVICE STEPS
export -f environment build_bank bf16_bank fit  # timeout runs them in a child bash

phase environment 60 environment
phase bank 600 build_bank  # about 3 min on 2 cores when it has to be built
phase pytest_cuda "$TIMEOUT" "$PYTHON" -m pytest -q -m cuda -rs --junitxml "$OUT/pytest_cuda.xml" tests
phase bank_bf16 "$TIMEOUT" bf16_bank
phase fit_fp32 "$TIMEOUT" fit fit-fp32 "$BANK"
phase fit_bf16 "$TIMEOUT" fit fit-bf16 "$OUT/bank-bf16"
phase bench_composition "$TIMEOUT" "$PYTHON" scripts/bench_composition.py --device "$DEVICE" --models "$BENCH_MODELS" \
    --tasks "[2,8]" --batch "[8,32]" --repeats 3 --tiny_repeats 10 --out "$OUT/bench_composition.json"

"$PYTHON" - "$OUT" <<'PY' || FAILED=1
import json, sys, xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
out = Path(sys.argv[1])
def read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
phases = [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines() if line.strip()]
for p in phases:
    p["status"] = "ok" if p["exit_status"] == 0 else ("timed out" if p["exit_status"] == 124 else "failed")
    p["log"] = f"{p['phase']}.log"
summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "ok": all(p["exit_status"] == 0 for p in phases),
           "total_seconds": round(sum(p["seconds"] for p in phases), 1), "phases": phases,
           "environment": read(out / "environment.json"),
           "nvidia_smi": (out / "nvidia-smi.csv").read_text().strip() if (out / "nvidia-smi.csv").is_file() else None}
try:
    suite = ET.parse(out / "pytest_cuda.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    summary["pytest_cuda"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError):
    summary["pytest_cuda"] = None
fits = {}
for name in ("fit-fp32", "fit-bf16"):
    metrics = read(out / name / "metrics.json")
    fits[name] = {"memory": read(out / f"{name}.memory.json"), "timing": read(out / name / "timing.json"),
                  "test_accuracy": {m: v.get("accuracy") for m, v in (metrics or {}).get("methods", {}).items()} or None,
                  "best_val_nll": (metrics or {}).get("svi", {}).get("best_val_nll")}
summary["fits"] = fits
bench = read(out / "bench_composition.json")
if bench:
    rows = bench.get("rows", [])
    peaks = [r["fwd_bwd_peak_mib"] for r in rows if r.get("fwd_bwd_peak_mib") is not None]
    summary["bench_composition"] = {
        "meta": bench.get("meta"), "targets": bench.get("targets"), "rows": len(rows),
        "max_fwd_bwd_peak_mib": max(peaks) if peaks else None,
        "vit_b_32_t8_b32": {r["strategy"]: {k: r[k] for k in ("fwd_s", "fwd_bwd_s", "fwd_bwd_ratio", "fwd_bwd_peak_mib")}
                            for r in rows if r["model"] == "vit-b-32" and r["tasks"] == 8 and r["batch"] == 32}}
else:
    summary["bench_composition"] = None
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("ok", "total_seconds", "pytest_cuda")}, indent=None))
for p in phases:
    print(f"{p['phase']:18s} {p['status']:10s} {p['seconds']:8.1f} s")
print(f"wrote {out / 'summary.json'}")
PY

exit "$FAILED"
