#!/usr/bin/env bash
# The one GPU check of lens_fast (docs: shared/docs/gpu-checks.md). In one go, under 8 minutes:
#   1. card, driver, torch / triton / CUDA versions
#   2. diffusers from a shipped wheel (wheels/ or bench/wheels/, no network) when present
#   3. the CUDA extension built for THIS card's architecture only
#   4. the GPU tests (pytest -m cuda; bf16/fp8 included)
#   5. the card's ceilings, measured once (copy GB/s, bf16 / fp8 matmul TFLOP/s)
#   6. bench/ops.py, then bench/profile_step.py, attention.py, train_step.py, pipeline.py, fp8.py
#      if present
#   7. summary.md + gpu_check.json (and every suite's own JSON/markdown) in the results folder
# Usage: bash bench/gpu_check.sh [RESULTS_DIR]   (default: $OUT, else bench/results/gpu_check_<date>)
# Every step runs under a timeout carved from one overall deadline, so a slow suite is cut
# (and reported as such) instead of pushing the run past the window.
# GPU_CHECK_DRY_RUN=1 rehearses the flow on a CPU (no build, no GPU tests, suites with
# --dry-run); GPU_CHECK_SUITES overrides the list of other suites (default below).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${1:-${OUT:-$ROOT/bench/results/gpu_check_$(date +%Y%m%d_%H%M%S)}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
# PYTHON, else the checkout's .venv (what `make venv` builds), else python3 from PATH.
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
SUITES="${GPU_CHECK_SUITES-profile_step attention train_step pipeline fp8}"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
STEPS="$RESULTS/steps.tsv"
printf "step\tstatus\tseconds\tlog\n" > "$STEPS"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

say() { printf '\n=== %s (t=%ss)\n' "$*" "$(( $(date +%s) - START ))"; }

# run_step NAME CAP_SECONDS CMD...: runs CMD under min(CAP, time left - 15 s), logs to
# RESULTS/NAME.log (and the console), records status and duration in steps.tsv.
run_step() {
  local name="$1" cap="$2"; shift 2
  local left=$((DEADLINE - $(date +%s) - 15))
  local log="$RESULTS/$name.log"
  if (( left < 20 )); then
    say "$name: skipped (out of time)"
    printf "%s\tskipped (out of time)\t0\t%s\n" "$name" "$log" >> "$STEPS"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  say "$name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local status="ok"
  (( rc == 124 || rc == 137 )) && status="timeout after ${limit}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (rc=$rc)"
  printf "%s\t%s\t%s\t%s\n" "$name" "$status" "$(( $(date +%s) - t0 ))" "$log" >> "$STEPS"
  say "$name: $status"
  return 0
}

# --out of each suite: a folder if its --help says so, else a JSON file in the folder.
out_args() {
  local script="$1" name
  name="$(basename "$script" .py)"
  if "$PY" "$script" --help 2>/dev/null | tr '\n' ' ' | grep -Eiq -- "--out[^-]*(folder|directory|dir\b)"; then
    echo "--out $RESULTS"
  else
    echo "--out $RESULTS/$name.json"
  fi
}

say "1. card and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$RESULTS/nvidia-smi.txt"
"$PY" - <<'EOF' 2>&1 | tee "$RESULTS/versions.txt"
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.1f} GiB")
else:
    print("NO CUDA DEVICE VISIBLE")
EOF
ARCH="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))' 2>/dev/null)"
BENCH_FLAGS=()
if [[ "$DRY" == 1 ]]; then
  ARCH="none (dry run)"
  BENCH_FLAGS=(--dry-run)
elif [[ -z "$ARCH" ]]; then
  echo "no CUDA device: nothing to check" | tee -a "$RESULTS/versions.txt"
  exit 1
fi

say "2. diffusers wheel"
WHEEL="$(ls "$ROOT"/wheels/diffusers-*.whl "$ROOT"/bench/wheels/diffusers-*.whl 2>/dev/null | head -n 1 || true)"
if "$PY" -c "import diffusers" 2>/dev/null; then
  echo "diffusers already importable"
