// The SIMT emulator's scheduler: fibers on hand-switched stacks, barriers, warp shuffles, shared
// memory and the checks of how kernels use them. See README.md beside this file.
#include "simt.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "include/cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define SIMT_ASAN 1
#endif
// The TSan build compiles this file uninstrumented (the scheduler's own bookkeeping is shared by
// fibers with no synchronisation TSan could see, and is not what is tested) but still tells TSan
// about fibers and barriers: SIMT_TSAN_ANNOTATIONS, from cuda/test/simt.cmake.
#if defined(__SANITIZE_THREAD__) || defined(SIMT_TSAN_ANNOTATIONS)
#include <sanitizer/tsan_interface.h>
#define SIMT_TSAN 1
#endif

// void simt_switch_context(void** save, void* load): saves the callee-saved registers, the SSE
// control word and the x87 control word on the current stack, stores the stack pointer in *save,
// and resumes the context whose stack pointer is `load`. simt_fiber_start is where a fresh
// fiber's first switch returns to: it calls r12(r13) and never returns.
asm(R"(
    .text
    .p2align 4
    .type simt_switch_context, @function
simt_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch_context, .-simt_switch_context

    .p2align 4
    .type simt_fiber_start, @function
simt_fiber_start:
    movq %r13, %rdi
    callq *%r12
    ud2
    .size simt_fiber_start, .-simt_fiber_start
)");

extern "C" void simt_switch_context(void** save, void* load);
extern "C" void simt_fiber_start();

