// The emulator's self-test: kernels with seeded bugs, one per detector, each of which must be
// reported (and a correct kernel must not be). Written in CUDA as the kernels of cuda/ are, and
// compiled only for the emulator.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "simt.h"

// The macros of cuda/common.cuh, as the kernels see them.
#ifndef GSPO4J_LAUNCH
#error "the emulator's cuda_runtime.h defines GSPO4J_LAUNCH"
#endif

namespace {

int passed = 0;
int failed = 0;

void expect(bool ok, const std::string& what) {
    if (ok) {
        ++passed;
    } else {
        ++failed;
        std::printf("FAIL %s\n", what.c_str());
    }
}

// Runs `launch`, then requires a misuse report containing `needle` (or none when it is empty)
// and, for a reported misuse, that the launch failed with cudaErrorLaunchFailure or
// cudaErrorInvalidConfiguration.
template <typename Launch>
void expect_report(const char* name, const char* needle, Launch launch) {
    simt::take_misuses();
    cudaGetLastError();
    launch();
    const cudaError_t status = cudaGetLastError();
    const std::vector<std::string> misuses = simt::take_misuses();
    std::string all;
    for (const std::string& m : misuses) all += m + "\n";
    if (needle[0] == '\0') {
        expect(misuses.empty() && status == cudaSuccess, std::string(name) + ": a correct kernel was reported: " + all);
        return;
    }
    const bool found = all.find(needle) != std::string::npos;
    expect(found && status != cudaSuccess,
           std::string(name) + ": expected a report containing \"" + needle + "\" and a failed launch, got status " +
               cudaGetErrorName(status) + " and: " + (all.empty() ? "no report" : all));
    if (found) std::printf("ok   %-34s %s", name, misuses[0].substr(0, 200).append("\n").c_str());
}

// ---- Seeded bugs ----------------------------------------------------------------------------------

__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Correct: a block reduction through shared memory.
__global__ void correct_kernel(float* out) {
    GSPO4J_SHARED(float, partial, 32);
    const float v = warp_sum(static_cast<float>(threadIdx.x));
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0;
        for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
        out[blockIdx.x] = total;
    }
}

// Thread 0 leaves before the others reach the barrier.
__global__ void early_exit_kernel(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// The others wait at a barrier that thread 0 never reaches (it exits after they arrive).
__global__ void exit_while_waiting_kernel(float* out) {
    if (threadIdx.x != 0) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Two barriers at different lines, chosen by thread.
__global__ void divergent_barrier_kernel(float* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// A full mask in a block of 48 threads: the second warp has 16 lanes.
__global__ void absent_lane_kernel(float* out) { out[threadIdx.x] = warp_sum(1.0f); }

// Lane 31 has exited when the rest shuffle with a full mask.
__global__ void exited_lane_kernel(float* out) {
    if (threadIdx.x == 31) return;
    out[threadIdx.x] = warp_sum(1.0f);
}

// Lanes pass different masks to one shuffle.
__global__ void mask_mismatch_kernel(float* out) {
    const unsigned mask = threadIdx.x < 16 ? 0xffffffffu : 0xffff0000u;
    out[threadIdx.x] = __shfl_xor_sync(mask, 1.0f, 1);
}

// A lane that reads a lane its mask leaves out.
__global__ void unnamed_source_kernel(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 16);
}

// Lane 5 waits at the barrier, the rest of its warp in a shuffle that needs lane 5: nobody moves.
__global__ void deadlock_kernel(float* out) {
    if (threadIdx.x == 5) {
        __syncthreads();
    } else {
        out[threadIdx.x] = warp_sum(1.0f);
        __syncthreads();
    }
}

// A 16-byte load one float off its boundary.
__global__ void misaligned_kernel(const float* in, float* out) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(in + 1));
    out[threadIdx.x] = __uint_as_float(v.x);
}

// Static shared memory over 48 KiB.
__global__ void big_shared_kernel(float* out) {
    GSPO4J_SHARED(double, big, 6200);  // 49,600 bytes
    big[threadIdx.x] = 1.0;
    __syncthreads();
    out[threadIdx.x] = static_cast<float>(big[0]);
}

// Reads shared memory no thread wrote: the result is the poison.
__global__ void uninitialised_shared_kernel(float* out) {
    GSPO4J_SHARED(float, partial, 32);
    if (threadIdx.x < 16) partial[threadIdx.x] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0;
        for (int w = 0; w < 32; ++w) total += partial[w];  // entries 16..31 were never written
        out[0] = total;
    }
}

// Two blocks write the same element: the last writer wins, and which one is last depends on the
// block order.
__global__ void block_race_kernel(float* out) {
    if (threadIdx.x == 0) out[0] = static_cast<float>(blockIdx.x);
}

// A thread reads what another writes with no barrier between.
__global__ void thread_race_kernel(float* out) {
    GSPO4J_SHARED(float, value, 1);
    if (threadIdx.x == 0) value[0] = 7.0f;
    if (threadIdx.x == 63) out[0] = value[0];
}

// ---- Driving them -------------------------------------------------------------------------------

