#!/usr/bin/env bash
# One call on a GPU machine: check the tools, build easgd_ext with CUDA for the local GPU, run
# the GPU tests (CUDA, NCCL, the FSDP2 one-GPU test, the build tests), then the GPU benchmarks
# and the main job on the GPU, most important first. What comes back is two files in $OUT (the
# device tool brings back at most 8): summary.txt (status, time and the tail of each stage's
# log; also printed at the end) and session.tar.gz (every log, JSON and plot).
#
#     bash benchmarks/gpu_session.sh                 # every stage
#     bash benchmarks/gpu_session.sh kernels step    # only these (after a build in this machine)
#     GPU_SESSION_DRY_RUN=1 bash benchmarks/gpu_session.sh   # print the plan, run nothing
#
# Stages: machine build tests kernels comm step async train_sync train_async.
# For a machine with no package registry (python3, torch + CUDA, nvcc, setuptools, pybind11,
# cmake, ninja, pytest, pytest-xdist, tqdm, matplotlib, scikit-learn present: the machine stage
# names what is missing in one line). Each stage runs under `timeout`; the stages' limits add
# up to at most DEADLINE seconds (default 480: a fresh H100/H200 call of 10 minutes, with its
# start and transfers), and the session stops any stage at the DEADLINE. A failing stage does
# not stop the others; the script exits non-zero at the end if any failed (a failed build
# stops it: nothing else can run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
DEADLINE=${DEADLINE:-480}
DRY_RUN=${GPU_SESSION_DRY_RUN:-0}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # the stages' files, archived into $OUT/session.tar.gz at the end
export PYTHONUNBUFFERED=1
export TQDM_DISABLE=1
ALL_STAGES=(machine build tests kernels comm step async train_sync train_async)
if [ "$#" -gt 0 ]; then STAGES=("$@"); else STAGES=("${ALL_STAGES[@]}"); fi
FAILED=()
: > "$WORK/stages.tsv"

wanted() {
  local s
  for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}

# stage NAME LIMIT_S COMMAND...: runs COMMAND with its output in $WORK/NAME.log, killed after
# LIMIT_S seconds (or when the session's DEADLINE comes first); records its status; never fails.
stage() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  local log="$WORK/$name.log" start=$SECONDS rc=0
  if [ "$DRY_RUN" = 1 ]; then
    echo "== $name (limit ${limit}s): $*" | tee "$log"
  elif [ "$limit" -le 0 ]; then
    echo "== $name: skipped, the session's ${DEADLINE}s are spent" | tee "$log"
    rc=125
  else
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || rc=$?
  fi
  local took=$((SECONDS - start))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >> "$WORK/stages.tsv"
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
    printf '%-12s %-10s %6s %6s\n' stage status seconds limit
    while IFS=$'\t' read -r name rc took limit; do
      printf '%-12s %-10s %6s %6s\n' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "FAIL($rc)")" "$took" "$limit"
    done < "$WORK/stages.tsv"
    while IFS=$'\t' read -r name rc took limit; do
      echo
      echo "---- $name: last lines of $name.log ----"
      tail -n 14 "$WORK/$name.log" 2>/dev/null || true
    done < "$WORK/stages.tsv"
    echo
    if [ "${#FAILED[@]}" -eq 0 ]; then echo "all stages passed"; else echo "FAILED: ${FAILED[*]}"; fi
    echo "logs, JSON and plots in $OUT/session.tar.gz"
  } | tee "$OUT/summary.txt"
  cp "$OUT/summary.txt" "$WORK/summary.txt"
  tar -czf "$OUT/session.tar.gz" -C "$WORK" .
  rm -rf "$WORK"
}

# Shell functions run under `timeout` through `bash -c` (hence export -f).
machine_info() {
  set -euo pipefail
  date -u
  local missing=()
  for tool in nvcc cmake ninja nvidia-smi; do command -v "$tool" > /dev/null || missing+=("$tool"); done
  for module in torch setuptools pybind11 pytest xdist tqdm matplotlib sklearn; do
    python3 -c "import $module" 2> /dev/null || missing+=("python:$module")
  done
  if [ "${#missing[@]}" -gt 0 ]; then echo "missing: ${missing[*]}"; exit 1; fi
  echo "nvcc $(nvcc --version | tail -n 1); $(cmake --version | head -n 1); ninja $(ninja --version)"
  python3 -c "import setuptools, pybind11; print('setuptools', setuptools.__version__, 'pybind11', pybind11.__version__)"
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
# Limits: 15 + 180 + 100 + 50 + 30 + 40 + 25 + 20 + 15 = 475 <= DEADLINE.
stage machine 15 bash -c machine_info
stage build 180 bash -c build
if wanted build && [ "$(tail -n 1 "$WORK/stages.tsv" | cut -f2)" != 0 ]; then
  summary
  exit 1
fi

# The CUDA-parametrized tests, the NCCL ones, the FSDP2 one-GPU test and the build tests (the
# whole suite takes ~7 minutes).
stage tests 100 python3 -m pytest -q -ra -n 8 -p no:cacheprovider python_tests \
  -k "cuda or nccl or gpu or test_build"

# Every fused kernel, the 8-bit wire's send and apply included, against the copy ceiling.
stage kernels 50 python3 -m easgd_ext.bench kernels --device cuda \
  --numel 25557032 124000000 --dtype float32 bfloat16 \
  --json "$WORK/kernels_cuda.json"

# One exchange (fp32, bf16, int8 wires, one fragment of four) and its host-blocking time.
stage comm 30 python3 -m easgd_ext.bench comm --device cuda --worlds 1 \
  --sizes resnet50 resnet50:1 1e7 --reps 21 --json "$WORK/comm_cuda.json"

# A training step with the blocking and the streamed exchange (fragments=tau, delay=1): how long
# avg.step() blocks the host (target: <= 0.05 ms per step), peak bytes per step.
stage step 40 python3 -m easgd_ext.bench step --device cuda --rounds 8 --json "$WORK/step_cuda.json"

stage async 25 python3 -m easgd_ext.bench async --device cuda \
  --sizes 1e6 1e7 2.56e7 --json "$WORK/async_cuda.json"

# The main job on the GPU: 4 ranks share the one GPU (Gloo), every algorithm.
stage train_sync 20 python3 -m easgd_ext.train --device cuda --steps 150 \
  --json "$WORK/train_sync.json" --plot "$WORK/train_sync.png"
stage train_async 15 python3 -m easgd_ext.train --device cuda --steps 150 --mode async \
  --json "$WORK/train_async.json" --plot "$WORK/train_async.png"

summary
[ "${#FAILED[@]}" -eq 0 ]
