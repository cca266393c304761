#!/usr/bin/env bash
# The GPU check of the merge executor and the signatures, in one run of at most 8 minutes on one GPU:
#
#   1. tests/test_cuda.py: every merge method, the executor (staging buffer, side stream, device chunks) and both
#      signature passes on the GPU give the CPU's results within rounding;
#   2. benchmarks/bench_merge.py on the GPU (ours only: mergekit is not installed there), bf16 and float32 configs.
#
# Writes benchmarks/results/gpu_check.json (test outcomes, device, versions, timings) and
# benchmarks/results/merge_gpu.json (the benchmark); --copy-to DIR copies both there as well. Without a CUDA GPU it
# says so and exits 0, writing nothing. --device cpu runs the same steps on the CPU into a temporary folder (to check
# the script itself on a machine without a GPU; --quick keeps that short).
#
#   bash benchmarks/gpu_check.sh [--copy-to DIR] [--device cpu] [--quick]
#
# Runs from a plain checkout: the package is taken from the repository (PYTHONPATH), and the only packages it
# needs are torch, numpy, safetensors, transformers, pyyaml, click, tqdm and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
DEVICE=cuda
BENCH_WORK=""
COPY_TO=""
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --copy-to) COPY_TO="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch (set PYTHON to the python that has it)" >&2
  exit 2
fi
if [ "$DEVICE" = cuda ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible to torch here; nothing checked, nothing written (skipped)"
    exit 0
  fi
  RESULTS="$ROOT/benchmarks/results"
  LAYERS=20
else
  RESULTS="$(mktemp -d)"
  LAYERS=2
  BENCH_WORK="$RESULTS/work"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
START=$(date +%s)

# 1. the CUDA tests (at most 4 minutes)
SELECT=()
if [ "$QUICK" = 1 ]; then SELECT=(-k "ties or linear or signatures"); fi
set +e
SIMMERGE_TEST_DEVICE="$DEVICE" SIMMERGE_HOME="$WORK/home" timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py "${SELECT[@]}" --junitxml="$WORK/junit.xml" 2>&1 | tee "$WORK/pytest.log"
TESTS_RC=${PIPESTATUS[0]}
set -e
TESTS_END=$(date +%s)

# 2. the merge benchmark on the device (at most 3 minutes; the family is generated first, once)
set +e
timeout 180 "$PY" benchmarks/bench_merge.py --device "$DEVICE" --no-mergekit --dtypes bfloat16,float32 \
  --methods linear,ties,dare_ties,slerp --layers "$LAYERS" --out "$RESULTS/merge_gpu.json" \
  ${BENCH_WORK:+--work "$BENCH_WORK"} 2>&1 \
  | tee "$WORK/bench.log"
BENCH_RC=${PIPESTATUS[0]}
set -e

"$PY" - "$WORK/junit.xml" "$RESULTS/gpu_check.json" "$DEVICE" "$TESTS_RC" "$BENCH_RC" \
  "$((TESTS_END - START))" "$(($(date +%s) - TESTS_END))" <<'EOF'
import json, platform, sys, xml.etree.ElementTree as ET
import torch
junit, out, device, tests_rc, bench_rc, tests_s, bench_s = sys.argv[1:]
cases = []
try:
    for tc in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = tc.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "")[:500]
                break
        else:
            detail = ""
        cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome,
                      "seconds": float(tc.get("time") or 0), **({"detail": detail} if detail else {})})
except (OSError, ET.ParseError) as e:
    cases.append({"test": "(junit report)", "outcome": "error", "detail": str(e)})
counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
cuda = torch.cuda.is_available() and device.startswith("cuda")
res = {"device": device, "gpu": torch.cuda.get_device_name(0) if cuda else None,
       "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "tests": {"exit_code": int(tests_rc), "seconds": int(tests_s), **counts, "cases": cases},
       "benchmark": {"exit_code": int(bench_rc), "seconds": int(bench_s), "results": "merge_gpu.json"},
       "ok": int(tests_rc) == 0 and int(bench_rc) == 0 and counts["passed"] > 0}
open(out, "w").write(json.dumps(res, indent=2) + "\n")
print(f"gpu_check: tests {counts} (exit {tests_rc}, {tests_s} s), benchmark exit {bench_rc} ({bench_s} s) "
      f"-> {out}")
EOF
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO"
  cp "$RESULTS/gpu_check.json" "$COPY_TO/"
  [ -f "$RESULTS/merge_gpu.json" ] && cp "$RESULTS/merge_gpu.json" "$COPY_TO/"
fi
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
