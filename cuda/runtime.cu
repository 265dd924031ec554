// The CUDA side of the error funnel and the small runtime pieces every op shares.
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

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
    {GSPO4J_ERROR_NON_FINITE, "rollout_logprob[", "] is not finite"},
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

namespace {

// Makes `device` current for the scope (the stream's device, or the current one for -1).
struct DeviceScope {
    int previous, device;
    explicit DeviceScope(int wanted) : previous(current_device()), device(wanted < 0 ? previous : wanted) {
        if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceScope() {
        if (previous != device) cudaSetDevice(previous);
    }
};

int stream_device(cudaStream_t stream) {
    int device = -1;
    if (stream != nullptr) check_cuda(cudaStreamGetDevice(stream, &device), "cudaStreamGetDevice");
    return device;
}

// Raises the first error of a snapshot of the record: the lowest-numbered kind at its index.
void raise_first(const unsigned long long seen[kKinds]) {
    for (int kind = 0; kind < kKinds; ++kind) {
        if (seen[kind] == kNone) continue;
        const KindInfo& info = kKindInfo[kind];
        fail(info.status, std::string("a CUDA kernel found ") + info.prefix + std::to_string(seen[kind]) + info.suffix);
    }
}

// A deferred check: the record's snapshot lands in pinned memory behind `event` on the stream.
struct Snapshot {
    int device;
    cudaEvent_t event;
    unsigned long long* host;  // kKinds slots, pinned
};

std::mutex deferred_mutex;
std::unordered_map<int64_t, Snapshot> deferred;  // by ticket
std::vector<Snapshot> spare;                     // resolved snapshots, reused (event and memory)
int64_t next_ticket = 1;

// Frees the snapshots' pinned memory and events at exit (a CUDA runtime already unloading answers
// with an error, ignored: the process is ending anyway).
struct FreeSnapshotsAtExit {
    ~FreeSnapshotsAtExit() {
        std::lock_guard<std::mutex> lock(deferred_mutex);
        for (auto& entry : deferred) spare.push_back(entry.second);
        deferred.clear();
        for (const Snapshot& s : spare) {
            cudaEventDestroy(s.event);
            cudaFreeHost(s.host);
        }
        spare.clear();
    }
} free_snapshots_at_exit;

}  // namespace

void check_error(void* stream_pointer) {
    const cudaStream_t stream = as_stream(stream_pointer);
    const DeviceScope scope(stream_device(stream));
    // An asynchronous fault of an earlier kernel surfaces here too.
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    ErrorRecord record = nullptr;
    {
        std::lock_guard<std::mutex> lock(record_mutex);
        if (scope.device < kMaxDevices) record = records[scope.device];
    }
    if (record == nullptr) return;  // no kernel of this library ran on this device yet
    unsigned long long seen[kKinds];
    check_cuda(cudaMemcpyAsync(seen, record, sizeof seen, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (error record)");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    for (int kind = 0; kind < kKinds; ++kind) {
        if (seen[kind] == kNone) continue;
        check_cuda(cudaMemsetAsync(record, 0xff, sizeof seen, stream), "cudaMemsetAsync (clear error record)");
        raise_first(seen);
    }
}

int64_t defer_error_check(void* stream_pointer) {
    const cudaStream_t stream = as_stream(stream_pointer);
    const DeviceScope scope(stream_device(stream));
    ErrorRecord record = nullptr;
    {
        std::lock_guard<std::mutex> lock(record_mutex);
        if (scope.device < kMaxDevices) record = records[scope.device];
    }
    if (record == nullptr) return 0;  // no kernel of this library ran on this device: nothing to check
    Snapshot snapshot{scope.device, nullptr, nullptr};
    {
        std::lock_guard<std::mutex> lock(deferred_mutex);
        for (size_t i = 0; i < spare.size(); ++i) {
            if (spare[i].device == scope.device) {
                snapshot = spare[i];
                spare.erase(spare.begin() + static_cast<std::ptrdiff_t>(i));
                break;
            }
        }
    }
    if (snapshot.event == nullptr) {
        void* host = nullptr;
        check_cuda(cudaMallocHost(&host, kKinds * sizeof(unsigned long long)), "cudaMallocHost (error snapshot)");
        const cudaError_t created = cudaEventCreateWithFlags(&snapshot.event, cudaEventDisableTiming);
        if (created != cudaSuccess) cudaFreeHost(host);
        check_cuda(created, "cudaEventCreateWithFlags (error snapshot)");
        snapshot.host = static_cast<unsigned long long*>(host);
    }
    // In stream order: what the call's kernels recorded is copied out, then the record is cleared
    // for the next call, then the event marks the copy as done. The host does not wait.
    cudaError_t status = cudaMemcpyAsync(snapshot.host, record, kKinds * sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream);
    if (status == cudaSuccess) status = cudaMemsetAsync(record, 0xff, kKinds * sizeof(unsigned long long), stream);
    if (status == cudaSuccess) status = cudaEventRecord(snapshot.event, stream);
    std::lock_guard<std::mutex> lock(deferred_mutex);
    if (status != cudaSuccess) {
        spare.push_back(snapshot);
        check_cuda(status, "queueing the error snapshot");
    }
    const int64_t ticket = next_ticket++;
    deferred.emplace(ticket, snapshot);
    return ticket;
}

void resolve_error_check(int64_t ticket) {
    if (ticket == 0) return;
    Snapshot snapshot;
    {
        std::lock_guard<std::mutex> lock(deferred_mutex);
        const auto found = deferred.find(ticket);
        if (found == deferred.end()) {
            fail(GSPO4J_ERROR_INVALID_ARGUMENT, "error check ticket " + std::to_string(ticket) + " is unknown or was resolved already");
        }
        snapshot = found->second;
        deferred.erase(found);
    }
    // The ticket is spent whatever happens: the snapshot goes back to the spares.
    struct Spare {
        Snapshot s;
        ~Spare() {
            std::lock_guard<std::mutex> lock(deferred_mutex);
            spare.push_back(s);
        }
    } give_back{snapshot};
    const DeviceScope scope(snapshot.device);
    // Waits for the work queued before the snapshot only, not for the stream's later work; an
    // asynchronous fault of that work surfaces here.
    check_cuda(cudaEventSynchronize(snapshot.event), "cudaEventSynchronize (error snapshot)");
    unsigned long long seen[kKinds];
    for (int kind = 0; kind < kKinds; ++kind) seen[kind] = snapshot.host[kind];
    raise_first(seen);
}

}  // namespace cuda
}  // namespace gspo4j
