// The CUDA side of the error funnel and the small runtime pieces every op shares.
#include <mutex>
#include <string>

#include "common.cuh"
#include "cuda_ops.h"

namespace gspo4j {
namespace cuda {

void check_cuda(cudaError_t status, const char* what) {
    if (status == cudaSuccess) return;
    // Clears a non-sticky error so the next call on this thread starts clean.
    cudaGetLastError();
    fail(GSPO4J_ERROR_CUDA, std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

namespace {

constexpr int kMaxDevices = 64;
constexpr int kKinds = static_cast<int>(DataError::kCount);
constexpr unsigned long long kNone = ~0ull;

std::mutex record_mutex;
ErrorRecord records[kMaxDevices] = {};

int current_device() {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    return device;
}

struct KindInfo {
    gspo4j_status status;
    const char* prefix;  // followed by the index
    const char* suffix;
};

// Indexed by DataError.
const KindInfo kKindInfo[kKinds] = {
    {GSPO4J_ERROR_OUT_OF_RANGE, "offsets[", "] breaks 0 = offsets[0] <= offsets[1] <= ... <= offsets[batch] = tokens"},
    {GSPO4J_ERROR_OUT_OF_RANGE, "targets[", "] is outside the vocabulary [0, vocab)"},
    {GSPO4J_ERROR_NON_FINITE, "logits row ", " holds NaN or Inf: a NaN or +Inf, or no finite entry (-Inf entries are allowed)"},
    {GSPO4J_ERROR_NON_FINITE, "logprob[", "] is not finite (NaN, or -Inf: a counted token of probability 0, its logit -Inf)"},
    {GSPO4J_ERROR_NON_FINITE, "old_logprob[", "] is not finite"},
    {GSPO4J_ERROR_NON_FINITE, "advantages[", "] is not finite"},
    {GSPO4J_ERROR_NON_FINITE, "ref_logprob[", "] is not finite"},
    {GSPO4J_ERROR_NON_FINITE, "entropy[", "] is not finite"},
    {GSPO4J_ERROR_NON_FINITE, "rewards[", "] is not finite"},
    {GSPO4J_ERROR_NON_FINITE, "values[", "] is not finite"},
    {GSPO4J_ERROR_INVALID_ARGUMENT, "RLOO needs at least 2 responses per group; the group of response ", " has 1"},
};

__global__ void check_offsets_kernel(const int64_t* offsets, int64_t batch, int64_t tokens, ErrorRecord record, int* any_bad) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i > batch) return;
    const int64_t value = offsets[i];
    const bool bad = i == 0 ? value != 0 : value < offsets[i - 1];
    if (bad || (i == batch && value != tokens)) {
        report(record, DataError::kBadOffsets, i);
        *any_bad = 1;
    }
}

}  // namespace

ErrorRecord error_record() {
    const int device = current_device();
    if (device < 0 || device >= kMaxDevices) fail(GSPO4J_ERROR_UNSUPPORTED, "CUDA device index " + std::to_string(device) + " >= 64");
    std::lock_guard<std::mutex> lock(record_mutex);
    if (records[device] == nullptr) {
        void* memory = nullptr;
        check_cuda(cudaMalloc(&memory, kKinds * sizeof(unsigned long long)), "cudaMalloc (error record)");
        // Once per device and process: wait, so kernels on non-blocking streams see it cleared.
        check_cuda(cudaMemset(memory, 0xff, kKinds * sizeof(unsigned long long)), "cudaMemset (error record)");
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (error record)");
        records[device] = static_cast<ErrorRecord>(memory);
    }
    return records[device];
}

namespace {

// What CUDA knows of `pointer`, which must be device or managed memory.
cudaPointerAttributes device_memory(const void* pointer, const char* name) {
    cudaPointerAttributes attributes;
    check_cuda(cudaPointerGetAttributes(&attributes, pointer), (std::string("cudaPointerGetAttributes(") + name + ")").c_str());
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT, std::string(name) + " is not CUDA device memory (device = GSPO4J_DEVICE_CUDA)");
    }
    return attributes;
}

}  // namespace

DeviceGuard::DeviceGuard(const void* pointer, const char* name) {
    device_ = device_memory(pointer, name).device;
    previous_ = current_device();
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
}

void require_device_pointer(const void* pointer, const char* name) {
    if (pointer == nullptr) return;
    const cudaPointerAttributes attributes = device_memory(pointer, name);
    const int device = current_device();
    if (attributes.type == cudaMemoryTypeDevice && attributes.device != device) {
        fail(GSPO4J_ERROR_INVALID_ARGUMENT, std::string(name) + " is on CUDA device " + std::to_string(attributes.device) +
                                                ", the other arguments on device " + std::to_string(device));
    }
}

Scratch::Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) check_cuda(cudaMallocAsync(&data_, bytes, stream), "cudaMallocAsync (scratch)");
}

Scratch::~Scratch() {
    if (data_) cudaFreeAsync(data_, stream_);
}

CheckedLayout::CheckedLayout(cudaStream_t stream, const TokenLayout& layout, ErrorRecord record)
    : flag_(layout.offsets ? sizeof(int) : 0, stream),
      device_{layout.batch, layout.seq, layout.tokens, layout.offsets, layout.offsets ? flag_.as<int>() : nullptr} {
    if (!layout.offsets) return;
    check_cuda(cudaMemsetAsync(flag_.as<int>(), 0, sizeof(int), stream), "cudaMemsetAsync (offsets check)");
    const int threads = 256;
    const int64_t blocks = ceil_div(layout.batch + 1, threads);
    GSPO4J_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, check_offsets_kernel)(layout.offsets, layout.batch, layout.tokens, record,
                                                                                          flag_.as<int>());
    check_launch("check_offsets_kernel");
}

int device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: not an error for the caller
        return 0;
    }
    return count;
}

int runtime_version() { return CUDART_VERSION; }

void check_error(void* stream_pointer) {
    const cudaStream_t stream = as_stream(stream_pointer);
    int device = -1;
    if (stream != nullptr) check_cuda(cudaStreamGetDevice(stream, &device), "cudaStreamGetDevice");
    int previous = current_device();
    if (device < 0) device = previous;
    struct Restore {
        int previous, device;
        ~Restore() { if (previous != device) cudaSetDevice(previous); }
    } restore{previous, device};
    if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    // An asynchronous fault of an earlier kernel surfaces here too.
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    ErrorRecord record = nullptr;
    {
        std::lock_guard<std::mutex> lock(record_mutex);
        if (device < kMaxDevices) record = records[device];
    }
    if (record == nullptr) return;  // no kernel of this library ran on this device yet
    unsigned long long seen[kKinds];
    check_cuda(cudaMemcpyAsync(seen, record, sizeof seen, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (error record)");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    for (int kind = 0; kind < kKinds; ++kind) {
        if (seen[kind] == kNone) continue;
        unsigned long long cleared[kKinds];
        for (unsigned long long& slot : cleared) slot = kNone;
        check_cuda(cudaMemcpyAsync(record, cleared, sizeof cleared, cudaMemcpyHostToDevice, stream),
                   "cudaMemcpyAsync (clear error record)");
        // `cleared` lives on this stack frame: wait until the copy has read it.
        check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        const KindInfo& info = kKindInfo[kind];
        fail(info.status, std::string("a CUDA kernel found ") + info.prefix + std::to_string(seen[kind]) + info.suffix);
    }
}

}  // namespace cuda
}  // namespace gspo4j
