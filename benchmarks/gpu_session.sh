#!/usr/bin/env bash
# One call on a GPU machine: build easgd_ext with CUDA for the local GPU, run the CUDA tests
# (and the build tests), then every GPU benchmark and the main job on the GPU. Every log and
# JSON goes to $OUT (the device tool's output folder) or ./gpu-out; a summary table (status,
# time and the tail of each stage's log) ends the output and is saved as $OUT/summary.txt.
#
#     bash benchmarks/gpu_session.sh                 # every stage
#     bash benchmarks/gpu_session.sh kernels step    # only these (after a build in this machine)
#
# Stages: machine build tests kernels comm step async train_sync train_async study.
# For a machine with no package registry (python3, torch + CUDA, pybind11, cmake, ninja, pytest,
# pytest-xdist, tqdm, matplotlib, scikit-learn present). Each stage runs under `timeout`, and
# the whole session under DEADLINE seconds (default 560: inside a 10-minute device call), so a
# hang costs one stage, not the session. A failing stage does not stop the others; the script
# exits non-zero at the end if any failed (a failed build stops it: nothing else can run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
DEADLINE=${DEADLINE:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TQDM_DISABLE=1
ALL_STAGES=(machine build tests kernels comm step async train_sync train_async study)
if [ "$#" -gt 0 ]; then STAGES=("$@"); else STAGES=("${ALL_STAGES[@]}"); fi
FAILED=()
: > "$OUT/stages.tsv"

wanted() {
  local s
  for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}

# stage NAME LIMIT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log, killed after
# LIMIT_S seconds (or when the session's DEADLINE comes first); records its status; never fails.
stage() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  local log="$OUT/$name.log" start=$SECONDS rc=0
  if [ "$limit" -le 0 ]; then
    echo "== $name: skipped, the session's ${DEADLINE}s are spent" | tee "$log"
    rc=125
  else
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || rc=$?
  fi
  local took=$((SECONDS - start))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >> "$OUT/stages.tsv"
  if [ "$rc" -eq 0 ]; then
    echo "   ok in ${took}s"
  else
    FAILED+=("$name")
    echo "   FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ': timed out')) after ${took}s; last lines:"
    tail -n 15 "$log" | sed 's/^/   | /'
  fi
  return 0
}

summary() {
  {
    echo
    echo "================ summary ($(date -u +%FT%TZ), ${SECONDS}s) ================"
    printf '%-12s %-10s %6s\n' stage status seconds
    while IFS=$'\t' read -r name rc took; do
      printf '%-12s %-10s %6s\n' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "FAIL($rc)")" "$took"
    done < "$OUT/stages.tsv"
    while IFS=$'\t' read -r name rc took; do
      echo
      echo "---- $name: last lines of $name.log ----"
      tail -n 14 "$OUT/$name.log" 2>/dev/null || true
    done < "$OUT/stages.tsv"
    echo
    if [ "${#FAILED[@]}" -eq 0 ]; then echo "all stages passed"; else echo "FAILED: ${FAILED[*]}"; fi
    echo "logs and JSON in $OUT"
  } | tee "$OUT/summary.txt"
}

# Shell functions run under `timeout` through `bash -c` (hence export -f).
machine_info() {
  set -euo pipefail
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

build() {
  set -euo pipefail
  local arch
  arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  echo "building for sm_${arch/./}"
  EASGD_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" \
    python3 -m pip install --no-build-isolation --no-deps .
  cd /tmp && python3 -c "import easgd_ext; print(easgd_ext.build_info())"
}

export -f machine_info build
stage machine 60 bash -c machine_info
stage build 240 bash -c build
if wanted build && [ "$(tail -n 1 "$OUT/stages.tsv" | cut -f2)" != 0 ]; then
  summary
  exit 1
fi

# The CUDA-parametrized tests and the build tests (the whole suite takes ~7 minutes).
stage tests 180 python3 -m pytest -q -ra -n 8 -p no:cacheprovider python_tests -k "cuda or nccl or test_build"

# Every fused kernel, the 8-bit wire's send and apply included, against the copy ceiling.
stage kernels 150 python3 -m easgd_ext.bench kernels --device cuda \
  --numel 25557032 124000000 --dtype float32 bfloat16 float16 \
  --json "$OUT/kernels_cuda.json"

# One exchange (fp32, bf16, int8 wires, one fragment of four) and its host-blocking time.
stage comm 90 python3 -m easgd_ext.bench comm --device cuda --worlds 1 \
  --sizes resnet50 resnet50:1 1e7 --reps 21 --json "$OUT/comm_cuda.json"

# A training step with the blocking and the streamed exchange (fragments=tau, delay=1): how long
# avg.step() blocks the host (target: <= 0.05 ms per step), peak bytes per step.
stage step 150 python3 -m easgd_ext.bench step --device cuda --json "$OUT/step_cuda.json"

stage async 150 python3 -m easgd_ext.bench async --device cuda \
  --sizes 1e6 1e7 2.56e7 --scaling --json "$OUT/async_cuda.json"

# The main job on the GPU: 4 ranks share the one GPU (Gloo), every algorithm.
stage train_sync 120 python3 -m easgd_ext.train --device cuda --steps 300 \
  --json "$OUT/train_sync.json" --plot "$OUT/train_sync.png"
stage train_async 120 python3 -m easgd_ext.train --device cuda --steps 300 --mode async \
  --json "$OUT/train_async.json" --plot "$OUT/train_async.png"

# The convergence study's pipeline on the GPU (its quick grid: simulated workers on one device).
stage study 120 python3 -m easgd_ext.study --quick --device cuda --json "$OUT/study_quick.json" \
  --plot-dir "$OUT"

summary
[ "${#FAILED[@]}" -eq 0 ]
