#!/usr/bin/env bash
# GPU run of the whole project, from the repository root of a GPU machine (`make gpu-check`):
#   1. install the wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh) into /tmp/site,
#   2. build xlt_fast._C with its CUDA kernels (editable install with the machine's torch),
#   3. record the environment (GPU, driver, versions, date, commit),
#   4. run the test suite with the GPU visible (Triton and CUDA kernels on the GPU),
#   5. run `xlt-fast bench --device cuda`,
# writing everything to benchmarks/results/gpu-<date>-<gpu>/ (and copying it to $OUT when set:
# at most 8 files, flat). Every step is time-bounded so the whole run ends within the budget.
#
# usage: scripts/gpu_check.sh [--quick] [--skip-build] [--dry]
#   --quick       quick benchmark grid (default: full, still bounded by the budget)
#   --skip-build  use the extension already built/installed
#   --dry         rehearsal on a machine without a GPU: no wheels, CPU benchmark (--quick), no GPU checks
# env: PYTHON (python3), XLT_GPU_CHECK_BUDGET (seconds for the whole run, 510), XLT_PYTEST_ARGS (extra pytest flags),
#      XLT_PYTEST_TARGET (python_tests), XLT_BENCH_OPS (all), XLT_GIT_COMMIT (recorded commit when
#      the machine's copy has no .git)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
BUDGET="${XLT_GPU_CHECK_BUDGET:-510}"
QUICK=0 SKIP_BUILD=0 DRY=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --dry) DRY=1; QUICK=1 ;;
    *) echo "unknown argument: $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET   # conftest sets it only without a GPU; an inherited one would hide the GPU path
left() { echo $((BUDGET - SECONDS)); }
step() { printf '\n=== [%3ds] %s\n' "$SECONDS" "$*"; }

STAMP="$(date -u +%Y%m%d-%H%M)"
if [ "$DRY" = 1 ]; then
  GPU_NAME="dry-run-no-gpu"
else
  GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
  [ -n "$GPU_NAME" ] || { echo "nvidia-smi finds no GPU; use --dry for a rehearsal without one" >&2; exit 1; }
fi
SLUG="$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')"
RES="benchmarks/results/gpu-$STAMP-$SLUG"
mkdir -p "$RES"
BUILD_RC=skipped PYTEST_RC=skipped BENCH_RC=skipped

# 1. carried wheels ---------------------------------------------------------------------------------
step "wheels"
if [ "$DRY" = 1 ]; then
  echo "dry run: wheels not installed (they are for the GPU machine's Python 3.12)"
elif compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    && echo "installed into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
else
  echo "WARNING: no wheels in .whl/ (run scripts/fetch_gpu_wheels.sh here and carry .whl): peer tests will skip"
fi

# 2. build -----------------------------------------------------------------------------------------
# An editable install (not build_ext --inplace): package_dir maps kernels/ and benchmarks/ to
# xlt_fast.kernels and xlt_fast.benchmarks, which only an installed package resolves.
step "build xlt_fast._C (MAX_JOBS=${MAX_JOBS:-16}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
if [ "$SKIP_BUILD" = 0 ]; then
  MAX_JOBS="${MAX_JOBS:-16}" timeout 300 "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
    >"$RES/build.log" 2>&1
  BUILD_RC=$?
  echo "build rc=$BUILD_RC in $SECONDS s (log: $RES/build.log)"
  [ "$BUILD_RC" = 0 ] || tail -n 40 "$RES/build.log"
fi

