#!/usr/bin/env bash
# The device harness in one command (on a machine with a CUDA GPU, nvcc, CMake and Python with
# torch; no JDK needed): build libgspo4j with its CUDA kernels, check every kernel against float64
# references, time them against torch eager and torch.compile. Extra arguments go to harness.py
# (e.g. --cases 16x1024x151936:bf16 --baselines eager). Results land in $OUT (default
# bench/gpu/out): gpu-results.md (the table, printed last), gpu-results.json, the logs.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${OUT:-$root/bench/gpu/out}"
build="${GSPO4J_BUILD:-$root/build-gpu}"
mkdir -p "$out"
# The compiler's resource report (registers, spills, shared memory) goes with the results.
cmake -S "$root/cmake" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGSPO4J_CUDA=ON "-DCMAKE_CUDA_FLAGS=-Xptxas=-v" \
  > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" >> "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total --format=csv > "$out/gpu.csv" 2>&1 || true
commit="${GSPO4J_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
GSPO4J_COMMIT="$commit" python3 "$root/bench/gpu/harness.py" --lib "$build/libgspo4j.so" --out "$out" "$@"