namespace simt {

thread_local ThreadContext* current = nullptr;

namespace {

#if defined(SIMT_ASAN) || defined(SIMT_TSAN)
constexpr size_t kStackBytes = 512 * 1024;  // instrumented frames are several times larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxStaticShared = 48 * 1024;

enum class State { kReady, kBarrier, kShuffle, kExited };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // usable stack [stack, stack + kStackBytes), a guard page below
    State state = State::kReady;
    ThreadContext context{};
    int index = 0;  // linear thread index in the block: warps are runs of 32
    const char* file = nullptr;
    int line = 0;
    // A pending shuffle.
    unsigned mask = 0;
    uint64_t value = 0;
    int source = 0;
    uint64_t result = 0;
#ifdef SIMT_ASAN
    void* fake_stack = nullptr;
#endif
#ifdef SIMT_TSAN
    void* tsan_fiber = nullptr;
#endif
};

struct SharedArray {
    const void* site;
    void* data;
    size_t bytes;
    const char* name;
};

struct Block {
    int size = 0;
    int live = 0;
    int exited = 0;
    int first_exited = -1;
    int arrived = 0;  // at the current barrier
    const char* barrier_file = nullptr;
    int barrier_line = 0;
    int barrier_first = -1;
    unsigned generation = 0;
    bool aborted = false;
    std::vector<SharedArray> shared;
    size_t shared_bytes = 0;
    // TSan: barrier k releases and acquires slot k % 2, so a thread already past barrier k + 1
    // cannot lend a slow thread ordering it has not earned.
    char barrier_sync[2] = {0, 0};
};

uint64_t next_random(uint64_t* state) {  // splitmix64
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

Config initial_config() {
    Config c;
    if (const char* v = std::getenv("GSPO4J_SIMT_ORDER")) {
        const std::string s(v);
        c.order = s == "reverse" ? Order::kReverse : s == "random" ? Order::kRandom : Order::kForward;
    }
    if (const char* v = std::getenv("GSPO4J_SIMT_SEED")) c.seed = std::strtoull(v, nullptr, 10);
    if (const char* v = std::getenv("GSPO4J_SIMT_MULTIPROCESSORS")) c.multiprocessors = std::max(1, std::atoi(v));
    if (const char* v = std::getenv("GSPO4J_SIMT_HOST_IS_DEVICE")) c.host_is_device = std::strcmp(v, "1") == 0;
    return c;
}

struct Emulator {
    Config config = initial_config();
    // The scheduler's own context, where fibers return to.
    void* main_sp = nullptr;
    const void* main_stack_bottom = nullptr;
    size_t main_stack_size = 0;
#ifdef SIMT_ASAN
    void* main_fake_stack = nullptr;
#endif
#ifdef SIMT_TSAN
    void* main_tsan_fiber = nullptr;
    std::vector<void*> dead_shared;  // freed at the launch's end (release_shared)
#endif
    std::vector<Fiber> fibers;  // stacks are kept from launch to launch
    std::vector<int> round_order;
    Fiber* running = nullptr;
    Block block;
    const char* kernel = "";
    void (*body)(void*) = nullptr;
    void* argument = nullptr;
    uint64_t random_state = 1;
    std::vector<std::string> misuses;
    Counters counters;
    // TSan: the host's writes before a launch reach its threads (launch_start), the threads' writes
    // reach the host after it (launch_end). Two objects: one would order every block after the
    // blocks that ran before it, and hide races between blocks.
    char launch_start = 0;
    char launch_end = 0;

    ~Emulator() {
        for (Fiber& f : fibers) {
            if (f.stack) munmap(f.stack - kGuardBytes, kStackBytes + kGuardBytes);
        }
    }
};

Emulator& emulator() {
    thread_local Emulator instance;
    return instance;
}

// ---- Switching ------------------------------------------------------------------------------

void fiber_main(Fiber* f);

// The scheduler gives the processor to `f` until it blocks, exits or misuses.
void switch_to(Emulator& e, Fiber& f) {
    e.running = &f;
    current = &f.context;
    ++e.counters.switches;
#ifdef SIMT_TSAN
    __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef SIMT_ASAN
    __sanitizer_start_switch_fiber(&e.main_fake_stack, f.stack, kStackBytes);
#endif
    simt_switch_context(&e.main_sp, f.sp);
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(e.main_fake_stack, nullptr, nullptr);
#endif
    e.running = nullptr;
    current = nullptr;
}

// A fiber gives the processor back to the scheduler; `dying` when it will never run again.
void yield(Emulator& e, bool dying) {
    Fiber& f = *e.running;
#ifdef SIMT_TSAN
    __tsan_switch_to_fiber(e.main_tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef SIMT_ASAN
    __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, e.main_stack_bottom, e.main_stack_size);
#else
    (void)dying;
#endif
    simt_switch_context(&f.sp, e.main_sp);
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &e.main_stack_bottom, &e.main_stack_size);
#endif
}

void prepare_stack(Fiber& f) {
#ifdef SIMT_TSAN
    // A fresh mapping for every thread: TSan would take the last fiber's frames on a reused stack
    // for memory shared between the two threads.
    if (f.stack != nullptr) {
        munmap(f.stack - kGuardBytes, kStackBytes + kGuardBytes);
        f.stack = nullptr;
    }
#endif
    if (f.stack == nullptr) {
        void* memory = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) {
            std::fprintf(stderr, "simt: cannot map a fiber stack\n");
            std::abort();
        }
        mprotect(memory, kGuardBytes, PROT_NONE);  // an overflow faults instead of corrupting
        f.stack = static_cast<char*>(memory) + kGuardBytes;
    }
#ifdef SIMT_ASAN
    // The last fiber on this stack never returned from its outer frames (it left through yield):
    // their redzones are still poisoned.
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    // The frame simt_switch_context pops: control words, r15, r14, r13 = f, r12 = fiber_main,
    // rbx, rbp, then the return address simt_fiber_start. Its `ret` leaves the stack 16-byte
    // aligned, as a call instruction expects.
    auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes - 64);
    uint64_t* frame = top - 8;
    uint32_t control[2];
    asm volatile("stmxcsr %0" : "=m"(control[0]));
    asm volatile("fnstcw %0" : "=m"(control[1]));
    std::memcpy(&frame[0], control, sizeof control);
    frame[1] = 0;                                          // r15
    frame[2] = 0;                                          // r14
    frame[3] = reinterpret_cast<uint64_t>(&f);             // r13
    frame[4] = reinterpret_cast<uint64_t>(&fiber_main);    // r12
    frame[5] = 0;                                          // rbx
    frame[6] = 0;                                          // rbp
    frame[7] = reinterpret_cast<uint64_t>(&simt_fiber_start);
    f.sp = frame;
}

// ---- Descriptions ---------------------------------------------------------------------------

