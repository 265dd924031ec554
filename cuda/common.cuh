// Shared by the CUDA sources: error checks that feed the library's one error funnel (common.h),
// the per-device record of data errors found inside kernels, the guard that runs a call on the
// device owning its pointers, stream-ordered scratch memory and deterministic block reductions.
#ifndef GSPO4J_CUDA_COMMON_CUH
#define GSPO4J_CUDA_COMMON_CUH

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

// Kernel launches and static shared arrays go through these two macros, so that the same sources
// also run on the CPU under the SIMT emulator of cuda/test/emulator, whose cuda_runtime.h defines
// its own versions of both. The kernel comes last: a template-id such as kernel<D, kThreads>
// holds a comma.
#ifndef GSPO4J_LAUNCH
#define GSPO4J_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif
#ifndef GSPO4J_SHARED
#define GSPO4J_SHARED(type, name, count) __shared__ type name[count]
#endif

namespace gspo4j {
namespace cuda {

// Every runtime call goes through this: a failure becomes GSPO4J_ERROR_CUDA with the call and
// CUDA's own message.
void check_cuda(cudaError_t status, const char* what);

// After every launch: a bad configuration or an earlier asynchronous fault surfaces here.
void check_launch(const char* kernel);

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Data errors a kernel finds (a token id out of range, NaN in an input). Kernels cannot throw,
// so each kind has a slot on the device holding the lowest index where it was seen (atomicMin:
// the result does not depend on scheduling); check_error reads and clears them.
enum class DataError : int {
    kBadOffsets = 0,
    kTargetOutOfRange,
    kNonFiniteLogits,
    kNonFiniteLogprob,
    kNonFiniteOldLogprob,
    kNonFiniteAdvantages,
    kNonFiniteRefLogprob,
    kNonFiniteEntropy,
    kNonFiniteRewards,
    kNonFiniteValues,
    kGroupOfOne,
    kNonFiniteRolloutLogprob,
    kCount
};

typedef unsigned long long* ErrorRecord;

__device__ __forceinline__ void report(ErrorRecord record, DataError kind, int64_t index) {
    atomicMin(record + static_cast<int>(kind), static_cast<unsigned long long>(index));
}

// The record of the current device (allocated on first use, all slots empty).
ErrorRecord error_record();

// Makes the device that owns `pointer` current for the guard's lifetime, after checking that it
// is device (or managed) memory: a host pointer passed as CUDA is an error, not a crash.
class DeviceGuard {
public:
    DeviceGuard(const void* pointer, const char* name);
    ~DeviceGuard();
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

private:
    int previous_ = -1;
    int device_ = -1;
};

// Every further pointer of a call must live on the guard's device.
void require_device_pointer(const void* pointer, const char* name);

// Scratch memory ordered on the stream: freed on the stream after the kernels that use it, also
// when a later check throws.
class Scratch {
public:
    Scratch(size_t bytes, cudaStream_t stream);
    ~Scratch();
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    template <typename T> T* as(size_t byte_offset = 0) const {
        return reinterpret_cast<T*>(static_cast<char*>(data_) + byte_offset);
    }

private:
    void* data_ = nullptr;
    cudaStream_t stream_;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ bool finite(float x) { return isfinite(x); }

// Fixed-shape tree reductions over a block (warp shuffles, then one value per warp through
// shared memory): the order of additions depends only on the block size, so results are
// bitwise reproducible. `shared` holds at least 32 values; every thread gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, Op op, T identity, T* shared) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    value = warp_reduce(value, op);
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    value = lane < warps ? shared[lane] : identity;
    return warp_reduce(value, op);
}

struct Add {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Min {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct Max {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// The token axis on the device: padded (offsets == nullptr) or packed.
struct DeviceLayout {
    int64_t batch;
    int64_t seq;
    int64_t tokens;
    const int64_t* offsets;
    const int* offsets_bad;  // packed: set by the offsets check that ran first on the stream

    __device__ __forceinline__ int64_t begin(int64_t b) const { return offsets ? offsets[b] : b * seq; }
    __device__ __forceinline__ int64_t end(int64_t b) const { return offsets ? offsets[b + 1] : (b + 1) * seq; }
    // Bad offsets: the kernel writes nothing, as the CPU writes nothing. Overlapping responses
    // would otherwise have several blocks write the same entries (a race), and the call's
    // outputs would hold garbage beside its error.
    __device__ __forceinline__ bool rejected() const { return offsets_bad != nullptr && *offsets_bad != 0; }
};

// A layout whose packed offsets (0 first, non-decreasing, `tokens` last) are checked on the
// device before any other kernel of the call: a bad entry is recorded as kBadOffsets at its index
// and makes every later kernel's layout rejected(). Each kernel still clamps a response's range
// to [0, tokens] before reading it.
class CheckedLayout {
public:
    CheckedLayout(cudaStream_t stream, const TokenLayout& layout, ErrorRecord record);
    const DeviceLayout& device() const { return device_; }

private:
    Scratch flag_;
    DeviceLayout device_;
};

__device__ __forceinline__ void clamp_range(int64_t tokens, int64_t* begin, int64_t* end) {
    *begin = *begin < 0 ? 0 : (*begin > tokens ? tokens : *begin);
    *end = *end < *begin ? *begin : (*end > tokens ? tokens : *end);
}

}  // namespace cuda
}  // namespace gspo4j

#endif