# 3. environment -----------------------------------------------------------------------------------
step "environment"
COMMIT="${XLT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git here; set XLT_GIT_COMMIT)")}"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $COMMIT"
  echo "host: $(uname -srm), $(nproc) CPUs"
  echo "mode: $([ "$DRY" = 1 ] && echo dry || echo gpu), bench $([ "$QUICK" = 1 ] && echo quick || echo full)"
  if [ "$DRY" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    nvcc --version 2>/dev/null | tail -n 2
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU visible: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
for name in ("triton", "numpy", "pytest", "pytorch-metric-learning", "geomloss", "pot", "nflows", "normflows"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
try:
    from xlt_fast import _backend
    print(f"xlt_fast._C: built={_backend.has_extension()}, CUDA kernels={_backend.has_cuda_kernels()}")
except Exception as err:  # the summary must still be written
    print(f"xlt_fast import failed: {type(err).__name__}: {err}")
EOF
} >"$RES/env.txt" 2>&1
cat "$RES/env.txt"

# 4. tests -----------------------------------------------------------------------------------------
TIMEOUT_FLAG=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG=(--timeout 120)   # per test
step "pytest, one process per file (until $(( $(left) - 150 ))s are used)"
if [ "$BUILD_RC" = 0 ] || [ "$BUILD_RC" = skipped ]; then
  # One process per test file: a crash in one file (a segfault is possible in native code) costs
  # that file, not the run. The model/data tests need the offline asset packages, which are not
  # carried to the GPU machine (CI runs them); they exercise no GPU kernel.
  if [ -n "${XLT_PYTEST_TARGET:-}" ]; then TARGETS=($XLT_PYTEST_TARGET); else
    TARGETS=($(ls python_tests/test_*.py | grep -v -E "test_(models|data)\.py$")); fi
  PYTEST_RC=0
  : >"$RES/pytest.log"
  for t in "${TARGETS[@]}"; do
    [ "$(left)" -gt 160 ] || { echo "SKIPPED (time) $t" >>"$RES/pytest.log"; PYTEST_RC=1; continue; }
    echo "=== $t" >>"$RES/pytest.log"
    # shellcheck disable=SC2086
    timeout $(( $(left) - 150 )) "$PY" -X faulthandler -m pytest "$t" -q -rfE ${XLT_PYTEST_ARGS:-} \
      "${TIMEOUT_FLAG[@]}" -p no:cacheprovider >>"$RES/pytest.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 5 ] || { PYTEST_RC=$rc; echo "=== $t exited $rc" >>"$RES/pytest.log"; }
  done
  grep -E "^(=== |[0-9]+ (passed|failed)|FAILED|ERROR)" "$RES/pytest.log" | tail -n 40
fi

# 5. benchmarks ------------------------------------------------------------------------------------
BENCH_LIMIT=$(( $(left) - 15 ))
if [ "$QUICK" = 0 ] && [ "$BENCH_LIMIT" -lt 150 ]; then
  echo "only ${BENCH_LIMIT}s left: quick benchmark grid instead of the full one"
  QUICK=1
fi
BENCH_ARGS=(--device "$([ "$DRY" = 1 ] && echo cpu || echo cuda)" --out "$RES")
[ "$QUICK" = 1 ] && BENCH_ARGS+=(--quick)
[ -n "${XLT_BENCH_OPS:-}" ] && BENCH_ARGS+=(--ops "$XLT_BENCH_OPS")
step "xlt-fast bench ${BENCH_ARGS[*]} (at most ${BENCH_LIMIT}s)"
if [ "$BENCH_LIMIT" -gt 20 ] && { [ "$BUILD_RC" = 0 ] || [ "$BUILD_RC" = skipped ]; }; then
  timeout "$BENCH_LIMIT" "$PY" -m xlt_fast.cli bench "${BENCH_ARGS[@]}" >"$RES/bench.log" 2>&1
  BENCH_RC=$?
  [ "$BENCH_RC" = 124 ] && echo "benchmark stopped at its time limit: rows so far are in bench.log" >>"$RES/bench.log"
fi

# summary ------------------------------------------------------------------------------------------
{
  echo "xlt_fast GPU check: $GPU_NAME, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT, ${SECONDS}s"
  grep -E "^(python|xlt_fast)" "$RES/env.txt"
  echo "build rc=$BUILD_RC | pytest rc=$PYTEST_RC | bench rc=$BENCH_RC"
  [ -f "$RES/pytest.log" ] && grep -E "^(FAILED|ERROR) |exited" "$RES/pytest.log" | head -n 20
  [ -f "$RES/bench.log" ] && grep -vE "^(wrote|xlt-fast bench)" "$RES/bench.log" | grep -v "^$" | tail -n 60
  echo "results: $RES/ ($(cd "$RES" && ls | tr '\n' ' '))"
} >"$RES/summary.txt"
if [ -n "${OUT:-}" ]; then
  cp "$RES"/* "$OUT"/ && echo "copied to \$OUT: $(ls "$OUT" | wc -l) files" >>"$RES/summary.txt"
fi
step "summary"
cat "$RES/summary.txt"
[ "$BUILD_RC" != 0 ] && [ "$BUILD_RC" != skipped ] && exit 1
[ "$PYTEST_RC" = 0 ] || [ "$PYTEST_RC" = skipped ] || exit 1
exit 0