elif [[ -n "$WHEEL" ]]; then
  run_step install_diffusers 60 "$PY" -m pip install --no-index --no-deps --quiet "$WHEEL"
else
  echo "no diffusers wheel in wheels/ or bench/wheels/: suites that need it will say so"
fi

if [[ "$DRY" != 1 ]]; then
  say "3. CUDA extension for sm_$ARCH"
  run_step build 240 env LENS_FAST_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  if ! "$PY" -c "import lens_fast._C" 2>/dev/null; then
    # an editable install that left the extension outside the source tree: build it in place
    run_step build_inplace 180 env LENS_FAST_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" setup.py build_ext --inplace
  fi
  "$PY" -c "import lens_fast._C as c; print('lens_fast._C:', c.__file__)" 2>&1 | tee -a "$RESULTS/build.log"

  say "4. GPU tests"
  run_step pytest_cuda 150 env LENS_FAST_REQUIRE_CUDA_EXT=1 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider \
    --junitxml="$RESULTS/pytest_cuda.xml" tests
fi

say "5-6. ceilings and benchmark suites"
run_step ceilings 60 "$PY" bench/ops.py --only-ceilings --out "$RESULTS" "${BENCH_FLAGS[@]}"
run_step ops "${GPU_CHECK_OPS_CAP_S:-120}" "$PY" bench/ops.py --out "$RESULTS" --ceilings-json "$RESULTS/ceilings.json" "${BENCH_FLAGS[@]}"
for suite in $SUITES; do
  script="bench/$suite.py"
  if [[ ! -f "$script" ]]; then
    printf "%s\tabsent\t0\t-\n" "$suite" >> "$STEPS"
  elif [[ "$DRY" == 1 ]] && ! "$PY" "$script" --help 2>/dev/null | grep -q -- "--dry-run"; then
    printf "%s\tskipped (no --dry-run)\t0\t-\n" "$suite" >> "$STEPS"
  else
    # shellcheck disable=SC2046 - out_args is two words on purpose
    run_step "$suite" "${GPU_CHECK_SUITE_CAP_S:-100}" "$PY" "$script" $(out_args "$script") "${BENCH_FLAGS[@]}"
  fi
done

say "7. summary"
"$PY" - "$RESULTS" "$(( $(date +%s) - START ))" <<'EOF'
import csv, glob, json, os, sys
res, total = sys.argv[1], int(sys.argv[2])
read = lambda p: open(p, encoding="utf-8").read().strip() if os.path.isfile(p) else ""
steps = list(csv.DictReader(open(os.path.join(res, "steps.tsv"), encoding="utf-8"), delimiter="\t"))
lines = ["# lens_fast GPU check", "", "```", read(os.path.join(res, "versions.txt")),
         read(os.path.join(res, "nvidia-smi.txt")), "```", "", f"Total {total} s.", "",
         "| step | status | seconds |", "|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
tail = [l for l in read(os.path.join(res, "pytest_cuda.log")).splitlines() if " passed" in l or " failed" in l
        or " error" in l]
if tail:
    lines += ["", f"GPU tests: {tail[-1].strip()}"]
ceil = os.path.join(res, "ceilings.json")
if os.path.isfile(ceil):
    lines += ["", "Ceilings: " + json.dumps(json.load(open(ceil, encoding="utf-8")))]
for md in sorted(glob.glob(os.path.join(res, "*.md"))):
    if os.path.basename(md) != "summary.md":
        lines += ["", "---", "", read(md)]
jsons = {os.path.basename(p): json.load(open(p, encoding="utf-8")) for p in sorted(glob.glob(os.path.join(res, "*.json")))
         if os.path.basename(p) != "gpu_check.json"}
with open(os.path.join(res, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(res, "gpu_check.json"), "w", encoding="utf-8") as f:
    json.dump({"total_s": total, "steps": steps, "results": jsons}, f, indent=1)
print("\n".join(lines[:12 + len(steps)]))
print(f"wrote {res}/summary.md and gpu_check.json")
EOF