std::vector<float> run_with(simt::Order order, unsigned char poison, void (*launch)(float*)) {
    simt::config().order = order;
    simt::config().poison = poison;
    float* out = nullptr;
    cudaMalloc(reinterpret_cast<void**>(&out), 64 * sizeof(float));
    cudaMemset(out, 0, 64 * sizeof(float));
    launch(out);
    std::vector<float> host(64);
    std::memcpy(host.data(), out, sizeof(float) * host.size());
    cudaFree(out);
    simt::config().order = simt::Order::kForward;
    simt::config().poison = 0xff;
    return host;
}

// Schedule variation: a race or a read of uninitialised shared memory gives a result that
// changes between two schedules, which the comparison suite requires to agree bit for bit.
void expect_schedule_dependent(const char* name, void (*launch)(float*), bool vary_poison) {
    const std::vector<float> a = run_with(simt::Order::kForward, 0xff, launch);
    const std::vector<float> b = run_with(vary_poison ? simt::Order::kForward : simt::Order::kReverse, vary_poison ? 0x3f : 0xff, launch);
    const bool differ = std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0;
    expect(differ, std::string(name) + ": the two schedules agree, so the bug would go unseen");
    if (differ) std::printf("ok   %-34s out[0] = %g under one schedule, %g under the other\n", name, a[0], b[0]);
    simt::take_misuses();
    cudaGetLastError();
}

}  // namespace

int main() {
    float* out = nullptr;
    cudaMalloc(reinterpret_cast<void**>(&out), 4096 * sizeof(float));
    expect_report("correct kernel", "", [&] { GSPO4J_LAUNCH(4, 256, 0, nullptr, correct_kernel)(out); });
    expect(out[0] == 256.0f * 255.0f / 2.0f, "correct kernel: wrong sum");
    expect_report("early exit before a barrier", "exited: a barrier must be reached by every thread",
                  [&] { GSPO4J_LAUNCH(1, 64, 0, nullptr, early_exit_kernel)(out); });
    expect_report("exit while others wait at a barrier", "a barrier must be reached by every thread",
                  [&] { GSPO4J_LAUNCH(1, 64, 0, nullptr, exit_while_waiting_kernel)(out); });
    expect_report("divergent barriers", "divergent barriers", [&] { GSPO4J_LAUNCH(1, 32, 0, nullptr, divergent_barrier_kernel)(out); });
    expect_report("shuffle names an absent lane", "names lanes absent from this warp",
                  [&] { GSPO4J_LAUNCH(1, 48, 0, nullptr, absent_lane_kernel)(out); });
    // Lanes 0-30 first (they wait, then lane 31 exits), and lane 31 first (it has exited when they come).
    expect_report("exit while a shuffle names the lane", "waits in a shuffle at", [&] { GSPO4J_LAUNCH(1, 32, 0, nullptr, exited_lane_kernel)(out); });
    simt::config().order = simt::Order::kReverse;
    expect_report("shuffle names an exited lane", "which has exited", [&] { GSPO4J_LAUNCH(1, 32, 0, nullptr, exited_lane_kernel)(out); });
    simt::config().order = simt::Order::kForward;
    expect_report("shuffle masks differ", "must pass the same mask", [&] { GSPO4J_LAUNCH(1, 32, 0, nullptr, mask_mismatch_kernel)(out); });
    expect_report("shuffle reads an unnamed lane", "which the mask leaves out",
                  [&] { GSPO4J_LAUNCH(1, 16, 0, nullptr, unnamed_source_kernel)(out); });
    expect_report("deadlock", "deadlock: threads 0-4 wait in a shuffle", [&] { GSPO4J_LAUNCH(1, 32, 0, nullptr, deadlock_kernel)(out); });
    expect_report("misaligned 16-byte load", "is not 16-byte aligned", [&] { GSPO4J_LAUNCH(1, 32, 0, nullptr, misaligned_kernel)(out, out); });
    expect_report("block over 1024 threads", "more than 1024 threads", [&] { GSPO4J_LAUNCH(1, 1025, 0, nullptr, correct_kernel)(out); });
    expect_report("gridDim.y over 65535", "the grid exceeds", [&] { GSPO4J_LAUNCH(dim3(1, 65536), 32, 0, nullptr, correct_kernel)(out); });
    expect_report("gridDim.z over 65535", "the grid exceeds", [&] { GSPO4J_LAUNCH(dim3(1, 1, 70000), 32, 0, nullptr, correct_kernel)(out); });
    expect_report("static shared over 48 KiB", "over the 48 KiB limit", [&] { GSPO4J_LAUNCH(1, 32, 0, nullptr, big_shared_kernel)(out); });
    expect_schedule_dependent("uninitialised shared memory", [](float* o) { GSPO4J_LAUNCH(1, 32, 0, nullptr, uninitialised_shared_kernel)(o); },
                              true);
    expect_schedule_dependent("race between blocks", [](float* o) { GSPO4J_LAUNCH(8, 32, 0, nullptr, block_race_kernel)(o); }, false);
    expect_schedule_dependent("race between threads", [](float* o) { GSPO4J_LAUNCH(1, 64, 0, nullptr, thread_race_kernel)(o); }, false);
    // After all that, the emulator still runs a correct kernel cleanly.
    expect_report("correct kernel again", "", [&] { GSPO4J_LAUNCH(2, 1024, 0, nullptr, correct_kernel)(out); });
    cudaFree(out);
    std::printf("selftest: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
