#!/usr/bin/env bash
# One call on a GPU machine: build easgd_ext with CUDA for the local GPU, run every test (the
# CUDA ones included), then the kernel bandwidth, NCCL latency and asynchronous-exchange
# benchmarks on the GPU. Logs and JSON go to
# $OUT (the device tool's output folder) or ./gpu-out. From the repository root:
#     bash benchmarks/gpu_session.sh
# On the lent H100/H200 (no package registry there; its image has torch, pybind11, cmake, ninja):
#     device run: bash benchmarks/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/machine.txt"

arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
echo "== build (sm_${arch/./}) =="
time EASGD_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" \
  python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import easgd_ext; print(easgd_ext.build_info())" | tee -a "$OUT/machine.txt"

echo "== tests =="
(cd python_tests && python3 -m pytest -q -ra 2>&1 | tee "$OUT/tests.log" | tail -25)

echo "== kernel bandwidth (GPU) =="
python3 benchmarks/kernel_bandwidth.py --device cuda --numel 16777216 25557032 124000000 \
  --dtype float32 bfloat16 float16 --json "$OUT/kernel_bandwidth_cuda.json" 2>&1 | tee "$OUT/bench.log"

echo "== exchange latency (NCCL, world 1 per GPU present) =="
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 benchmarks/comm_latency.py --device cuda --worlds $(seq 1 "$ngpu" | tr '\n' ' ') \
  --sizes 1e6 1e7 25557032 --json "$OUT/comm_latency_cuda.json" 2>&1 | tee "$OUT/comm.log"

echo "== asynchronous exchange: CUDA parameters, shared pinned center (target: 1.3x the overlapped PCIe floor) =="
python3 benchmarks/comm_latency.py --mode async --device cuda --sizes 1e6 1e7 2.56e7 \
  --json "$OUT/async_cuda.json" 2>&1 | tee "$OUT/async_cuda.log"

echo "== asynchronous exchange: CPU parameters, concurrent workers, sharded center over Gloo =="
python3 benchmarks/comm_latency.py --mode async --sizes 1e6 1e7 2.56e7 --scaling --sharded \
  --json "$OUT/async_cpu.json" 2>&1 | tee "$OUT/async_cpu.log"
