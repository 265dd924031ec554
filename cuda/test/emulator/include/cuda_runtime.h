// Stands in for CUDA's cuda_runtime.h when the .cu sources are compiled as C++ for the SIMT
// emulator: the CUDA keywords, the built-in variables, the device intrinsics the kernels use and
// the runtime API, with host memory as device memory. Only what gspo4j's kernels need.
#ifndef GSPO4J_SIMT_CUDA_RUNTIME_H
#define GSPO4J_SIMT_CUDA_RUNTIME_H

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "simt.h"

#define GSPO4J_SIMT 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// The two macros the kernels launch and declare shared memory through (cuda/common.cuh).
#define GSPO4J_LAUNCH(grid, block, shared_bytes, stream, ...) \
    ::simt::make_launch(#__VA_ARGS__, dim3(grid), dim3(block), (shared_bytes), __FILE__, __LINE__, &__VA_ARGS__)
#define GSPO4J_SHARED(type, name, count)                                                                             \
    static const char gspo4j_simt_site_##name = 0;                                                                  \
    type(&name)[count] = *static_cast<type(*)[count]>(                                                              \
        ::simt::shared_array(&gspo4j_simt_site_##name, sizeof(type) * (count), alignof(type), #name, __FILE__, __LINE__))

#define threadIdx (::simt::current->thread_idx)
#define blockIdx (::simt::current->block_idx)
#define blockDim (::simt::current->block_dim)
#define gridDim (::simt::current->grid_dim)

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline float __uint_as_float(unsigned bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

// Round-to-nearest products and sums: exactly one rounding, never fused into an FMA (the
// emulator is built with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// Streaming loads and stores: 16-byte vectors must be 16-byte aligned on the device.
inline uint4 __ldcs(const uint4* address) {
    ::simt::check_aligned(address, 16, "__ldcs (16-byte load)");
    return *address;
}
inline void __stcs(uint4* address, uint4 value) {
    ::simt::check_aligned(address, 16, "__stcs (16-byte store)");
    *address = value;
}
inline float __ldcs(const float* address) { return *address; }
inline void __stcs(float* address, float value) { *address = value; }

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) { ::simt::barrier(file, line); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
    return ::simt::from_bits<T>(
        ::simt::shuffle(mask, ::simt::to_bits(value), ::simt::ShuffleKind::kXor, lane_mask, width, file, line));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    return ::simt::from_bits<T>(::simt::shuffle(mask, ::simt::to_bits(value), ::simt::ShuffleKind::kIndex, source, width, file, line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
    return ::simt::from_bits<T>(
        ::simt::shuffle(mask, ::simt::to_bits(value), ::simt::ShuffleKind::kDown, static_cast<int>(delta), width, file, line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    return ::simt::from_bits<T>(
        ::simt::shuffle(mask, ::simt::to_bits(value), ::simt::ShuffleKind::kUp, static_cast<int>(delta), width, file, line));
}

// Device atomics are real atomics here: blocks never run at once on one OS thread, but the
// sanitizers should see what the hardware guarantees.
template <typename T>
inline T atomicMin(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (value < old && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (value > old && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T>
inline T atomicAdd(T* address, T value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

// ---------------------------------------------------------------------------------------------
// The runtime API: one device (0), every call synchronous, host memory as device memory.

#define CUDART_VERSION 13000

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

#define cudaEventDisableTiming 0x02

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevice = 101,
    cudaErrorNoDevice = 100,
    cudaErrorLaunchFailure = 719,
};
typedef enum cudaError_t cudaError;

enum cudaMemoryType {
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3,
};

struct cudaPointerAttributes {
    enum cudaMemoryType type;
    int device;
    void* devicePointer;
    void* hostPointer;
};

enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMultiProcessorCount = 16,
};

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};

cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamGetDevice(cudaStream_t stream, int* device);
cudaError_t cudaMalloc(void** pointer, size_t bytes);
cudaError_t cudaFree(void* pointer);
cudaError_t cudaMallocAsync(void** pointer, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* pointer, cudaStream_t stream);
cudaError_t cudaMemset(void* pointer, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaMemcpy(void* to, const void* from, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer);
// Pinned host memory and events: every call is synchronous, so an event is complete once recorded.
cudaError_t cudaMallocHost(void** pointer, size_t bytes);
cudaError_t cudaFreeHost(void* pointer);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventDestroy(cudaEvent_t event);

#endif