std::string coordinates(const uint3& v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

std::string site(const char* file, int line) {
    std::string f = file ? file : "?";
    const size_t slash = f.find_last_of('/');
    if (slash != std::string::npos) f = f.substr(slash + 1);
    return f + ":" + std::to_string(line);
}

std::string hex(unsigned mask) {
    char text[16];
    std::snprintf(text, sizeof text, "0x%08x", mask);
    return text;
}

std::string where(const Emulator& e, const Fiber& f) {
    return std::string(e.kernel) + " block " + coordinates(f.context.block_idx) + " thread " + coordinates(f.context.thread_idx);
}

// What the waiting threads of a deadlocked block wait for, runs of threads with the same wait.
std::string waiting(const Emulator& e) {
    std::string out;
    const int n = e.block.size;
    for (int i = 0; i < n;) {
        const Fiber& f = e.fibers[i];
        std::string what;
        switch (f.state) {
            case State::kBarrier: what = "wait at __syncthreads " + site(f.file, f.line); break;
            case State::kShuffle: what = "wait in a shuffle at " + site(f.file, f.line) + " with mask " + hex(f.mask); break;
            case State::kExited: what = "exited"; break;
            case State::kReady: what = "ready"; break;
        }
        int j = i + 1;
        while (j < n && e.fibers[j].state == f.state && e.fibers[j].file == f.file && e.fibers[j].line == f.line &&
               e.fibers[j].mask == f.mask) {
            ++j;
        }
        if (!out.empty()) out += "; ";
        out += "threads " + std::to_string(i) + (j - 1 > i ? "-" + std::to_string(j - 1) : "") + " " + what;
        i = j;
    }
    return out;
}

// ---- Errors of the emulated runtime ---------------------------------------------------------

struct LastError {
    cudaError_t sticky_status = cudaSuccess;  // cleared by cudaGetLastError
    cudaError_t detail_status = cudaSuccess;  // the status `detail` describes
    std::string detail;
};

LastError& last_error() {
    thread_local LastError state;
    return state;
}

void set_error(cudaError_t status, const std::string& detail) {
    LastError& l = last_error();
    l.sticky_status = status;
    l.detail_status = status;
    l.detail = detail;
}

void record_misuse(Emulator& e, const std::string& message) {
    e.misuses.push_back(message);
    set_error(cudaErrorLaunchFailure, "emulator: " + message);
}

// ---- Threads --------------------------------------------------------------------------------

// Thrown by misuse() through the kernel's frames to fiber_main, so that what they hold (the
// message being built, for one) is destroyed before the fiber is left for good.
struct Abandon {};

// The misuse found as a thread exits: recorded here, since fiber_main's handler is behind it.
void exit_misuse(Emulator& e, Fiber& f, const std::string& message) {
    record_misuse(e, where(e, f) + ": " + message);
    e.block.aborted = true;
}

void fiber_exit(Emulator& e, Fiber& f) {
    Block& b = e.block;
    if (b.arrived > 0) {
        exit_misuse(e, f, "thread exited while " + std::to_string(b.arrived) + " threads wait at __syncthreads " +
               site(b.barrier_file, b.barrier_line) + ": a barrier must be reached by every thread of the block");
    }
    const int warp = f.index / 32;
    const int lane = f.index % 32;
    const int warp_end = std::min(b.size, (warp + 1) * 32);
    for (int i = warp * 32; i < warp_end; ++i) {
        const Fiber& other = e.fibers[i];
        if (other.state == State::kShuffle && (other.mask >> lane & 1u)) {
            exit_misuse(e, f, "thread exited while lane " + std::to_string(i % 32) + " waits in a shuffle at " + site(other.file, other.line) +
                   " whose mask " + hex(other.mask) + " names it");
        }
    }
    f.state = State::kExited;
    --b.live;
    if (b.exited++ == 0) b.first_exited = f.index;
#ifdef SIMT_TSAN
    __tsan_release(&e.launch_end);
#endif
    yield(e, true);
    __builtin_unreachable();
}

void fiber_main(Fiber* f) {
    Emulator& e = emulator();
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &e.main_stack_bottom, &e.main_stack_size);
#endif
#ifdef SIMT_TSAN
    __tsan_acquire(&e.launch_start);
#endif
    bool abandoned = false;
    try {
        e.body(e.argument);
    } catch (const Abandon&) {
        abandoned = true;  // leave the handler before leaving the fiber, so the exception is freed
    }
    if (abandoned) {
        f->state = State::kExited;
        yield(e, true);
    }
    fiber_exit(e, *f);
}

