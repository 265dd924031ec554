// The SIMT emulator's core: every CUDA thread of a launch is a fiber with its own stack, a block's
// fibers run on the calling OS thread until all have exited, and the points where CUDA threads
// meet (__syncthreads, warp shuffles) block a fiber until every thread they name has arrived.
// Misuse that real hardware would hang on or answer with garbage is reported instead (see
// README.md beside this file for the list). The shim headers (include/) map the CUDA names onto
// this; nothing here is part of libgspo4j.
#ifndef GSPO4J_SIMT_H
#define GSPO4J_SIMT_H

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

namespace simt {

// The order in which blocks, and the fibers of a block, are given the processor. Results of a
// correct kernel do not depend on it; a race between threads or blocks usually does.
enum class Order { kForward, kReverse, kRandom };

struct Config {
    Order order = Order::kForward;
    uint64_t seed = 1;             // for Order::kRandom
    unsigned char poison = 0xff;   // fills fresh shared memory: NaN as float/double, -1 as int
    int multiprocessors = 132;     // cudaDevAttrMultiProcessorCount (an H100 SXM has 132)
    bool host_is_device = false;   // cudaPointerGetAttributes calls any pointer device memory
};

// The configuration of launches on the calling OS thread (each OS thread has its own).
Config& config();

// What the kernels of one OS thread see: set by the scheduler before each switch to a fiber.
struct ThreadContext {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
extern thread_local ThreadContext* current;

// Misuse found by the emulator since the last call, one message each (kernel, block, thread,
// source line). A launch that misuses also fails with cudaErrorLaunchFailure.
std::vector<std::string> take_misuses();
// Reports misuse from inside a fiber: the launch is abandoned and the message recorded.
[[noreturn]] void misuse(const std::string& message);

// Launch statistics, for the suite's report.
struct Counters {
    uint64_t launches = 0;
    uint64_t blocks = 0;
    uint64_t threads = 0;
    uint64_t switches = 0;
};
Counters counters();

// Runs `body` once per thread of the grid. Returns false (and sets CUDA's last error) when the
// configuration is invalid or a thread misused something.
bool run_grid(const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared, void (*body)(void*), void* argument,
              const char* file, int line);

// The meeting points, called by the shim's __syncthreads and __shfl_*_sync.
void barrier(const char* file, int line);
enum class ShuffleKind { kIndex, kUp, kDown, kXor };
uint64_t shuffle(unsigned mask, uint64_t value, ShuffleKind kind, int lane_argument, int width, const char* file, int line);

// The calling block's instance of the shared array declared at `site` (one per GSPO4J_SHARED).
void* shared_array(const void* site, size_t bytes, size_t alignment, const char* name, const char* file, int line);

// A 16-byte vector access must be 16-byte aligned.
void check_aligned(const void* address, size_t alignment, const char* what);

// A kernel and its arguments, held until the launch has run: each thread calls the kernel with
// its own copies of the arguments, as CUDA gives each thread its own parameters.
template <typename... Params>
class Launch {
public:
    typedef void (*Kernel)(Params...);
    Launch(const char* name, dim3 grid, dim3 block, size_t dynamic_shared, const char* file, int line, Kernel kernel)
        : name_(name), grid_(grid), block_(block), dynamic_shared_(dynamic_shared), file_(file), line_(line), kernel_(kernel) {}

    template <typename... Args>
    void operator()(Args&&... args) const {
        static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
        Bound bound{kernel_, std::tuple<std::decay_t<Params>...>(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...)};
        run_grid(name_, grid_, block_, dynamic_shared_, &Bound::call, &bound, file_, line_);
    }

private:
    struct Bound {
        Kernel kernel;
        std::tuple<std::decay_t<Params>...> arguments;
        static void call(void* self) {
            const Bound& b = *static_cast<const Bound*>(self);
            std::apply(b.kernel, b.arguments);  // copies into the kernel's by-value parameters
        }
    };
    const char* name_;
    dim3 grid_;
    dim3 block_;
    size_t dynamic_shared_;
    const char* file_;
    int line_;
    Kernel kernel_;
};

template <typename... Params>
Launch<Params...> make_launch(const char* name, dim3 grid, dim3 block, size_t dynamic_shared, const char* file, int line,
                              void (*kernel)(Params...)) {
    return Launch<Params...>(name, grid, block, dynamic_shared, file, line, kernel);
}

template <typename T>
uint64_t to_bits(const T& value) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

}  // namespace simt

#endif