Fiber& running_fiber(const char* what) {
    Emulator& e = emulator();
    if (e.running == nullptr) {
        std::fprintf(stderr, "simt: %s called outside a kernel\n", what);
        std::abort();
    }
    return *e.running;
}

// The order of one round over the block's fibers: fixed, or a fresh permutation each round.
const std::vector<int>& order(Emulator& e, int n) {
    std::vector<int>& indices = e.round_order;
    if (static_cast<int>(indices.size()) != n || e.config.order == Order::kRandom) {
        indices.resize(static_cast<size_t>(n));
        std::iota(indices.begin(), indices.end(), 0);
        if (e.config.order == Order::kReverse) std::reverse(indices.begin(), indices.end());
        if (e.config.order == Order::kRandom) {
            for (int i = n - 1; i > 0; --i) std::swap(indices[i], indices[next_random(&e.random_state) % (i + 1)]);
        }
    }
    return indices;
}

// A block's shared arrays, once the block is done. Under TSan they are freed only at the launch's
// end, after the scheduler has acquired what the kernel's threads released: freeing them earlier
// would be a write racing with the threads' last accesses, as TSan sees it.
void release_shared(Emulator& e, Block& b) {
#ifdef SIMT_TSAN
    for (SharedArray& a : b.shared) e.dead_shared.push_back(a.data);
#else
    (void)e;
    for (SharedArray& a : b.shared) std::free(a.data);
#endif
    b.shared.clear();
}

// Runs one block until all its threads exit; false when one misused something or it deadlocked.
bool run_block(Emulator& e, uint3 block_idx, dim3 grid, dim3 block_dim) {
    Block& b = e.block;
    release_shared(e, b);
    b = Block();
    b.shared.reserve(16);  // allocated here, not by a fiber (TSan would see the scheduler free it)
    b.size = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
    b.live = b.size;
    for (int i = 0; i < b.size; ++i) {
        Fiber& f = e.fibers[i];
        f.state = State::kReady;
        f.index = i;
        f.file = nullptr;
        f.line = 0;
        f.mask = 0;
        const unsigned u = static_cast<unsigned>(i);
        f.context.thread_idx = uint3{u % block_dim.x, u / block_dim.x % block_dim.y, u / (block_dim.x * block_dim.y)};
        f.context.block_idx = block_idx;
        f.context.block_dim = block_dim;
        f.context.grid_dim = grid;
        prepare_stack(f);
#ifdef SIMT_TSAN
        f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
    ++e.counters.blocks;
    e.counters.threads += static_cast<uint64_t>(b.size);
    while (b.live > 0 && !b.aborted) {
        bool progress = false;
        for (int i : order(e, b.size)) {
            if (e.fibers[i].state != State::kReady) continue;
            switch_to(e, e.fibers[i]);
            progress = true;
            if (b.aborted) break;
        }
        if (!progress && !b.aborted && b.live > 0) {
            record_misuse(e, std::string(e.kernel) + " block " + coordinates(block_idx) + ": deadlock: " + waiting(e));
            b.aborted = true;
        }
    }
#ifdef SIMT_TSAN
    for (int i = 0; i < b.size; ++i) {
        __tsan_destroy_fiber(e.fibers[i].tsan_fiber);
        e.fibers[i].tsan_fiber = nullptr;
    }
#endif
    release_shared(e, b);
    return !b.aborted;
}

bool valid_configuration(dim3 grid, dim3 block, size_t dynamic_shared, std::string* why) {
    const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
    if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        *why = "a grid or block dimension is 0";
    } else if (threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64) {
        *why = "the block has more than 1024 threads or exceeds (1024, 1024, 64)";
    } else if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        *why = "the grid exceeds (2^31 - 1, 65535, 65535)";
    } else if (dynamic_shared > kMaxStaticShared) {
        *why = "dynamic shared memory over 48 KiB needs cudaFuncSetAttribute, which the emulator does not model";
    } else {
        return true;
    }
    return false;
}

}  // namespace

Config& config() { return emulator().config; }

std::vector<std::string> take_misuses() {
    std::vector<std::string> out;
    out.swap(emulator().misuses);
    return out;
}

Counters counters() { return emulator().counters; }

void misuse(const std::string& message) {
    Emulator& e = emulator();
    Fiber& f = running_fiber("misuse");
    record_misuse(e, where(e, f) + ": " + message);
    e.block.aborted = true;
    throw Abandon{};
}

bool run_grid(const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared, void (*body)(void*), void* argument,
              const char* file, int line) {
    Emulator& e = emulator();
    const std::string launch = std::string(kernel) + " launched at " + site(file, line) + " with grid " +
                               coordinates(uint3{grid.x, grid.y, grid.z}) + ", block " + coordinates(uint3{block.x, block.y, block.z});
    if (e.running != nullptr) {
        misuse(launch + ": a launch from inside a kernel (dynamic parallelism) is not emulated");
    }
    std::string why;
    if (!valid_configuration(grid, block, dynamic_shared, &why)) {
        e.misuses.push_back(launch + ": invalid configuration: " + why);
        set_error(cudaErrorInvalidConfiguration, "emulator: " + launch + ": " + why);
        return false;
    }
    ++e.counters.launches;
    const int threads = static_cast<int>(block.x * block.y * block.z);
    if (static_cast<int>(e.fibers.size()) < threads) e.fibers.resize(static_cast<size_t>(threads));
#ifdef SIMT_TSAN
    if (e.main_tsan_fiber == nullptr) e.main_tsan_fiber = __tsan_get_current_fiber();
    __tsan_release(&e.launch_start);
#endif
    e.kernel = kernel;
    e.body = body;
    e.argument = argument;
    e.random_state = e.config.seed;
    e.round_order.clear();  // the order may have changed since the last launch
    const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> block_order(blocks);
    std::iota(block_order.begin(), block_order.end(), 0);
    if (e.config.order == Order::kReverse) std::reverse(block_order.begin(), block_order.end());
    if (e.config.order == Order::kRandom) {
        for (uint64_t i = blocks; i > 1; --i) std::swap(block_order[i - 1], block_order[next_random(&e.random_state) % i]);
    }
    bool ok = true;
    for (uint64_t linear : block_order) {
        const uint3 index{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                          static_cast<unsigned>(linear / (static_cast<uint64_t>(grid.x) * grid.y))};
        if (!run_block(e, index, grid, block)) {
            ok = false;
            break;
        }
    }
#ifdef SIMT_TSAN
    __tsan_acquire(&e.launch_end);
    for (void* data : e.dead_shared) std::free(data);
    e.dead_shared.clear();
#endif
    e.kernel = "";
    return ok;
}

void barrier(const char* file, int line) {
    Emulator& e = emulator();
    Fiber& f = running_fiber("__syncthreads");
    Block& b = e.block;
    if (b.exited > 0) {
        misuse("__syncthreads " + site(file, line) + " reached after thread " + std::to_string(b.first_exited) +
               " of the block exited: a barrier must be reached by every thread of the block");
    }
    if (b.arrived == 0) {
        b.barrier_file = file;
        b.barrier_line = line;
        b.barrier_first = f.index;
    } else if (b.barrier_line != line || std::strcmp(b.barrier_file, file) != 0) {
        misuse("__syncthreads " + site(file, line) + " while thread " + std::to_string(b.barrier_first) + " waits at __syncthreads " +
               site(b.barrier_file, b.barrier_line) + ": divergent barriers");
    }
    const unsigned slot = b.generation & 1u;
#ifdef SIMT_TSAN
    __tsan_release(&b.barrier_sync[slot]);
#endif
    if (++b.arrived == b.size) {
        b.arrived = 0;
        ++b.generation;
        for (int i = 0; i < b.size; ++i) {
            if (e.fibers[i].state == State::kBarrier) e.fibers[i].state = State::kReady;
        }
    } else {
        f.state = State::kBarrier;
        f.file = file;
        f.line = line;
        yield(e, false);
    }
#ifdef SIMT_TSAN
    __tsan_acquire(&b.barrier_sync[slot]);
#else
    (void)slot;
#endif
}

uint64_t shuffle(unsigned mask, uint64_t value, ShuffleKind kind, int lane_argument, int width, const char* file, int line) {
    Emulator& e = emulator();
    Fiber& f = running_fiber("a warp shuffle");
    Block& b = e.block;
    const int warp = f.index / 32;
    const int lane = f.index % 32;
    const int lanes = std::min(32, b.size - warp * 32);
    // Built only on the way to a report: this function runs a few hundred million times.
    auto at = [&] { return "shuffle at " + site(file, line) + " with mask " + hex(mask); };
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) misuse(at() + ": width " + std::to_string(width) + " is not a power of 2 <= 32");
    if (!(mask >> lane & 1u)) misuse(at() + ": the mask does not name the calling lane " + std::to_string(lane));
    if (lanes < 32 && (mask >> lanes) != 0) {
        misuse(at() + ": the mask names lanes absent from this warp (it has " + std::to_string(lanes) + " lanes)");
    }
    const int base = lane & ~(width - 1);
    int source = lane;
    switch (kind) {
        case ShuffleKind::kIndex: source = base + (lane_argument & (width - 1)); break;
        case ShuffleKind::kXor: source = lane ^ lane_argument; break;
        case ShuffleKind::kDown: source = lane + lane_argument; break;
        case ShuffleKind::kUp: source = lane - lane_argument; break;
    }
    // Outside the segment: the caller's own value. As in PTX, a butterfly (xor) only checks the
    // upper end; it may read an earlier segment.
    if (source >= base + width || (kind != ShuffleKind::kXor && source < base)) source = lane;
    if (!(mask >> source & 1u)) {
        misuse(at() + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(source) + ", which the mask leaves out");
    }
    int waiting_lanes = 1;  // this one
    for (int l = 0; l < lanes; ++l) {
        const Fiber& other = e.fibers[warp * 32 + l];
        if ((mask >> l & 1u) && other.state == State::kExited) {
            misuse(at() + ": the mask names lane " + std::to_string(l) + ", which has exited");
        }
        if (other.state == State::kShuffle) {
            if (other.mask == mask) {
                ++waiting_lanes;
            } else if ((other.mask & mask) != 0) {
                misuse(at() + ": lane " + std::to_string(l) + " waits in a shuffle at " + site(other.file, other.line) + " with mask " +
                       hex(other.mask) + ": the lanes of one shuffle must pass the same mask");
            }
        }
    }
    f.mask = mask;
    f.value = value;
    f.source = source;
    f.file = file;
    f.line = line;
    f.state = State::kShuffle;
    if (waiting_lanes == __builtin_popcount(mask)) {
        for (int l = 0; l < lanes; ++l) {
            if (!(mask >> l & 1u)) continue;
            Fiber& member = e.fibers[warp * 32 + l];
            member.result = e.fibers[warp * 32 + member.source].value;
        }
        for (int l = 0; l < lanes; ++l) {
            if (!(mask >> l & 1u)) continue;
            Fiber& member = e.fibers[warp * 32 + l];
            member.state = State::kReady;
            member.mask = 0;
        }
    } else {
        yield(e, false);
    }
    return f.result;
}

void* shared_array(const void* key, size_t bytes, size_t alignment, const char* name, const char* file, int line) {
    Emulator& e = emulator();
    running_fiber("shared memory");
    Block& b = e.block;
    for (const SharedArray& a : b.shared) {
        if (a.site == key) return a.data;
    }
    const size_t align = std::max<size_t>(alignment, 16);
    void* data = std::aligned_alloc(align, (bytes + align - 1) / align * align);
    // Fresh shared memory holds whatever an earlier block left: poison, so a read before any
    // write shows (NaN, or a value that changes with the poison byte between runs).
    std::memset(data, e.config.poison, bytes);
    b.shared.push_back(SharedArray{key, data, bytes, name});
    b.shared_bytes += bytes;
    if (b.shared_bytes > kMaxStaticShared) {
        misuse("shared array " + std::string(name) + " at " + site(file, line) + " brings the block's static shared memory to " +
               std::to_string(b.shared_bytes) + " bytes, over the 48 KiB limit");
    }
    return data;
}

void check_aligned(const void* address, size_t alignment, const char* what) {
    if (reinterpret_cast<uintptr_t>(address) % alignment != 0) {
        char text[32];
        std::snprintf(text, sizeof text, "%p", address);
        misuse(std::string(what) + " at " + text + ", which is not " + std::to_string(alignment) + "-byte aligned");
    }
}

}  // namespace simt

// ---- The runtime API ------------------------------------------------------------------------

#include <map>
#include <mutex>

namespace {

std::mutex allocations_mutex;
std::map<uintptr_t, size_t>& allocations() {
    static std::map<uintptr_t, size_t> map;
    return map;
}

bool is_device_memory(const void* pointer) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(pointer);
    std::lock_guard<std::mutex> lock(allocations_mutex);
    auto it = allocations().upper_bound(p);
    if (it == allocations().begin()) return false;
    --it;
    return p < it->first + std::max<size_t>(it->second, 1);
}

cudaError_t fail(cudaError_t status, const std::string& detail) {
    simt::set_error(status, detail);
    return status;
}

}  // namespace

cudaError_t cudaGetLastError(void) {
    simt::LastError& l = simt::last_error();
    const cudaError_t status = l.sticky_status;
    l.sticky_status = cudaSuccess;
    return status;
}

cudaError_t cudaPeekAtLastError(void) { return simt::last_error().sticky_status; }

const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
    const simt::LastError& l = simt::last_error();
    if (error != cudaSuccess && error == l.detail_status) return l.detail.c_str();
    switch (error) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unknown error";
}

cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice, "emulator: device " + std::to_string(device) + " (there is one)");
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice, "emulator: device " + std::to_string(device));
    switch (attribute) {
        case cudaDevAttrMultiProcessorCount: *value = simt::config().multiprocessors; return cudaSuccess;
        case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    }
    return fail(cudaErrorInvalidValue, "emulator: attribute " + std::to_string(static_cast<int>(attribute)) + " is not modelled");
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaStreamGetDevice(cudaStream_t, int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void** pointer, size_t bytes) {
    *pointer = nullptr;
    if (bytes == 0) return cudaSuccess;
    // 256-byte aligned like cudaMalloc's, and exactly `bytes` long so ASan sees every overrun.
    void* memory = nullptr;
    if (posix_memalign(&memory, 256, bytes) != 0) return fail(cudaErrorMemoryAllocation, "emulator: out of host memory");
    {
        std::lock_guard<std::mutex> lock(allocations_mutex);
        allocations()[reinterpret_cast<uintptr_t>(memory)] = bytes;
    }
    *pointer = memory;
    return cudaSuccess;
}

cudaError_t cudaFree(void* pointer) {
    if (pointer == nullptr) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lock(allocations_mutex);
        if (allocations().erase(reinterpret_cast<uintptr_t>(pointer)) == 0) {
            return fail(cudaErrorInvalidValue, "emulator: cudaFree of a pointer cudaMalloc did not return");
        }
    }
    std::free(pointer);
    return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** pointer, size_t bytes, cudaStream_t) { return cudaMalloc(pointer, bytes); }

// Pinned host memory is plain host memory (the suite's ASan build sees every overrun); an event is
// a small heap object, complete as soon as it is recorded (launches and copies run to completion).
struct CUevent_st {
    bool recorded = false;
};

cudaError_t cudaMallocHost(void** pointer, size_t bytes) {
    *pointer = std::malloc(bytes == 0 ? 1 : bytes);
    return *pointer ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFreeHost(void* pointer) {
    std::free(pointer);
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
    *event = new CUevent_st();
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
    if (event == nullptr) return cudaErrorInvalidValue;
    event->recorded = true;
    return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) { return event == nullptr ? cudaErrorInvalidValue : cudaSuccess; }

cudaError_t cudaEventQuery(cudaEvent_t event) { return event == nullptr ? cudaErrorInvalidValue : cudaSuccess; }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
    delete event;
    return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* pointer, cudaStream_t) { return cudaFree(pointer); }

cudaError_t cudaMemset(void* pointer, int value, size_t bytes) {
    std::memset(pointer, value, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t) { return cudaMemset(pointer, value, bytes); }

cudaError_t cudaMemcpy(void* to, const void* from, size_t bytes, cudaMemcpyKind) {
    std::memmove(to, from, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
    return cudaMemcpy(to, from, bytes, kind);
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer) {
    const bool device = simt::config().host_is_device || is_device_memory(pointer);
    attributes->type = device ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered;
    attributes->device = device ? 0 : -1;
    attributes->devicePointer = device ? const_cast<void*>(pointer) : nullptr;
    attributes->hostPointer = device ? nullptr : const_cast<void*>(pointer);
    return cudaSuccess;
}
