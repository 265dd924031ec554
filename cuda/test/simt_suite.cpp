// The comparison suite: every CUDA entry point of the C header, run under the SIMT emulator, against
// the CPU entry point on the same inputs (the CPU kernels are themselves checked against a
// double-precision reference by the Java tests). Each CUDA call runs under two schedules (block
// and thread orders, shared-memory poison) that must agree bit for bit, and must leave no misuse
// behind. Prints one line per failure and a closing "N passed, M failed" line; exits non-zero on
// any failure.
//
//   simt_suite [--quick] [--filter SUBSTRING] [--verbose]
//
// --quick runs every third case of the large sections (the sanitizer builds use it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gspo4j/gspo4j.h"
#include "simt.h"

namespace {

constexpr int kCpu = GSPO4J_DEVICE_CPU;
constexpr int kCuda = GSPO4J_DEVICE_CUDA;
const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// ---- Options and report -----------------------------------------------------------------------

struct Options {
    bool quick = false;
    bool verbose = false;
    std::string filter;
} options;

struct Report {
    long passed = 0;
    long failed = 0;
    long skipped_quick = 0;
    long case_index = 0;

    void pass() { ++passed; }
    void fail(const std::string& what) {
        ++failed;
        std::printf("FAIL %s\n", what.c_str());
    }
    void expect(bool ok, const std::string& what) { ok ? pass() : fail(what); }
} report;

// Whether the next case of a large section runs (all of them, or every third with --quick).
bool selected(const std::string& name, bool large_section = true) {
    if (!options.filter.empty() && name.find(options.filter) == std::string::npos) return false;
    const long index = report.case_index++;
    if (options.quick && large_section && index % 3 != 0) {
        ++report.skipped_quick;
        return false;
    }
    if (options.verbose) std::printf("case %s\n", name.c_str());
    return true;
}

std::string format(const char* pattern, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* pattern, ...) {
    char text[512];
    va_list args;
    va_start(args, pattern);
    std::vsnprintf(text, sizeof text, pattern, args);
    va_end(args);
    return text;
}

// ---- Schedules --------------------------------------------------------------------------------

struct Schedule {
    simt::Order order;
    uint64_t seed;
    unsigned char poison;
    const char* name;
};

// Every CUDA call runs under the first schedule and one of the others (in turn), and both runs
// must give the same bits.
std::vector<Schedule> schedules_for(long index) {
    const Schedule forward{simt::Order::kForward, 1, 0xff, "forward"};
    switch (index % 3) {
        case 0: return {forward, Schedule{simt::Order::kReverse, 1, 0x7f, "reverse"}};
        case 1: return {forward, Schedule{simt::Order::kRandom, static_cast<uint64_t>(index) * 7919 + 13, 0x00, "random"}};
        default: return {forward, Schedule{simt::Order::kRandom, static_cast<uint64_t>(index) * 104729 + 5, 0x5a, "random"}};
    }
}

void apply(const Schedule& s) {
    simt::Config& c = simt::config();
    c.order = s.order;
    c.seed = s.seed;
    c.poison = s.poison;
}

// ---- Buffers ----------------------------------------------------------------------------------

// A copy of host bytes in emulated device memory (cudaMalloc'd, so the pointer checks pass and
// ASan sees every overrun), or the host bytes themselves for the CPU call.
class Buffer {
public:
    Buffer() = default;
    Buffer(const void* bytes, size_t size, bool device) : size_(size), device_(device) {
        if (size == 0) return;
        if (device) {
            if (cudaMalloc(&data_, size) != cudaSuccess) std::abort();
        } else {
            data_ = std::malloc(size);
        }
        if (bytes) {
            std::memcpy(data_, bytes, size);
        } else {
            std::memset(data_, 0xff, size);  // outputs start as NaN: an unwritten one shows
        }
    }
    Buffer(Buffer&& other) noexcept { *this = std::move(other); }
    Buffer& operator=(Buffer&& other) noexcept {
        std::swap(data_, other.data_);
        std::swap(size_, other.size_);
        std::swap(device_, other.device_);
        return *this;
    }
    Buffer(const Buffer&) = delete;
    ~Buffer() {
        if (data_ == nullptr) return;
        if (device_) {
            cudaFree(data_);
        } else {
            std::free(data_);
        }
    }
    template <typename T> T* as() const { return static_cast<T*>(data_); }
    std::vector<uint8_t> bytes() const {
        std::vector<uint8_t> out(size_);
        if (size_) std::memcpy(out.data(), data_, size_);
        return out;
    }

private:
    void* data_ = nullptr;
    size_t size_ = 0;
    bool device_ = false;
};

template <typename T>
Buffer input(const std::vector<T>& host, bool device) {
    return Buffer(host.data(), host.size() * sizeof(T), device);
}
template <typename T>
Buffer output(size_t count, bool device) {
    return Buffer(nullptr, count * sizeof(T), device);
}

// ---- Results and their comparison ---------------------------------------------------------------

enum class Kind { kFloat32, kFloat64, kBFloat16, kFloat16, kBytes };

struct Output {
    std::string name;
    Kind kind;
    std::vector<uint8_t> bytes;
};

struct Result {
    int status = 0;
    std::string message;
    std::vector<Output> outputs;

    void add(const std::string& name, Kind kind, const Buffer& buffer) { outputs.push_back(Output{name, kind, buffer.bytes()}); }
};

double element(const Output& o, size_t i) {
    switch (o.kind) {
        case Kind::kFloat32: {
            float v;
            std::memcpy(&v, o.bytes.data() + 4 * i, 4);
            return v;
        }
        case Kind::kFloat64: {
            double v;
            std::memcpy(&v, o.bytes.data() + 8 * i, 8);
            return v;
        }
        case Kind::kBFloat16: {
            unsigned short v;
            std::memcpy(&v, o.bytes.data() + 2 * i, 2);
            return __bfloat162float(__ushort_as_bfloat16(v));
        }
        case Kind::kFloat16: {
            unsigned short v;
            std::memcpy(&v, o.bytes.data() + 2 * i, 2);
            return __half2float(__ushort_as_half(v));
        }
        case Kind::kBytes: return o.bytes[i];
    }
    return 0;
}

size_t count(const Output& o) {
    switch (o.kind) {
        case Kind::kFloat32: return o.bytes.size() / 4;
        case Kind::kFloat64: return o.bytes.size() / 8;
        case Kind::kBFloat16:
        case Kind::kFloat16: return o.bytes.size() / 2;
        case Kind::kBytes: return o.bytes.size();
    }
    return 0;
}

// How close CUDA must come to the CPU: |cuda - cpu| <= floor + absolute * scale + relative * |cpu|,
// where scale is the largest |cpu| of the output (gradients of one call share a scale).
struct Tolerance {
    double relative;
    double absolute;
    double floor = 0.0;
};

typedef std::function<Tolerance(const std::string& output)> Tolerances;

void compare_values(const std::string& what, const Output& cuda, const Output& cpu, Tolerance t) {
    if (cuda.bytes.size() != cpu.bytes.size()) {
        report.fail(what + ": " + cuda.name + " has a different size");
        return;
    }
    const size_t n = count(cpu);
    double scale = 0.0;
    for (size_t i = 0; i < n; ++i) {
        const double v = element(cpu, i);
        if (std::isfinite(v)) scale = std::max(scale, std::fabs(v));
    }
    size_t bad = 0;
    size_t first = 0;
    for (size_t i = 0; i < n; ++i) {
        const double a = element(cuda, i);
        const double b = element(cpu, i);
        bool ok;
        if (std::isnan(a) || std::isnan(b)) {
            ok = std::isnan(a) && std::isnan(b);
        } else if (std::isinf(a) || std::isinf(b)) {
            ok = a == b;
        } else {
            ok = std::fabs(a - b) <= t.floor + t.absolute * scale + t.relative * std::fabs(b);
        }
        if (!ok && bad++ == 0) first = i;
    }
    if (bad == 0) {
        report.pass();
    } else {
        report.fail(what + format(": %s differs at %zu of %zu elements; first [%zu]: cuda %.9g, cpu %.9g (scale %.3g)", cuda.name.c_str(), bad,
                                  n, first, element(cuda, first), element(cpu, first), scale));
    }
}

bool mentions_same_argument(const std::string& a, const std::string& b) {
    // The CPU names the lowest index first, CUDA the lowest error kind (cuda/README.md): compare
    // what is named, e.g. "targets[" or "offsets[", not the index.
    for (const char* key : {"targets[", "offsets[", "logits row", "logprob[", "old_logprob[", "advantages[", "ref_logprob[", "entropy[",
                            "rewards[", "values[", "RLOO", "not CUDA device memory", "group_size"}) {
        const bool in_a = a.find(key) != std::string::npos;
        const bool in_b = b.find(key) != std::string::npos;
        if (in_a && in_b) return true;
    }
    return false;
}

// When set, compare() also hands the CPU result and the first CUDA one to it (a reference check).
std::function<void(const std::string& what, const Result&)> also_check;

// Runs `call` once on the CPU and, under each schedule, on the emulated GPU; compares.
void compare(const std::string& what, const std::function<Result(int device)>& call, const Tolerances& tolerances) {
    const Result cpu = call(kCpu);
    if (also_check) also_check(what + " [cpu]", cpu);
    std::vector<Result> runs;
    for (const Schedule& s : schedules_for(report.case_index)) {
        apply(s);
        runs.push_back(call(kCuda));
        const std::vector<std::string> misuses = simt::take_misuses();
        for (const std::string& m : misuses) report.fail(what + " [" + s.name + "]: emulator: " + m);
        if (misuses.empty()) report.pass();
    }
    apply(Schedule{simt::Order::kForward, 1, 0xff, "forward"});
    const Result& cuda = runs[0];
    if (also_check) also_check(what + " [cuda]", cuda);
    // The schedules agree bit for bit: no race, no read of uninitialised shared memory.
    for (size_t r = 1; r < runs.size(); ++r) {
        bool same = runs[r].status == cuda.status && runs[r].outputs.size() == cuda.outputs.size();
        for (size_t i = 0; same && i < cuda.outputs.size(); ++i) same = runs[r].outputs[i].bytes == cuda.outputs[i].bytes;
        report.expect(same, what + ": the CUDA results depend on the schedule (block/thread order or shared-memory poison)");
    }
    if (cuda.status != cpu.status) {
        report.fail(what + format(": status cuda %d (%s), cpu %d (%s)", cuda.status, cuda.message.c_str(), cpu.status, cpu.message.c_str()));
        return;
    }
    report.pass();
    if (cpu.status != GSPO4J_OK) {
        report.expect(mentions_same_argument(cuda.message, cpu.message),
                      what + ": messages name different things: cuda \"" + cuda.message + "\", cpu \"" + cpu.message + "\"");
        return;
    }
    for (size_t i = 0; i < cpu.outputs.size(); ++i) compare_values(what, cuda.outputs[i], cpu.outputs[i], tolerances(cpu.outputs[i].name));
}

// The status of a CUDA call is the entry point's, or else what its kernels recorded: read by the
// waiting check and by the deferred one (a ticket resolved at once) on alternate calls, so every
// case checks that both report the same.
Result finish(int device, int status) {
    static int calls = 0;
    Result r;
    if (status == GSPO4J_OK && device == kCuda) {
        if (++calls % 2 == 0) {
            status = gspo4j_cuda_check_error(nullptr);
        } else {
            int64_t ticket = -1;
            status = gspo4j_cuda_defer_error_check(nullptr, &ticket);
            if (status == GSPO4J_OK) status = gspo4j_cuda_resolve_error_check(ticket);
        }
    }
    r.status = status;
    r.message = status == GSPO4J_OK ? "" : gspo4j_last_error();
    return r;
}

// ---- Inputs -------------------------------------------------------------------------------------

std::mt19937_64 rng(20261125);

float normal(float sd) { return std::normal_distribution<float>(0.0f, sd)(rng); }
float uniform(float low, float high) { return std::uniform_real_distribution<float>(low, high)(rng); }
int64_t uniform_int(int64_t low, int64_t high) { return std::uniform_int_distribution<int64_t>(low, high)(rng); }

const char* dtype_name(int dtype) { return dtype == GSPO4J_BFLOAT16 ? "bf16" : dtype == GSPO4J_FLOAT16 ? "fp16" : "fp32"; }
Kind dtype_kind(int dtype) { return dtype == GSPO4J_BFLOAT16 ? Kind::kBFloat16 : dtype == GSPO4J_FLOAT16 ? Kind::kFloat16 : Kind::kFloat32; }
size_t dtype_bytes(int dtype) { return dtype == GSPO4J_FLOAT32 ? 4 : 2; }

// Logits in `dtype` at the given strides, `lead` elements after the allocation's start (so rows
// may start off 16-byte boundaries). Elements outside the rows are NaN: a kernel reading them
// would show.
struct Logits {
    int dtype;
    int64_t batch, seq, vocab, stride_batch, stride_seq, lead;
    std::vector<uint8_t> bytes;

    int64_t rows() const { return batch * seq; }
    int64_t offset(int64_t row) const { return lead + (row / seq) * stride_batch + (row % seq) * stride_seq; }
    size_t extent() const { return static_cast<size_t>(rows() == 0 ? lead : offset(rows() - 1) + vocab); }

    float get(int64_t index) const {
        if (dtype == GSPO4J_FLOAT32) {
            float v;
            std::memcpy(&v, bytes.data() + 4 * index, 4);
            return v;
        }
        unsigned short bits;
        std::memcpy(&bits, bytes.data() + 2 * index, 2);
        return dtype == GSPO4J_BFLOAT16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
    }

    void set(int64_t index, float value) {
        if (dtype == GSPO4J_FLOAT32) {
            std::memcpy(bytes.data() + 4 * index, &value, 4);
        } else {
            const unsigned short bits = dtype == GSPO4J_BFLOAT16 ? __bfloat16_as_ushort(__float2bfloat16_rn(value))
                                                                 : __half_as_ushort(__float2half_rn(value));
            std::memcpy(bytes.data() + 2 * index, &bits, 2);
        }
    }
};

enum class Fill {
    kNormal, kNegative, kDominant, kLarge, kNegInf, kNaN, kTiny, kLowest,
    // The extreme rows of issue 12, scaled by the temperature: z = 3 + tau * (...), so s = (z - M) / tau
    // is O(1) at every tau (near-ties a few ulps apart at tau = 1e-6).
    kNegInfRuns,    // -Inf at the head (16 entries: whole 16-byte vectors), in a run of 40, at the tail
    kNegInfTarget,  // -Inf entries, the target's among them on even rows
    kAllNegInf,     // row 0 entirely -Inf
    kHuge,          // |z| up to 1e30 and a max of 3e31 (fp16: 6e4 and 65000), not scaled
    kNearOne        // one dominant logit, the target (even rows) or not, by 18 tau or 40 tau
};
const char* fill_name(Fill f) {
    switch (f) {
        case Fill::kNormal: return "normal";
        case Fill::kNegative: return "all-negative";
        case Fill::kDominant: return "dominant";
        case Fill::kLarge: return "+-1e4";
        case Fill::kNegInf: return "-inf entries";
        case Fill::kNaN: return "NaN entry";
        case Fill::kTiny: return "constant";
        case Fill::kLowest: return "masked with -FLT_MAX";
        case Fill::kNegInfRuns: return "-inf runs";
        case Fill::kNegInfTarget: return "-inf target";
        case Fill::kAllNegInf: return "all -inf row";
        case Fill::kHuge: return "huge";
        case Fill::kNearOne: return "p->1";
    }
    return "?";
}

Logits make_logits(int dtype, int64_t batch, int64_t seq, int64_t vocab, int64_t stride_batch, int64_t stride_seq, int64_t lead, Fill fill,
                   const std::vector<int64_t>& targets, double temperature = 1.0) {
    const float tau = static_cast<float>(temperature);
    const float huge = dtype == GSPO4J_FLOAT16 ? 6e4f : 1e30f;
    Logits l{dtype, batch, seq, vocab, stride_batch, stride_seq, lead, {}};
    const size_t extent = l.extent() + 8;
    l.bytes.assign(extent * dtype_bytes(dtype), 0);
    for (size_t i = 0; i < extent; ++i) l.set(static_cast<int64_t>(i), kNaN);
    for (int64_t row = 0; row < l.rows(); ++row) {
        const int64_t base = l.offset(row);
        for (int64_t v = 0; v < vocab; ++v) {
            float x = 0;
            switch (fill) {
                case Fill::kNormal: x = normal(2.0f); break;
                case Fill::kNegative: x = -60.0f - uniform(0.0f, 20.0f); break;
                case Fill::kDominant: x = normal(1.0f); break;
                case Fill::kLarge: x = uniform(-1e4f, 1e4f); break;
                case Fill::kNegInf: x = normal(2.0f); break;
                case Fill::kNaN: x = normal(2.0f); break;
                case Fill::kTiny: x = 0.25f; break;
                case Fill::kLowest: x = -std::numeric_limits<float>::max(); break;  // -Inf once narrowed to fp16
                case Fill::kNegInfRuns:
                case Fill::kNegInfTarget:
                case Fill::kAllNegInf: x = 3.0f + tau * normal(2.0f); break;
                case Fill::kHuge: x = uniform(-huge, huge); break;
                case Fill::kNearOne: x = 3.0f + tau * normal(1.0f); break;
            }
            l.set(base + v, x);
        }
        const int64_t y = targets[static_cast<size_t>(row)];
        if (fill == Fill::kDominant && y >= 0 && y < vocab) l.set(base + (row % 2 ? y : (y + 1) % vocab), 40.0f);
        if (fill == Fill::kLarge && row % 2 == 0 && y >= 0 && y < vocab) l.set(base + y, 1e4f);
        if (fill == Fill::kNegInf) {
            // -Inf at the row's first four entries (a whole 16-byte vector of fp32 when the row is
            // aligned), at 5 (V = 7: a tail element), and at the last entry; never the target.
            for (int64_t v : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{3}, int64_t{5}, vocab - 1}) {
                if (v < vocab && v != y) l.set(base + v, -kInf);
            }
        }
        if (fill == Fill::kNaN && row == l.rows() / 2) l.set(base + vocab / 2, kNaN);
        if (fill == Fill::kNegInfRuns) {
            for (int64_t v = 0; v < vocab; ++v) {
                const bool run = v < 16 || (v >= vocab / 2 && v < vocab / 2 + 40) || v >= vocab - 2;
                if (run && v != y) l.set(base + v, -kInf);
            }
        }
        if (fill == Fill::kNegInfTarget) {
            for (int64_t v : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{3}, vocab - 1}) l.set(base + v, -kInf);
            if (row % 2 == 0) l.set(base + y, -kInf);
            if (vocab > 4) l.set(base + 4 + (y == 4), 3.0f);  // a finite entry, whatever y
        }
        if (fill == Fill::kAllNegInf) {
            for (int64_t v = 0; v < vocab; ++v) {
                if (row == 0 || v == 1) l.set(base + v, -kInf);
            }
        }
        if (fill == Fill::kHuge) l.set(base + (row % 2 ? (y + 1) % vocab : y), dtype == GSPO4J_FLOAT16 ? 65000.0f : 3e31f);
        if (fill == Fill::kNearOne) {
            const float margin = (row / 2) % 2 ? 40.0f : 18.0f;
            l.set(base + (row % 2 ? (y + 1) % vocab : y), 3.0f + tau * margin);
        }
    }
    return l;
}

// ---- Token log-prob forward and backward --------------------------------------------------------

struct LogitsCase {
    int dtype;
    int64_t batch, seq, vocab;
    const char* layout;  // "contiguous", "view" (rows of a longer sequence), "odd" (rows off 16-byte
                         // boundaries), "stride0" (every row of a batch the same memory)
    int threads;         // 0: the kernels' choice, else GSPO4J_CUDA_THREADS
    Fill fill;
    double temperature;
    bool check_finite;
    bool entropy;
    bool reference = false;  // also check both devices against a long double reference
    int expect_status = -1;  // >= 0: the status both devices must return
};

std::string describe(const LogitsCase& c) {
    return format("V=%lld %s %lldx%lld %s threads=%d %s tau=%.2g check=%d entropy=%d", static_cast<long long>(c.vocab), dtype_name(c.dtype),
                  static_cast<long long>(c.batch), static_cast<long long>(c.seq), c.layout, c.threads, fill_name(c.fill), c.temperature,
                  c.check_finite, c.entropy);
}

Logits logits_for(const LogitsCase& c, const std::vector<int64_t>& targets) {
    int64_t stride_seq = c.vocab, stride_batch = c.seq * c.vocab, lead = 0;
    const std::string layout = c.layout;
    if (layout == "view") {
        stride_batch = (c.seq + 1) * c.vocab;  // logits[:, :-1, :] of a [B, T+1, V] tensor
    } else if (layout == "odd") {
        stride_seq = c.vocab + 1;
        stride_batch = c.seq * stride_seq + 3;
        lead = 1;
    } else if (layout == "stride0") {
        stride_seq = 0;
        stride_batch = c.vocab;
    }
    return make_logits(c.dtype, c.batch, c.seq, c.vocab, stride_batch, stride_seq, lead, c.fill, targets, c.temperature);
}

void set_threads(int threads) {
    if (threads == 0) {
        unsetenv("GSPO4J_CUDA_THREADS");
    } else {
        setenv("GSPO4J_CUDA_THREADS", std::to_string(threads).c_str(), 1);
    }
}

Tolerance forward_tolerance(const std::string& name, const LogitsCase& c) {
    // Both sides read the same widened values and sum in fp32 lanes merged in fp64, in different
    // orders; errors are a few fp32 ulps of S and of T/S.
    const double scale = c.fill == Fill::kLarge ? 1e-7 : 0.0;  // lse ~ 1e4: ulps of the max
    // The floor: a dominant row's H and lp are only good to ~1e-7 nats on either side (the fp32
    // sum 1 + e^-40 keeps no tail).
    if (name == "entropy") return Tolerance{2e-5, 2e-6, 1e-7};
    return Tolerance{2e-6 + scale, 2e-6, 1e-7};
}

Tolerance gradient_tolerance(int dtype) {
    // The gradient is rounded to the logits' dtype: allow one rounding step of it, plus fp32
    // noise relative to the largest entry.
    switch (dtype) {
        case GSPO4J_BFLOAT16: return Tolerance{1.0 / 128, 1e-5};
        case GSPO4J_FLOAT16: return Tolerance{1.0 / 1024, 1e-5};
        default: return Tolerance{2e-5, 2e-6};
    }
}

std::vector<int64_t> random_targets(int64_t rows, int64_t vocab) {
    std::vector<int64_t> t(static_cast<size_t>(rows));
    for (auto& y : t) y = uniform_int(0, vocab - 1);
    if (rows > 1) t[1] = vocab - 1;  // the last column: a tail element
    return t;
}

// A long double reference of one row (docs/math.md), from the logits as stored: s = z / tau - M,
// S = sum e^s, lse = M + log S, lp = s_y - log S, H = log S - sum p s, and the gradient. `valid`
// is false for a row with NaN, +Inf or no finite entry.
struct RowReference {
    bool valid = false;
    long double max = 0, log_sum = 0, lse = 0, lp = 0, entropy = 0;
    std::vector<long double> grad;
};

RowReference reference_row(const Logits& l, int64_t row, int64_t y, double temperature, double grad_lp, double grad_h) {
    RowReference r;
    const int64_t base = l.offset(row);
    const long double tau = temperature;
    long double max = -INFINITY;
    for (int64_t v = 0; v < l.vocab; ++v) {
        const float z = l.get(base + v);
        if (std::isnan(z) || z == kInf) return r;
        max = std::max(max, static_cast<long double>(z) / tau);
    }
    if (max == -INFINITY) return r;
    // S = c + R, the terms at the max (exactly 1) apart: with p_y -> 1, R is far below the
    // precision of 1 + R even in long double.
    long double count = 0, rest = 0, weighted = 0;
    for (int64_t v = 0; v < l.vocab; ++v) {
        const long double shifted = static_cast<long double>(l.get(base + v)) / tau - max;
        const long double e = std::exp(shifted);
        if (shifted == 0) {
            count += 1;
        } else {
            rest += e;
        }
        if (e > 0) weighted += e * shifted;
    }
    const long double sum = count + rest;
    r.valid = true;
    r.max = max;
    r.log_sum = std::log(count) + std::log1p(rest / count);
    r.lse = max + r.log_sum;
    r.lp = (static_cast<long double>(l.get(base + y)) / tau - max) - r.log_sum;
    r.entropy = r.log_sum - weighted / sum;
    r.grad.resize(static_cast<size_t>(l.vocab));
    for (int64_t v = 0; v < l.vocab; ++v) {
        const long double log_p = (static_cast<long double>(l.get(base + v)) / tau - max) - r.log_sum;
        const long double p = std::exp(log_p);
        const long double one_hot_minus_p = v == y ? -std::expm1(log_p) : -p;
        r.grad[static_cast<size_t>(v)] = (grad_lp * one_hot_minus_p - (p > 0 ? grad_h * p * (log_p + r.entropy) : 0)) / tau;
    }
    return r;
}

const Output* find_output(const Result& r, const std::string& name) {
    for (const Output& o : r.outputs) {
        if (o.name == name) return &o;
    }
    return nullptr;
}

bool close_relative(double got, long double want, long double allowed) {
    if (std::isinf(static_cast<double>(want))) return got == static_cast<double>(want);
    return std::fabs(static_cast<long double>(got) - want) <= allowed;
}

// The forward's lp, lse and H against the reference, in relative terms: lp and H to 2e-5 of
// themselves (float32 s carries |s| 2^-24 into each e^s), lse to 2e-6 of |M / tau| + |log S|.
void check_forward_reference(const std::string& what, const Result& r, const LogitsCase& c, const Logits& l,
                             const std::vector<int64_t>& targets) {
    if (r.status != GSPO4J_OK) return;
    const Output* lp = find_output(r, "logprob");
    const Output* lse = find_output(r, "lse");
    const Output* h = find_output(r, "entropy");
    for (int64_t row = 0; row < l.rows(); ++row) {
        const RowReference want = reference_row(l, row, targets[static_cast<size_t>(row)], c.temperature, 0, 0);
        if (!want.valid) continue;
        const size_t i = static_cast<size_t>(row);
        const long double lse_scale = std::fabs(want.max) + std::fabs(want.log_sum);
        bool ok = close_relative(element(*lp, i), want.lp, 2e-5L * std::fabs(want.lp) + 1e-30L) &&
                  close_relative(element(*lse, i), want.lse, 2e-6L * lse_scale + 1e-30L);
        if (h) ok = ok && close_relative(element(*h, i), want.entropy, 2e-5L * std::fabs(want.entropy) + 1e-30L);
        if (!ok) {
            report.fail(what + format(": row %lld vs the reference: lp %.9g (want %.9Lg), lse %.17g (want %.17Lg), H %.9g (want %.9Lg)",
                                      static_cast<long long>(row), element(*lp, i), want.lp, element(*lse, i), want.lse,
                                      h ? element(*h, i) : 0.0, want.entropy));
            return;
        }
    }
    report.pass();
}

void forward_case(const LogitsCase& c) {
    const std::vector<int64_t> targets = random_targets(c.batch * c.seq, c.vocab);
    const Logits l = logits_for(c, targets);
    const int64_t rows = l.rows();
    set_threads(c.threads);
    int cpu_status = -1;
    if (c.reference) {
        also_check = [&](const std::string& what, const Result& r) { check_forward_reference(what, r, c, l, targets); };
    }
    compare("forward " + describe(c),
            [&](int device) {
                const bool d = device == kCuda;
                const Buffer logits(l.bytes.data(), l.bytes.size(), d);
                const Buffer t = input(targets, d);
                Buffer lp = output<float>(rows, d), lse = output<double>(rows, d), h = output<float>(rows, d);
                const void* start = logits.as<uint8_t>() + l.lead * dtype_bytes(c.dtype);
                Result r = finish(device, gspo4j_token_logprob_forward(device, nullptr, start, c.dtype, c.batch, c.seq, c.vocab, l.stride_batch,
                                                                       l.stride_seq, t.as<int64_t>(), c.temperature, c.check_finite,
                                                                       lp.as<float>(), lse.as<double>(), c.entropy ? h.as<float>() : nullptr));
                r.add("logprob", Kind::kFloat32, lp);
                r.add("lse", Kind::kFloat64, lse);
                if (c.entropy) r.add("entropy", Kind::kFloat32, h);
                if (device == kCpu) cpu_status = r.status;
                return r;
            },
            [&](const std::string& name) { return forward_tolerance(name, c); });
    also_check = nullptr;
    if (c.expect_status >= 0) {
        report.expect(cpu_status == c.expect_status, "forward " + describe(c) + format(": status %d, expected %d", cpu_status, c.expect_status));
    }
    set_threads(0);
}

// The gradient against the reference: one rounding step of the dtype relative to each entry,
// plus 1e-6 of the row's largest (fp16: and its subnormal spacing); entries beyond the dtype's
// range (fp16 at tau = 1e-6) are left out.
void check_backward_reference(const std::string& what, const Result& r, const LogitsCase& c, const Logits& l,
                              const std::vector<int64_t>& targets, const std::vector<float>& grad_lp, const std::vector<float>& grad_h,
                              const std::function<int64_t(int64_t row)>& grad_row_start) {
    if (r.status != GSPO4J_OK) return;
    const Output& grad = r.outputs[0];
    const long double relative = c.dtype == GSPO4J_BFLOAT16 ? 1.0L / 128 : c.dtype == GSPO4J_FLOAT16 ? 1.0L / 1024 : 1e-5L;
    const long double floor = c.dtype == GSPO4J_FLOAT16 ? 6e-8L : 1e-30L;
    const long double range = c.dtype == GSPO4J_FLOAT16 ? 65504.0L : 3.4e38L;
    for (int64_t row = 0; row < l.rows(); ++row) {
        const size_t i = static_cast<size_t>(row);
        const RowReference want = reference_row(l, row, targets[i], c.temperature, grad_lp[i], c.entropy ? grad_h[i] : 0.0f);
        if (!want.valid) continue;
        long double scale = 0;
        for (long double w : want.grad) scale = std::max(scale, std::fabs(w));
        for (int64_t v = 0; v < l.vocab; ++v) {
            const long double w = want.grad[static_cast<size_t>(v)];
            if (std::fabs(w) > range) continue;
            const double got = element(grad, static_cast<size_t>(grad_row_start(row) + v));
            if (!close_relative(got, w, relative * std::fabs(w) + 1e-6L * scale + floor)) {
                report.fail(what + format(": row %lld column %lld vs the reference: %.9g, want %.9Lg (row scale %.3Lg)", static_cast<long long>(row),
                                          static_cast<long long>(v), got, w, scale));
                return;
            }
        }
    }
    report.pass();
}

// The backward from the CPU forward's lse and entropy, out of place (into a buffer at other
// strides and alignment) or in place.
void backward_case(const LogitsCase& c, bool in_place) {
    const std::vector<int64_t> targets = random_targets(c.batch * c.seq, c.vocab);
    const Logits l = logits_for(c, targets);
    const int64_t rows = l.rows();
    std::vector<float> lp(rows), entropy(rows), grad_lp(rows), grad_h(rows);
    std::vector<double> lse(rows);
    const void* host_start = l.bytes.data() + l.lead * dtype_bytes(c.dtype);
    if (gspo4j_token_logprob_forward(kCpu, nullptr, host_start, c.dtype, c.batch, c.seq, c.vocab, l.stride_batch, l.stride_seq, targets.data(),
                                     c.temperature, 0, lp.data(), lse.data(), entropy.data()) != GSPO4J_OK) {
        report.fail("backward " + describe(c) + ": the CPU forward failed: " + gspo4j_last_error());
        return;
    }
    for (int64_t i = 0; i < rows; ++i) {
        grad_lp[i] = normal(1.0f);
        grad_h[i] = normal(0.5f);
    }
    // Out of place: a [rows, V] gradient 2 elements off the allocation's start, so its rows and
    // the logits' rows have different 16-byte alignments whenever the logits' are aligned.
    const int64_t grad_lead = in_place ? l.lead : 2;
    const int64_t grad_stride_seq = in_place ? l.stride_seq : c.vocab;
    const int64_t grad_stride_batch = in_place ? l.stride_batch : c.seq * c.vocab;
    const size_t grad_bytes = in_place ? l.bytes.size() : (grad_lead + rows * c.vocab + 4) * dtype_bytes(c.dtype);
    set_threads(c.threads);
    if (c.reference) {
        also_check = [&](const std::string& what, const Result& r) {
            check_backward_reference(what, r, c, l, targets, grad_lp, grad_h, [&](int64_t row) {
                return in_place ? l.offset(row) : grad_lead + (row / c.seq) * grad_stride_batch + (row % c.seq) * grad_stride_seq;
            });
        };
    }
    compare(std::string("backward ") + (in_place ? "in place " : "") + describe(c),
            [&](int device) {
                const bool d = device == kCuda;
                const Buffer logits(l.bytes.data(), l.bytes.size(), d);
                const Buffer t = input(targets, d), lse_in = input(lse, d), h_in = input(entropy, d), g_lp = input(grad_lp, d),
                             g_h = input(grad_h, d);
                Buffer grad = in_place ? Buffer() : output<uint8_t>(grad_bytes, d);
                const uint8_t* start = logits.as<uint8_t>() + l.lead * dtype_bytes(c.dtype);
                uint8_t* grad_start = in_place ? const_cast<uint8_t*>(start) : grad.as<uint8_t>() + grad_lead * dtype_bytes(c.dtype);
                Result r = finish(device, gspo4j_token_logprob_backward(device, nullptr, start, c.dtype, c.batch, c.seq, c.vocab, l.stride_batch,
                                                                        l.stride_seq, t.as<int64_t>(), c.temperature, lse_in.as<double>(),
                                                                        h_in.as<float>(), g_lp.as<float>(), c.entropy ? g_h.as<float>() : nullptr,
                                                                        grad_start, grad_stride_batch, grad_stride_seq));
                // The whole buffer: the rows, and what lies between them untouched.
                r.add("grad_logits", dtype_kind(c.dtype), in_place ? logits : grad);
                return r;
            },
            [&](const std::string&) { return gradient_tolerance(c.dtype); });
    also_check = nullptr;
    set_threads(0);
}

void token_logprob_section() {
    const int dtypes[] = {GSPO4J_FLOAT32, GSPO4J_BFLOAT16, GSPO4J_FLOAT16};
    const char* layouts[] = {"contiguous", "view", "odd", "stride0"};
    const int thread_counts[] = {128, 256, 512, 1024};
    int turn = 0;
    for (int64_t vocab : {int64_t{1}, int64_t{7}, int64_t{31}, int64_t{1000}, int64_t{32001}}) {
        for (int dtype : dtypes) {
            for (const char* layout : layouts) {
                ++turn;
                LogitsCase c{dtype, 2, 3, vocab, layout, 0, Fill::kNormal, turn % 2 ? 1.0 : 0.7, true, turn % 3 != 0};
                if (selected("forward " + describe(c))) forward_case(c);
                if (std::string(layout) != "stride0" && selected("backward " + describe(c))) backward_case(c, false);
                if (std::string(layout) != "stride0" && selected("backward in place " + describe(c))) backward_case(c, true);
            }
            for (int threads : thread_counts) {
                ++turn;
                LogitsCase c{dtype, 1, 3, vocab, layouts[turn % 3], threads, Fill::kNormal, 1.0, true, true};
                if (selected("forward " + describe(c))) forward_case(c);
                if (selected("backward " + describe(c))) backward_case(c, turn % 2 == 0);
            }
        }
    }
    // Extreme rows: all-negative, one dominant logit (p -> 1), +-1e4, -Inf entries and a NaN with
    // checking off, constant rows.
    // A whole row at the lowest float (how some samplers mask), whose max is -FLT_MAX itself.
    for (Fill fill : {Fill::kNegative, Fill::kDominant, Fill::kLarge, Fill::kNegInf, Fill::kNaN, Fill::kTiny, Fill::kLowest}) {
        for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{32001}}) {
            for (int dtype : dtypes) {
                ++turn;
                const bool check = fill != Fill::kNegInf && fill != Fill::kNaN && fill != Fill::kLowest;
                LogitsCase c{dtype, 2, 2, vocab, turn % 2 ? "contiguous" : "odd", 0, fill, turn % 2 ? 1.0 : 0.7, check, true};
                if (selected("forward " + describe(c))) forward_case(c);
                if (fill != Fill::kNaN && fill != Fill::kNegInf && fill != Fill::kLowest && selected("backward " + describe(c))) {
                    backward_case(c, turn % 2 == 0);
                }
            }
        }
    }
}

// Issue 12's extreme rows on both devices, each also against a long double reference: -Inf entries
// (at the head, in 16-byte vectors, in runs, at the tail, at the target) with checking on, a row
// of only -Inf (an error with checking on; lse -Inf, lp and H NaN with it off), maxima of 3e31,
// p -> 1 on the target and off it, at tau in {1e-6, 1e-3, 0.7, 1}.
void extreme_rows_section() {
    const int dtypes[] = {GSPO4J_FLOAT32, GSPO4J_BFLOAT16, GSPO4J_FLOAT16};
    int turn = 0;
    for (Fill fill : {Fill::kNegInfRuns, Fill::kNegInfTarget, Fill::kAllNegInf, Fill::kHuge, Fill::kNearOne}) {
        for (double tau : {1e-6, 1e-3, 0.7, 1.0}) {
            for (int dtype : dtypes) {
                ++turn;
                const int64_t vocab = turn % 5 == 0 ? 32001 : turn % 2 ? 1000 : 61;
                const bool all_neg_inf = fill == Fill::kAllNegInf;
                LogitsCase c{dtype, 2, 2, vocab, turn % 3 ? "contiguous" : "odd", 0, fill, tau, true, turn % 4 != 1};
                c.reference = true;
                c.expect_status = all_neg_inf ? GSPO4J_ERROR_NON_FINITE : GSPO4J_OK;
                if (selected("extreme forward " + describe(c))) forward_case(c);
                if (all_neg_inf) {
                    c.check_finite = false;
                    c.expect_status = GSPO4J_OK;
                    if (selected("extreme forward " + describe(c))) forward_case(c);
                }
                if (selected("extreme backward " + describe(c))) backward_case(c, turn % 2 == 0);
            }
        }
    }
}

// Rows split over several CTAs: few rows of a long vocabulary. The plan splits only when opted in
// (GSPO4J_CUDA_SPLIT_ROWS=1) and there are fewer than 4 rows per multiprocessor.
void split_rows_section() {
    setenv("GSPO4J_CUDA_SPLIT_ROWS", "1", 1);
    struct Unset {
        ~Unset() { unsetenv("GSPO4J_CUDA_SPLIT_ROWS"); }
    } unset;
    const int dtypes[] = {GSPO4J_FLOAT32, GSPO4J_BFLOAT16, GSPO4J_FLOAT16};
    int turn = 0;
    for (int64_t vocab : {int64_t{50000}, int64_t{140001}}) {
        for (int dtype : dtypes) {
            ++turn;
            LogitsCase c{dtype, 1, 2, vocab, turn % 2 ? "contiguous" : "odd", 0, turn == 2 ? Fill::kDominant : Fill::kNormal, 0.7, true, true};
            if (selected("split forward " + describe(c))) forward_case(c);
            if (selected("split backward " + describe(c))) backward_case(c, turn % 2 == 1);
        }
    }
}


// ---- Per-token losses ---------------------------------------------------------------------------

// A batch of responses over the token axis: padded [batch, seq] or packed with offsets, a mask
// with holes and empty responses, per-token log-probs near their old values (ratios around 1, some
// outside the clip range), advantages per response or per token.
struct Batch {
    int64_t batch = 0, seq = 0, tokens = 0;
    std::vector<int64_t> offsets;  // empty: padded
    std::vector<uint8_t> mask;
    std::vector<float> logprob, old_logprob, ref_logprob, entropy, advantages, token_advantages, rollout_logprob;

    const char* layout() const { return offsets.empty() ? "padded" : "packed"; }
};

Batch make_batch(int64_t batch, bool packed, double spread) {
    Batch b;
    b.batch = batch;
    std::vector<int64_t> lengths(static_cast<size_t>(batch));
    for (auto& l : lengths) l = uniform_int(0, 3) == 0 ? uniform_int(0, 2) : uniform_int(3, 40);
    if (batch > 2) lengths[1] = 0;  // an empty response
    int64_t longest = 0;
    for (int64_t l : lengths) longest = std::max(longest, l);
    if (packed) {
        b.offsets.push_back(0);
        for (int64_t l : lengths) b.offsets.push_back(b.offsets.back() + l);
        b.tokens = b.offsets.back();
        b.seq = longest;
    } else {
        b.seq = longest + 2;
        b.tokens = batch * b.seq;
    }
    const size_t n = static_cast<size_t>(b.tokens);
    b.mask.assign(n, 0);
    for (int64_t r = 0; r < batch; ++r) {
        const int64_t begin = packed ? b.offsets[r] : r * b.seq;
        for (int64_t t = 0; t < lengths[r]; ++t) b.mask[begin + t] = uniform_int(0, 9) != 0;  // holes
    }
    b.logprob.resize(n);
    b.old_logprob.resize(n);
    b.ref_logprob.resize(n);
    b.entropy.resize(n);
    b.token_advantages.resize(n);
    b.rollout_logprob.resize(n);
    for (size_t i = 0; i < n; ++i) {
        b.logprob[i] = -uniform(0.0f, 6.0f);
        b.old_logprob[i] = b.logprob[i] + normal(static_cast<float>(spread));
        b.ref_logprob[i] = b.logprob[i] + normal(0.3f);
        b.entropy[i] = uniform(0.0f, 3.0f);
        b.token_advantages[i] = normal(1.0f);
        b.rollout_logprob[i] = b.old_logprob[i] + normal(static_cast<float>(spread));
        if (!b.mask[i]) b.logprob[i] = kNaN;  // never read where masked
    }
    b.advantages.resize(static_cast<size_t>(batch));
    for (auto& a : b.advantages) a = normal(1.0f);
    return b;
}

gspo4j_loss_config loss_config(int ratio_level, int aggregation, long turn) {
    gspo4j_loss_config c;
    gspo4j_loss_config_init(&c);
    c.ratio_level = ratio_level;
    c.aggregation = aggregation;
    if (ratio_level != GSPO4J_RATIO_SEQUENCE) {
        c.eps_low = 0.2;
        c.eps_high = 0.28;
    }
    c.kl_estimator = static_cast<int32_t>(turn % 3);
    c.kl_coef = turn % 2 ? 0.05 : 0.0;
    c.entropy_coef = turn % 3 == 0 ? 0.01 : 0.0;
    c.dual_clip = turn % 4 == 1 ? 3.0 : 0.0;
    c.log_ratio_clamp = turn % 5 == 3 ? 0.5 : 20.0;
    c.normalizer = turn % 5 == 2 ? 7.0 : 0.0;
    c.length_norm = turn % 7 == 3 ? 64.0 : 0.0;
    if (turn % 6 == 4) {  // a data-parallel step's totals, above any call's own counts
        c.responses_total = 1e4;
        c.tokens_total = 2e5;
        c.batch_total = 3e4;
    }
    return c;
}

std::string describe(const gspo4j_loss_config& c, const Batch& b, bool on_policy, bool per_token) {
    return format("level=%d agg=%d %s B=%lld N=%lld %s%s kl=%d/%.2f ent=%.2f dual=%.1f clamp=%.1f norm=%.0f lnorm=%.0f check=%d",
                  c.ratio_level, c.aggregation, b.layout(), static_cast<long long>(b.batch), static_cast<long long>(b.tokens),
                  on_policy ? "on-policy" : "off-policy", per_token ? " per-token-A" : "", c.kl_estimator, c.kl_coef, c.entropy_coef,
                  c.dual_clip, c.log_ratio_clamp, c.normalizer, c.length_norm, c.check_finite);
}

Tolerance loss_tolerance(const std::string&) {
    // The same per-token math (loss_math.h) on both devices; only the order of the fp64 sums
    // differs, so float outputs agree to an ulp or two.
    return Tolerance{1e-6, 1e-7, 1e-30};
}

// `rollout`: pass the batch's rollout_logprob (mu); `threshold`: top-entropy selection at this threshold.
void policy_loss_case(const gspo4j_loss_config& config, const Batch& b, bool on_policy, bool per_token, bool grad_entropy, bool metrics,
                      bool rollout = false, const double* threshold = nullptr, const std::string& label = "") {
    compare("policy_loss " + label + describe(config, b, on_policy, per_token),
            [&](int device) {
                const bool d = device == kCuda;
                const Buffer offsets = input(b.offsets, d), mask = input(b.mask, d), lp = input(b.logprob, d),
                             olp = input(b.old_logprob, d), ref = input(b.ref_logprob, d), h = input(b.entropy, d),
                             adv = input(per_token ? b.token_advantages : b.advantages, d), mu = input(b.rollout_logprob, d),
                             cut = input(std::vector<double>{threshold ? *threshold : 0.0}, d);
                Buffer loss = output<float>(1, d), g_lp = output<float>(b.tokens, d), g_h = output<float>(b.tokens, d),
                       m = output<float>(GSPO4J_METRIC_COUNT, d);
                Result r = finish(device, gspo4j_policy_loss(device, nullptr, &config, b.batch, b.seq, b.tokens,
                                                             b.offsets.empty() ? nullptr : offsets.as<int64_t>(), lp.as<float>(),
                                                             on_policy ? nullptr : olp.as<float>(), rollout ? mu.as<float>() : nullptr,
                                                             mask.as<uint8_t>(), adv.as<float>(), per_token, ref.as<float>(),
                                                             h.as<float>(), threshold ? cut.as<double>() : nullptr, loss.as<float>(),
                                                             g_lp.as<float>(), grad_entropy ? g_h.as<float>() : nullptr,
                                                             metrics ? m.as<float>() : nullptr));
                r.add("loss", Kind::kFloat32, loss);
                r.add("grad_logprob", Kind::kFloat32, g_lp);
                if (grad_entropy) r.add("grad_entropy", Kind::kFloat32, g_h);
                if (metrics) r.add("metrics", Kind::kFloat32, m);
                return r;
            },
            loss_tolerance);
}

// Rollout correction and top-entropy selection (docs/math.md "Training-inference mismatch", "Token
// selection"): every objective with each weight option, padded and packed, on and off policy.
void rollout_section() {
    struct Variant {
        const char* name;
        bool rollout;     // pass mu
        bool threshold;   // top-entropy selection
        void (*apply)(gspo4j_loss_config&);
    };
    const Variant variants[] = {
        {"mu-metrics", true, false, [](gspo4j_loss_config&) {}},
        {"tis-token", true, false, [](gspo4j_loss_config& c) { c.rollout_level = GSPO4J_ROLLOUT_TOKEN, c.rollout_c_max = 2.0; }},
        {"mis-sequence", true, false,
         [](gspo4j_loss_config& c) { c.rollout_level = GSPO4J_ROLLOUT_SEQUENCE, c.rollout_mode = GSPO4J_ROLLOUT_MASK, c.rollout_c_max = 3.0; }},
        {"band-geometric", true, false,
         [](gspo4j_loss_config& c) {
             c.rollout_level = GSPO4J_ROLLOUT_GEOMETRIC, c.rollout_mode = GSPO4J_ROLLOUT_MASK, c.rollout_c_min = 0.9, c.rollout_c_max = 1.1;
         }},
        {"truncate-band-k3-token", true, false,
         [](gspo4j_loss_config& c) {
             c.rollout_level = GSPO4J_ROLLOUT_TOKEN, c.rollout_c_min = 0.8, c.rollout_c_max = 1.25;
             c.rejection_divergence = GSPO4J_DIVERGENCE_K3, c.rejection_high = 0.01;
         }},
        {"k1-mean", true, false,
         [](gspo4j_loss_config& c) {
             c.rejection_divergence = GSPO4J_DIVERGENCE_K1, c.rejection_scope = GSPO4J_REJECT_MEAN, c.rejection_low = -0.05,
             c.rejection_high = 0.02;
         }},
        {"k2-sum", true, false,
         [](gspo4j_loss_config& c) { c.rejection_divergence = GSPO4J_DIVERGENCE_K2, c.rejection_scope = GSPO4J_REJECT_SUM, c.rejection_high = 0.05; }},
        {"k3-max-offpolicy", true, false,
         [](gspo4j_loss_config& c) {
             c.rejection_divergence = GSPO4J_DIVERGENCE_K3, c.rejection_scope = GSPO4J_REJECT_MAX, c.rejection_high = 0.02;
             c.off_policy_mask = 1, c.off_policy_delta = 0.0;
         }},
        {"offpolicy-no-mu", false, false, [](gspo4j_loss_config& c) { c.off_policy_mask = 1, c.off_policy_delta = -0.01; }},
        {"top-entropy", false, true, [](gspo4j_loss_config&) {}},
        {"top-entropy-mis-sequence", true, true,
         [](gspo4j_loss_config& c) { c.rollout_level = GSPO4J_ROLLOUT_SEQUENCE, c.rollout_mode = GSPO4J_ROLLOUT_MASK, c.rollout_c_max = 1.5; }},
    };
    struct ObjectiveCase {
        int objective;
        int level;
    };
    const ObjectiveCase objectives[] = {
        {GSPO4J_OBJECTIVE_CLIP, GSPO4J_RATIO_TOKEN},    {GSPO4J_OBJECTIVE_CLIP, GSPO4J_RATIO_SEQUENCE},
        {GSPO4J_OBJECTIVE_CLIP, GSPO4J_RATIO_SEQUENCE_TOKEN}, {GSPO4J_OBJECTIVE_CISPO, GSPO4J_RATIO_TOKEN},
        {GSPO4J_OBJECTIVE_SAPO, GSPO4J_RATIO_SEQUENCE_TOKEN}, {GSPO4J_OBJECTIVE_GMPO, GSPO4J_RATIO_SEQUENCE},
        {GSPO4J_OBJECTIVE_LUSPO, GSPO4J_RATIO_SEQUENCE}, {GSPO4J_OBJECTIVE_VESPO, GSPO4J_RATIO_TOKEN},
        {GSPO4J_OBJECTIVE_DPPO_TV, GSPO4J_RATIO_TOKEN},
    };
    // Each variant with three of the objectives in turn (every objective meets several variants).
    long turn = 0;
    size_t next = 0;
    for (const Variant& v : variants) {
        for (int pick = 0; pick < 3; ++pick) {
            const ObjectiveCase& o = objectives[next++ % (sizeof(objectives) / sizeof(objectives[0]))];
            for (bool packed : {false, true}) {
                ++turn;
                gspo4j_loss_config c = loss_config(o.level, static_cast<int>(turn % 4), turn);
                c.objective = o.objective;
                if (o.objective != GSPO4J_OBJECTIVE_CLIP && o.objective != GSPO4J_OBJECTIVE_LUSPO) c.dual_clip = 0.0;
                if (o.level == GSPO4J_RATIO_SEQUENCE) c.eps_low = 0.01, c.eps_high = 0.02;
                v.apply(c);
                const bool on_policy = turn % 3 == 0;
                const Batch b = make_batch(5 + turn % 4, packed, turn % 2 ? 0.2 : 0.05);
                const bool per_token = o.level != GSPO4J_RATIO_SEQUENCE && c.off_policy_mask == 0 && turn % 2 == 0;
                const double threshold = 1.5;  // entropies are uniform in [0, 3]
                const std::string label = format("rollout %s objective=%d ", v.name, o.objective);
                if (selected("policy_loss " + label + describe(c, b, on_policy, per_token))) {
                    policy_loss_case(c, b, on_policy, per_token, turn % 2 == 0, true, v.rollout, v.threshold ? &threshold : nullptr, label);
                }
            }
        }
    }
}

void policy_loss_section() {
    long turn = 0;
    for (int level : {GSPO4J_RATIO_TOKEN, GSPO4J_RATIO_SEQUENCE, GSPO4J_RATIO_SEQUENCE_TOKEN}) {
        for (int aggregation = GSPO4J_SEQ_MEAN_TOKEN_MEAN; aggregation <= GSPO4J_SEQ_MEAN_TOKEN_SUM_NORM; ++aggregation) {
            for (bool packed : {false, true}) {
                for (bool on_policy : {false, true}) {
                    ++turn;
                    const gspo4j_loss_config c = loss_config(level, aggregation, turn);
                    const Batch b = make_batch(turn % 4 == 0 ? 1 : 6 + turn % 5, packed, turn % 3 == 0 ? 0.5 : 0.05);
                    const bool per_token = level != GSPO4J_RATIO_SEQUENCE && turn % 2 == 0;
                    if (selected("policy_loss " + describe(c, b, on_policy, per_token))) {
                        policy_loss_case(c, b, on_policy, per_token, turn % 3 != 1, turn % 4 != 2);
                    }
                }
            }
        }
    }
    // Every KL estimator with each ratio level; no responses; all empty; checking off with NaN.
    for (int level : {GSPO4J_RATIO_TOKEN, GSPO4J_RATIO_SEQUENCE, GSPO4J_RATIO_SEQUENCE_TOKEN}) {
        for (int kl = GSPO4J_KL_K1; kl <= GSPO4J_KL_LOW_VAR; ++kl) {
            gspo4j_loss_config c = loss_config(level, GSPO4J_TOKEN_MEAN, 1);
            c.kl_estimator = kl;
            c.kl_coef = 0.1;
            c.entropy_coef = 0.02;
            const Batch b = make_batch(5, kl % 2 == 0, 0.3);
            if (selected("policy_loss kl " + describe(c, b, false, false), false)) policy_loss_case(c, b, false, false, true, true);
        }
        // verl's low_var_kl at and beyond its bound: ref - lp pushed up to 6 (k3 up to ~400 > 10).
        gspo4j_loss_config c = loss_config(level, GSPO4J_SEQ_MEAN_TOKEN_MEAN, 1);
        c.kl_estimator = GSPO4J_KL_LOW_VAR;
        c.kl_coef = 0.2;
        Batch b = make_batch(5, level != GSPO4J_RATIO_TOKEN, 0.3);
        for (size_t i = 0; i < b.ref_logprob.size(); ++i) b.ref_logprob[i] += static_cast<float>(i % 7);
        if (selected("policy_loss kl clamped " + describe(c, b, false, false), false)) policy_loss_case(c, b, false, false, true, true);
    }
    // The further objectives (docs/math.md "Further objectives"), each at the ratio levels it takes, with
    // every KL estimator in turn, padded and packed, on and off policy.
    struct ObjectiveCase {
        int objective;
        int level;
    };
    const ObjectiveCase objectives[] = {
        {GSPO4J_OBJECTIVE_CISPO, GSPO4J_RATIO_TOKEN},   {GSPO4J_OBJECTIVE_CISPO, GSPO4J_RATIO_SEQUENCE_TOKEN},
        {GSPO4J_OBJECTIVE_SAPO, GSPO4J_RATIO_TOKEN},    {GSPO4J_OBJECTIVE_SAPO, GSPO4J_RATIO_SEQUENCE_TOKEN},
        {GSPO4J_OBJECTIVE_GMPO, GSPO4J_RATIO_SEQUENCE}, {GSPO4J_OBJECTIVE_LUSPO, GSPO4J_RATIO_SEQUENCE},
        {GSPO4J_OBJECTIVE_VESPO, GSPO4J_RATIO_TOKEN},   {GSPO4J_OBJECTIVE_DPPO_TV, GSPO4J_RATIO_TOKEN},
        {GSPO4J_OBJECTIVE_DPPO_KL, GSPO4J_RATIO_TOKEN},
    };
    long objective_turn = 0;
    for (const ObjectiveCase& o : objectives) {
        for (bool packed : {false, true}) {
            for (bool on_policy : {false, true}) {
                ++objective_turn;
                gspo4j_loss_config c = loss_config(o.level, static_cast<int>(objective_turn % 4), objective_turn);
                c.objective = o.objective;
                c.kl_estimator = static_cast<int32_t>(objective_turn % 6);
                c.kl_coef = 0.05;
                if (o.objective != GSPO4J_OBJECTIVE_LUSPO) c.dual_clip = 0.0;
                if (o.level == GSPO4J_RATIO_SEQUENCE) {
                    c.eps_low = 0.01;
                    c.eps_high = 0.02;
                }
                c.dppo_delta_low = o.objective == GSPO4J_OBJECTIVE_DPPO_KL ? 0.002 : 0.02;
                c.dppo_delta_high = c.dppo_delta_low;
                c.dppo_ratio_cap = objective_turn % 3 == 0 ? 1.1 : 20.0;
                const Batch b = make_batch(5 + objective_turn % 3, packed, objective_turn % 2 ? 0.5 : 0.05);
                const bool per_token = o.level != GSPO4J_RATIO_SEQUENCE && objective_turn % 3 != 1;
                const std::string what = format("policy_loss objective=%d ", o.objective) + describe(c, b, on_policy, per_token);
                if (selected(what)) policy_loss_case(c, b, on_policy, per_token, objective_turn % 2 == 0, true);
            }
        }
    }
    for (bool packed : {false, true}) {
        gspo4j_loss_config c = loss_config(GSPO4J_RATIO_SEQUENCE, GSPO4J_SEQ_MEAN_TOKEN_MEAN, 0);
        Batch empty = make_batch(0, packed, 0.1);
        if (selected(std::string("policy_loss no responses ") + empty.layout(), false)) policy_loss_case(c, empty, false, false, true, true);
        Batch masked = make_batch(4, packed, 0.1);
        std::fill(masked.mask.begin(), masked.mask.end(), 0);
        if (selected(std::string("policy_loss all masked ") + masked.layout(), false)) policy_loss_case(c, masked, false, false, true, true);
        // Checking off: a NaN log-prob at a counted token reaches the loss on both devices alike.
        c.check_finite = 0;
        c.ratio_level = packed ? GSPO4J_RATIO_TOKEN : GSPO4J_RATIO_SEQUENCE;
        Batch nan = make_batch(4, packed, 0.1);
        for (size_t i = 0; i < nan.mask.size(); ++i) {
            if (nan.mask[i]) {
                nan.old_logprob[i] = kNaN;
                break;
            }
        }
        if (selected("policy_loss NaN unchecked " + describe(c, nan, false, false), false)) policy_loss_case(c, nan, false, false, true, true);
    }
    rollout_section();
}

void sequence_log_ratio_section() {
    long turn = 0;
    for (bool packed : {false, true}) {
        for (bool on_policy : {false, true}) {
            for (bool with_mask : {true, false}) {
                for (bool nan_lp : {false, true}) {
                    ++turn;
                    Batch b = make_batch(turn % 3 == 0 ? 1 : 7, packed, 0.2);
                    if (!with_mask) {
                        for (size_t i = 0; i < b.logprob.size(); ++i) {
                            if (!b.mask[i]) b.logprob[i] = -1.0f;
                        }
                    }
                    // Checking off with a NaN lp (finding 3): on-policy gives 0, off-policy NaN.
                    if (nan_lp && b.tokens > 0) b.logprob[0] = kNaN, b.mask[0] = 1;
                    const std::string what = format("sequence_log_ratio %s %s mask=%d nan=%d", b.layout(), on_policy ? "on-policy" : "off-policy",
                                                    with_mask, nan_lp);
                    if (!selected(what, false)) continue;
                    compare(what,
                            [&](int device) {
                                const bool d = device == kCuda;
                                const Buffer offsets = input(b.offsets, d), mask = input(b.mask, d), lp = input(b.logprob, d),
                                             olp = input(b.old_logprob, d);
                                Buffer ratio = output<float>(b.batch, d), lengths = output<float>(b.batch, d);
                                Result r = finish(device, gspo4j_sequence_log_ratio(device, nullptr, b.batch, b.seq, b.tokens,
                                                                                    packed ? offsets.as<int64_t>() : nullptr, lp.as<float>(),
                                                                                    on_policy ? nullptr : olp.as<float>(),
                                                                                    with_mask ? mask.as<uint8_t>() : nullptr, !nan_lp,
                                                                                    ratio.as<float>(), lengths.as<float>()));
                                r.add("log_ratio", Kind::kFloat32, ratio);
                                r.add("lengths", Kind::kFloat32, lengths);
                                return r;
                            },
                            loss_tolerance);
                }
            }
        }
    }
}

// ---- Top-entropy threshold ---------------------------------------------------------------------

// numpy.quantile(values, q), method "linear", written out from its definition in float64 (a
// sort, not the kernels' selection on keys).
double numpy_quantile(std::vector<double> values, double q) {
    if (values.empty()) return kInf;
    for (double v : values) {
        if (std::isnan(v)) return kNaN;
    }
    std::sort(values.begin(), values.end());
    const double position = static_cast<double>(values.size() - 1) * q;
    const size_t k = static_cast<size_t>(std::floor(position));
    if (k + 1 >= values.size()) return values.back();
    const double t = position - static_cast<double>(k);
    const double a = values[k], b = values[k + 1];
    return t >= 0.5 ? b - (b - a) * (1.0 - t) : a + (b - a) * t;
}

void entropy_threshold_case(const std::string& what, const std::vector<float>& entropy, const std::vector<uint8_t>& mask, double rho,
                            bool check) {
    if (!selected(what, false)) return;
    std::vector<double> counted;
    bool non_finite = false;
    for (size_t i = 0; i < entropy.size(); ++i) {
        if (mask.empty() || mask[i] != 0) {
            counted.push_back(entropy[i]);
            non_finite = non_finite || !std::isfinite(entropy[i]);
        }
    }
    const double expected = numpy_quantile(counted, 1.0 - rho);
    also_check = [&](const std::string& label, const Result& r) {
        if (check && non_finite) {
            report.expect(r.status == GSPO4J_ERROR_NON_FINITE && r.message.find("entropy[") != std::string::npos,
                          label + ": a non-finite counted entropy is an error naming entropy[]: " + r.message);
            return;
        }
        const double got = element(r.outputs[0], 0);
        const bool same = std::isnan(expected) ? std::isnan(got) : got == expected;
        report.expect(r.status == GSPO4J_OK && same, label + format(": threshold %.17g, numpy's quantile %.17g (status %d %s)", got, expected,
                                                                    r.status, r.message.c_str()));
    };
    compare(what,
            [&](int device) {
                const bool d = device == kCuda;
                const Buffer h = input(entropy, d), m = input(mask, d);
                Buffer t = output<double>(1, d);
                Result result = finish(device, gspo4j_entropy_threshold(device, nullptr, static_cast<int64_t>(entropy.size()), h.as<float>(),
                                                                        mask.empty() ? nullptr : m.as<uint8_t>(), rho, check, t.as<double>()));
                result.add("threshold", Kind::kFloat64, t);
                return result;
            },
            [](const std::string&) { return Tolerance{0.0, 0.0}; });  // the same keys and ranks: the same bits
    also_check = nullptr;
}

void entropy_threshold_section() {
    const double rhos[] = {1.0, 0.8, 0.5, 0.2, 0.1, 0.01, 1e-9};
    long turn = 0;
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{3}, int64_t{17}, int64_t{1000}, int64_t{4099}, int64_t{20000}}) {
        for (int fill = 0; fill < 4; ++fill) {
            // 0: entropies of a softmax (>= 0, spread); 1: few distinct values (long runs of equal
            // keys); 2: signed values and both zeros (the kernel is general); 3: huge and tiny.
            std::vector<float> h(static_cast<size_t>(n));
            for (auto& x : h) {
                switch (fill) {
                    case 0: x = uniform(0.0f, 6.0f); break;
                    case 1: x = static_cast<float>(uniform_int(0, 3)) * 0.25f; break;
                    case 2: x = uniform_int(0, 4) == 0 ? (uniform_int(0, 1) ? 0.0f : -0.0f) : normal(2.0f); break;
                    default: x = uniform_int(0, 1) ? uniform(0.0f, 1e-30f) : uniform(1e30f, 3e38f); break;
                }
            }
            for (int masking = 0; masking < 3; ++masking) {
                std::vector<uint8_t> mask;
                if (masking > 0) {
                    mask.resize(h.size());
                    for (auto& m : mask) m = masking == 2 ? 0 : static_cast<uint8_t>(uniform_int(0, 2) != 0 ? uniform_int(1, 255) : 0);
                }
                const double rho = rhos[turn++ % 7];
                entropy_threshold_case(format("entropy_threshold n=%lld fill=%d mask=%d rho=%g", static_cast<long long>(n), fill, masking, rho), h,
                                       mask, rho, true);
            }
        }
    }
    // Every rho on one set, and ranks on both sides of t = 0.5.
    std::vector<float> h(101);
    for (auto& x : h) x = uniform(0.0f, 3.0f);
    for (double rho : {1.0, 0.995, 0.9951, 0.75, 0.5, 0.333, 0.25, 0.005, 0.004}) {
        entropy_threshold_case(format("entropy_threshold n=101 rho=%g", rho), h, {}, rho, true);
    }
    // Non-finite values: errors naming entropy[] with checking on (also masked-out ones are
    // ignored), numpy's answer without it (+Inf sorts last; NaN gives NaN).
    for (float bad : {kNaN, kInf, -kInf}) {
        for (size_t at : {size_t{0}, size_t{57}, size_t{100}}) {
            std::vector<float> with_bad = h;
            with_bad[at] = bad;
            for (bool check : {true, false}) {
                entropy_threshold_case(format("entropy_threshold %g at %zu check=%d", bad, at, check), with_bad, {}, 0.2, check);
            }
            std::vector<uint8_t> mask(h.size(), 1);
            mask[at] = 0;
            entropy_threshold_case(format("entropy_threshold %g at %zu masked out", bad, at), with_bad, mask, 0.2, true);
        }
    }
}

// ---- Advantages ---------------------------------------------------------------------------------

void group_advantages_case(const std::string& what, const std::vector<float>& rewards, int64_t group_size, const std::vector<int64_t>& ids,
                           int mode, double eps, bool check) {
    if (!selected(what, false)) return;
    compare(what,
            [&](int device) {
                const bool d = device == kCuda;
                const Buffer r = input(rewards, d), g = input(ids, d);
                Buffer a = output<float>(rewards.size(), d);
                Result result = finish(device, gspo4j_group_advantages(device, nullptr, static_cast<int64_t>(rewards.size()), r.as<float>(),
                                                                       group_size, ids.empty() ? nullptr : g.as<int64_t>(), mode, eps, check,
                                                                       a.as<float>()));
                result.add("advantages", Kind::kFloat32, a);
                return result;
            },
            [](const std::string&) { return Tolerance{1e-6, 1e-7}; });
}

void advantages_section() {
    for (int mode : {GSPO4J_ADVANTAGE_MEAN_STD, GSPO4J_ADVANTAGE_MEAN, GSPO4J_ADVANTAGE_RLOO, GSPO4J_ADVANTAGE_MEAN_BATCH_STD}) {
        for (int64_t group : {int64_t{2}, int64_t{4}, int64_t{8}}) {
            std::vector<float> rewards(static_cast<size_t>(group * 5));
            for (auto& r : rewards) r = uniform_int(0, 2) == 0 ? 1.0f : normal(1.0f);
            // One group of equal rewards: exactly 0.
            for (int64_t i = 0; i < group; ++i) rewards[static_cast<size_t>(group + i)] = 0.5f;
            group_advantages_case(format("group_advantages mode=%d G=%lld contiguous", mode, static_cast<long long>(group)), rewards, group, {},
                                  mode, 1e-6, true);
            // The same groups by id, shuffled, with ids far apart.
            std::vector<int64_t> ids(rewards.size());
            for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i / group) * 1000003 - 7;
            std::shuffle(ids.begin(), ids.end(), rng);
            group_advantages_case(format("group_advantages mode=%d G=%lld by id", mode, static_cast<long long>(group)), rewards, 0, ids, mode,
                                  mode == GSPO4J_ADVANTAGE_MEAN_STD ? 0.1 : 1e-6, true);
        }
    }
    // Groups of one (0 for MEAN_STD and MEAN; an error for RLOO), by id and contiguous.
    for (int mode : {GSPO4J_ADVANTAGE_MEAN_STD, GSPO4J_ADVANTAGE_MEAN, GSPO4J_ADVANTAGE_RLOO, GSPO4J_ADVANTAGE_MEAN_BATCH_STD}) {
        group_advantages_case(format("group_advantages mode=%d groups of one", mode), {0.5f, 1.0f, -2.0f}, 1, {}, mode, 1e-6, true);
        group_advantages_case(format("group_advantages mode=%d a group of one by id", mode), {0.5f, 1.0f, -2.0f, 4.0f}, 0, {3, 9, 3, 3}, mode,
                              1e-6, true);
    }
    // A NaN reward with checking off (finding 2): its whole group NaN on both devices, wherever it
    // sits; with checking on, an error naming rewards[].
    for (int position : {0, 1, 3}) {
        std::vector<float> rewards = {1.0f, 1.0f, 1.0f, 1.0f, 0.0f, 1.0f, 0.0f, 1.0f};
        rewards[static_cast<size_t>(position)] = kNaN;
        for (int mode : {GSPO4J_ADVANTAGE_MEAN_STD, GSPO4J_ADVANTAGE_MEAN, GSPO4J_ADVANTAGE_RLOO, GSPO4J_ADVANTAGE_MEAN_BATCH_STD}) {
            group_advantages_case(format("group_advantages mode=%d NaN at %d unchecked", mode, position), rewards, 4, {}, mode, 1e-6, false);
            group_advantages_case(format("group_advantages mode=%d NaN at %d checked", mode, position), rewards, 4, {}, mode, 1e-6, true);
        }
    }
}

void gae_section() {
    long turn = 0;
    for (bool packed : {false, true}) {
        for (bool with_mask : {true, false}) {
            for (double gamma : {1.0, 0.99}) {
                ++turn;
                const double lambda = turn % 2 ? 0.95 : 1.0;
                Batch b = make_batch(6, packed, 0.1);
                std::vector<float> rewards(b.tokens), values(b.tokens);
                for (auto& r : rewards) r = uniform_int(0, 5) == 0 ? 1.0f : normal(0.1f);
                for (auto& v : values) v = normal(1.0f);
                const std::string what = format("gae %s mask=%d gamma=%.2f lambda=%.2f", b.layout(), with_mask, gamma, lambda);
                if (!selected(what, false)) continue;
                compare(what,
                        [&](int device) {
                            const bool d = device == kCuda;
                            const Buffer offsets = input(b.offsets, d), mask = input(b.mask, d), r = input(rewards, d), v = input(values, d);
                            Buffer adv = output<float>(b.tokens, d), ret = output<float>(b.tokens, d);
                            Result result = finish(device, gspo4j_gae(device, nullptr, b.batch, b.seq, b.tokens,
                                                                      packed ? offsets.as<int64_t>() : nullptr, r.as<float>(), v.as<float>(),
                                                                      with_mask ? mask.as<uint8_t>() : nullptr, gamma, lambda, 1,
                                                                      adv.as<float>(), ret.as<float>()));
                            result.add("advantages", Kind::kFloat32, adv);
                            result.add("returns", Kind::kFloat32, ret);
                            return result;
                        },
                        [](const std::string&) { return Tolerance{1e-6, 1e-7}; });
            }
        }
    }
}

// ---- Errors ---------------------------------------------------------------------------------------

// Bad data: the same status on both devices, messages naming the same argument, and (through
// the poisoned outputs being compared) nothing written where the CPU writes nothing.
void errors_section() {
    // Token ids out of range, forward and backward (in place: the caller's logits stay as they
    // were), and NaN logits with checking on.
    for (int dtype : {GSPO4J_FLOAT32, GSPO4J_BFLOAT16}) {
        for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{50000}}) {
            for (int64_t bad : {int64_t{-1}, vocab}) {
                const LogitsCase c{dtype, 1, 3, vocab, "contiguous", 0, Fill::kNormal, 1.0, true, true};
                const std::vector<int64_t> targets = {0, bad, vocab - 1};
                const Logits l = logits_for(c, targets);
                const std::string what = format("error target %lld %s", static_cast<long long>(bad), describe(c).c_str());
                if (selected("forward " + what, false)) {
                    compare("forward " + what,
                            [&](int device) {
                                const bool d = device == kCuda;
                                const Buffer logits(l.bytes.data(), l.bytes.size(), d);
                                const Buffer t = input(targets, d);
                                Buffer lp = output<float>(3, d), lse = output<double>(3, d);
                                return finish(device, gspo4j_token_logprob_forward(device, nullptr, logits.as<void>(), dtype, 1, 3, vocab, 3 * vocab,
                                                                                   vocab, t.as<int64_t>(), 1.0, 1, lp.as<float>(), lse.as<double>(),
                                                                                   nullptr));
                            },
                            loss_tolerance);
                }
                if (selected("backward in place " + what, false)) {
                    const std::vector<double> lse = {1.0, 1.0, 1.0};
                    const std::vector<float> grad = {1.0f, 1.0f, 1.0f};
                    compare("backward in place " + what,
                            [&](int device) {
                                const bool d = device == kCuda;
                                const Buffer logits(l.bytes.data(), l.bytes.size(), d);
                                const Buffer t = input(targets, d), lse_in = input(lse, d), g = input(grad, d);
                                Result r = finish(device, gspo4j_token_logprob_backward(device, nullptr, logits.as<void>(), dtype, 1, 3, vocab,
                                                                                        3 * vocab, vocab, t.as<int64_t>(), 1.0, lse_in.as<double>(),
                                                                                        nullptr, g.as<float>(), nullptr, logits.as<void>(),
                                                                                        3 * vocab, vocab));
                                r.status = r.status;  // compared below: the logits must be untouched on both
                                Result untouched;
                                untouched.status = r.status;
                                untouched.message = r.message;
                                untouched.add("logits after the call", dtype_kind(dtype), logits);
                                return untouched;
                            },
                            [](const std::string&) { return Tolerance{0, 0}; });
                }
            }
        }
    }
    for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{50000}}) {
        const LogitsCase c{GSPO4J_FLOAT32, 1, 2, vocab, "contiguous", 0, Fill::kNaN, 1.0, true, true};
        if (selected("forward error NaN logits " + describe(c), false)) forward_case(c);
    }
    // Bad offsets: not starting at 0, decreasing (overlapping responses: finding 5), not ending at
    // tokens; and batch = 0 with offsets[0] != 0 (finding 4). Nothing may be written.
    const std::vector<std::vector<int64_t>> bad_offsets = {{1, 3, 6}, {0, 5, 2, 6}, {0, 2, 4, 5}, {0, 4, 3, 6}, {2}};
    for (const std::vector<int64_t>& offsets : bad_offsets) {
        const int64_t batch = static_cast<int64_t>(offsets.size()) - 1;
        const int64_t tokens = 6;
        std::string name = "offsets {";
        for (int64_t o : offsets) name += std::to_string(o) + ",";
        name += "}";
        Batch b;
        b.batch = batch;
        b.seq = 6;
        b.tokens = batch == 0 ? 0 : tokens;
        b.offsets = offsets;
        const size_t n = static_cast<size_t>(b.tokens);
        b.mask.assign(n, 1);
        b.logprob.assign(n, -1.0f);
        b.old_logprob.assign(n, -1.1f);
        b.ref_logprob.assign(n, -1.2f);
        b.entropy.assign(n, 0.5f);
        b.token_advantages.assign(n, 0.5f);
        b.advantages.assign(static_cast<size_t>(batch), 1.0f);
        for (int level : {GSPO4J_RATIO_TOKEN, GSPO4J_RATIO_SEQUENCE}) {
            const gspo4j_loss_config config = loss_config(level, GSPO4J_TOKEN_MEAN, 2);
            if (selected("policy_loss error " + name, false)) policy_loss_case(config, b, false, false, true, true);
        }
        const std::string what = "sequence_log_ratio error " + name;
        if (selected(what, false)) {
            compare(what,
                    [&](int device) {
                        const bool d = device == kCuda;
                        const Buffer o = input(b.offsets, d), lp = input(b.logprob, d), olp = input(b.old_logprob, d);
                        Buffer ratio = output<float>(b.batch, d);
                        Result r = finish(device, gspo4j_sequence_log_ratio(device, nullptr, b.batch, b.seq, b.tokens, o.as<int64_t>(),
                                                                            lp.as<float>(), olp.as<float>(), nullptr, 1, ratio.as<float>(),
                                                                            nullptr));
                        r.add("log_ratio", Kind::kFloat32, ratio);
                        return r;
                    },
                    loss_tolerance);
        }
        const std::string gae_what = "gae error " + name;
        if (selected(gae_what, false)) {
            compare(gae_what,
                    [&](int device) {
                        const bool d = device == kCuda;
                        const Buffer o = input(b.offsets, d), r = input(b.logprob, d), v = input(b.entropy, d);
                        Buffer adv = output<float>(b.tokens, d), ret = output<float>(b.tokens, d);
                        Result result = finish(device, gspo4j_gae(device, nullptr, b.batch, b.seq, b.tokens, o.as<int64_t>(), r.as<float>(),
                                                                  v.as<float>(), nullptr, 1.0, 0.95, 1, adv.as<float>(), ret.as<float>()));
                        result.add("advantages", Kind::kFloat32, adv);
                        return result;
                    },
                    loss_tolerance);
        }
    }
    // NaN in each checked input of the policy loss.
    for (const char* input_name : {"logprob", "old_logprob", "advantages", "ref_logprob", "entropy"}) {
        Batch b = make_batch(4, true, 0.1);
        gspo4j_loss_config config = loss_config(GSPO4J_RATIO_TOKEN, GSPO4J_TOKEN_MEAN, 1);
        config.kl_coef = 0.1;
        config.entropy_coef = 0.01;
        size_t counted = 0;
        while (counted < b.mask.size() && !b.mask[counted]) ++counted;
        const std::string name = input_name;
        if (name == "logprob") b.logprob[counted] = kNaN;
        if (name == "old_logprob") b.old_logprob[counted] = kInf;
        if (name == "advantages") b.advantages[0] = kNaN, b.mask[static_cast<size_t>(b.offsets[0])] = 1;
        if (name == "ref_logprob") b.ref_logprob[counted] = -kInf;
        if (name == "entropy") b.entropy[counted] = kNaN;
        if (selected("policy_loss error NaN " + name, false)) policy_loss_case(config, b, false, false, true, true);
    }
    // A counted token whose target logit is -Inf: the forward gives lp = -Inf without an error
    // (checking on), and the policy loss rejects that lp on both devices, naming logprob[i]; the
    // CPU's message says what it means.
    {
        const int64_t vocab = 33;
        std::vector<float> z(2 * vocab);
        for (float& v : z) v = normal(1.0f);
        z[5] = -kInf;
        const std::vector<int64_t> targets = {5, 7};
        std::vector<float> lp(2, 0.0f), h(2, 0.0f);
        std::vector<double> lse(2, 0.0);
        const int forward = gspo4j_token_logprob_forward(kCpu, nullptr, z.data(), GSPO4J_FLOAT32, 1, 2, vocab, 2 * vocab, vocab, targets.data(),
                                                         1.0, 1, lp.data(), lse.data(), h.data());
        report.expect(forward == GSPO4J_OK && lp[0] == -kInf && std::isfinite(lse[0]) && std::isfinite(h[0]),
                      format("-Inf target: forward status %d, lp %g, lse %g, H %g", forward, lp[0], lse[0], h[0]));
        Batch b = make_batch(4, true, 0.1);
        gspo4j_loss_config config = loss_config(GSPO4J_RATIO_TOKEN, GSPO4J_TOKEN_MEAN, 2);
        size_t counted = 0;
        while (counted < b.mask.size() && !b.mask[counted]) ++counted;
        b.logprob[counted] = lp[0];
        if (selected("policy_loss error -Inf logprob", false)) policy_loss_case(config, b, false, false, true, true);
        float loss = 0.0f;
        std::vector<float> g(static_cast<size_t>(b.tokens));
        const int status = gspo4j_policy_loss(kCpu, nullptr, &config, b.batch, b.seq, b.tokens, b.offsets.data(), b.logprob.data(),
                                              b.old_logprob.data(), nullptr, b.mask.data(), b.advantages.data(), 0,
                                              b.ref_logprob.data(), b.entropy.data(), nullptr, &loss, g.data(), nullptr, nullptr);
        const std::string message = gspo4j_last_error();
        report.expect(status == GSPO4J_ERROR_NON_FINITE && message.find("probability 0") != std::string::npos,
                      "-Inf logprob: policy loss status " + std::to_string(status) + ", \"" + message + "\"");
    }
    // Deferred checks: a ticket holds what the calls before it found, and only that; the record is
    // clear for the next call; a ticket is spent once; 0 (nothing ran) resolves clean.
    if (selected("error deferred tickets", false)) {
        const int64_t vocab = 1000;
        const std::vector<int64_t> bad = {0, vocab, 1}, good = {0, 1, 2};
        const LogitsCase c{GSPO4J_FLOAT32, 1, 3, vocab, "contiguous", 0, Fill::kNormal, 1.0, true, true};
        const Logits l = logits_for(c, good);
        const Buffer logits(l.bytes.data(), l.bytes.size(), true);
        const Buffer tb = input(bad, true), tg = input(good, true);
        Buffer lp = output<float>(3, true), lse = output<double>(3, true);
        int64_t first = -1, second = -1, none = -1;
        int status = gspo4j_token_logprob_forward(kCuda, nullptr, logits.as<void>(), GSPO4J_FLOAT32, 1, 3, vocab, 3 * vocab, vocab,
                                                  tb.as<int64_t>(), 1.0, 1, lp.as<float>(), lse.as<double>(), nullptr);
        report.expect(status == GSPO4J_OK && gspo4j_cuda_defer_error_check(nullptr, &first) == GSPO4J_OK && first > 0,
                      "error deferred tickets: the bad call queues and defers without an error");
        status = gspo4j_token_logprob_forward(kCuda, nullptr, logits.as<void>(), GSPO4J_FLOAT32, 1, 3, vocab, 3 * vocab, vocab,
                                              tg.as<int64_t>(), 1.0, 1, lp.as<float>(), lse.as<double>(), nullptr);
        report.expect(status == GSPO4J_OK && gspo4j_cuda_defer_error_check(nullptr, &second) == GSPO4J_OK && second > first,
                      "error deferred tickets: a good call after it defers too");
        // Resolved out of order: the good call's ticket is clean, the bad one's names the token.
        report.expect(gspo4j_cuda_resolve_error_check(second) == GSPO4J_OK, "error deferred tickets: the good call's ticket is clean");
        status = gspo4j_cuda_resolve_error_check(first);
        std::string message = status == GSPO4J_OK ? "" : gspo4j_last_error();
        report.expect(status == GSPO4J_ERROR_OUT_OF_RANGE && message.find("targets[1]") != std::string::npos,
                      "error deferred tickets: the bad call's ticket reports targets[1]: status " + std::to_string(status) + ", \"" + message + "\"");
        status = gspo4j_cuda_resolve_error_check(first);
        message = status == GSPO4J_OK ? "" : gspo4j_last_error();
        report.expect(status == GSPO4J_ERROR_INVALID_ARGUMENT && message.find("unknown or was resolved already") != std::string::npos,
                      "error deferred tickets: a spent ticket is refused: \"" + message + "\"");
        report.expect(gspo4j_cuda_check_error(nullptr) == GSPO4J_OK, "error deferred tickets: the record is clear afterwards");
        report.expect(gspo4j_cuda_defer_error_check(nullptr, &none) == GSPO4J_OK && gspo4j_cuda_resolve_error_check(none) == GSPO4J_OK &&
                          gspo4j_cuda_resolve_error_check(0) == GSPO4J_OK,
                      "error deferred tickets: a clean ticket and ticket 0 resolve clean");
        for (const std::string& m : simt::take_misuses()) report.fail("error deferred tickets: emulator: " + m);
    }
    // A host pointer passed as device memory: the pointer check names it.
    const std::vector<float> host(8, 1.0f);
    const std::vector<int64_t> ids(8, 0);
    if (selected("error host pointer", false)) {
        float advantages[8];
        const int status = gspo4j_group_advantages(kCuda, nullptr, 8, host.data(), 4, nullptr, GSPO4J_ADVANTAGE_MEAN, 0.0, 1, advantages);
        const std::string message = gspo4j_last_error();
        report.expect(status == GSPO4J_ERROR_INVALID_ARGUMENT && message.find("rewards is not CUDA device memory") != std::string::npos,
                      "error host pointer: status " + std::to_string(status) + ", \"" + message + "\"");
    }
}

// ---- Batch invariance ------------------------------------------------------------------------------

// One row alone, and the same row inside a batch of more rows than 4 per multiprocessor: the
// batch size at which an opted-in plan would stop splitting rows (V >= 16384). By default rows are
// never split, so lp, lse, H and the row's gradient are the same bits. The emulator reports 4
// multiprocessors here so the batch stays small.
void across_split_boundary(int dtype) {
    const std::string what = format("batch invariance across the split boundary %s", dtype_name(dtype));
    if (!selected(what, false)) return;
    simt::Config& config = simt::config();
    const int saved = config.multiprocessors;
    config.multiprocessors = 4;
    const int64_t vocab = 16448, rows = 4 * 4 + 8, row = 13;
    const std::vector<int64_t> targets = random_targets(rows, vocab);
    const Logits l = make_logits(dtype, 1, rows, vocab, rows * vocab, vocab, 0, Fill::kNormal, targets);
    const size_t row_bytes = static_cast<size_t>(vocab) * dtype_bytes(dtype);
    struct Out {
        std::vector<float> lp, h;
        std::vector<double> lse;
        std::vector<uint8_t> grad;  // the gradient of the watched row
        bool ok = false;
    };
    // Forward and backward of `count` rows starting at `first`; the watched row is row - first.
    auto run = [&](int64_t first, int64_t count) {
        Out o;
        const Buffer logits(l.bytes.data() + first * row_bytes, static_cast<size_t>(count) * row_bytes, true);
        const Buffer t = input(std::vector<int64_t>(targets.begin() + first, targets.begin() + first + count), true);
        Buffer lp = output<float>(count, true), lse = output<double>(count, true), h = output<float>(count, true);
        int status = gspo4j_token_logprob_forward(kCuda, nullptr, logits.as<void>(), dtype, 1, count, vocab, count * vocab, vocab, t.as<int64_t>(),
                                                  1.0, 1, lp.as<float>(), lse.as<double>(), h.as<float>());
        if (status != GSPO4J_OK) {
            report.fail(what + ": forward: " + gspo4j_last_error());
            return o;
        }
        const Buffer grad_lp = input(std::vector<float>(count, -0.75f), true), grad_h = input(std::vector<float>(count, 0.125f), true);
        Buffer grad(nullptr, static_cast<size_t>(count) * row_bytes, true);
        status = gspo4j_token_logprob_backward(kCuda, nullptr, logits.as<void>(), dtype, 1, count, vocab, count * vocab, vocab, t.as<int64_t>(), 1.0,
                                               lse.as<double>(), h.as<float>(), grad_lp.as<float>(), grad_h.as<float>(), grad.as<void>(), count * vocab,
                                               vocab);
        if (status != GSPO4J_OK) {
            report.fail(what + ": backward: " + gspo4j_last_error());
            return o;
        }
        const int64_t i = row - first;
        o.lp = {lp.as<float>()[i]};
        o.h = {h.as<float>()[i]};
        o.lse = {lse.as<double>()[i]};
        const uint8_t* g = grad.as<uint8_t>() + i * row_bytes;
        o.grad.assign(g, g + row_bytes);
        o.ok = true;
        return o;
    };
    const Out alone = run(row, 1), batched = run(0, rows);
    config.multiprocessors = saved;
    if (!alone.ok || !batched.ok) return;
    report.expect(std::memcmp(alone.lp.data(), batched.lp.data(), 4) == 0 && std::memcmp(alone.lse.data(), batched.lse.data(), 8) == 0 &&
                      std::memcmp(alone.h.data(), batched.h.data(), 4) == 0,
                  what + ": lp, lse or H of the row alone differ from the same row in a batch of " + std::to_string(rows));
    report.expect(alone.grad == batched.grad, what + ": the row's gradient alone differs from the same row in a batch of " + std::to_string(rows));
    for (const std::string& m : simt::take_misuses()) report.fail(what + ": emulator: " + m);
}

// A row's lp, lse and H are the same bits alone and inside a batch (docs/math.md "Invariances"):
// padded, packed, and across the batch size at which an opted-in plan would split rows.
void batch_invariance_section() {
    for (int dtype : {GSPO4J_FLOAT32, GSPO4J_BFLOAT16}) across_split_boundary(dtype);
    for (int dtype : {GSPO4J_FLOAT32, GSPO4J_BFLOAT16}) {
        for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{32001}}) {
            const int64_t rows = 12;
            const std::vector<int64_t> targets = random_targets(rows, vocab);
            const Logits l = make_logits(dtype, 1, rows, vocab, rows * vocab, vocab, 0, Fill::kNormal, targets);
            const std::string what = format("batch invariance V=%lld %s", static_cast<long long>(vocab), dtype_name(dtype));
            if (!selected(what, false)) continue;
            const Buffer logits(l.bytes.data(), l.bytes.size(), true);
            const Buffer t = input(targets, true);
            Buffer lp = output<float>(rows, true), lse = output<double>(rows, true), h = output<float>(rows, true);
            const int status = gspo4j_token_logprob_forward(kCuda, nullptr, logits.as<void>(), dtype, 1, rows, vocab, rows * vocab, vocab,
                                                            t.as<int64_t>(), 1.0, 1, lp.as<float>(), lse.as<double>(), h.as<float>());
            if (status != GSPO4J_OK) {
                report.fail(what + ": " + gspo4j_last_error());
                continue;
            }
            // Rows 3..5 alone (as a batch of 3, which has the same plan as 12 at these sizes) and
            // row 7 inside a packed view of rows 6..9.
            for (auto [first, count] : {std::pair<int64_t, int64_t>{3, 3}, {6, 4}}) {
                Buffer lp2 = output<float>(count, true), lse2 = output<double>(count, true), h2 = output<float>(count, true);
                const uint8_t* start = logits.as<uint8_t>() + first * vocab * static_cast<int64_t>(dtype_bytes(dtype));
                gspo4j_token_logprob_forward(kCuda, nullptr, start, dtype, 1, count, vocab, count * vocab, vocab, t.as<int64_t>() + first, 1.0, 1,
                                             lp2.as<float>(), lse2.as<double>(), h2.as<float>());
                bool same = true;
                for (int64_t i = 0; i < count; ++i) {
                    same &= std::memcmp(lp.as<float>() + first + i, lp2.as<float>() + i, 4) == 0;
                    same &= std::memcmp(lse.as<double>() + first + i, lse2.as<double>() + i, 8) == 0;
                    same &= std::memcmp(h.as<float>() + first + i, h2.as<float>() + i, 4) == 0;
                }
                report.expect(same, what + format(": rows %lld..%lld alone differ from the same rows in the batch", static_cast<long long>(first),
                                                  static_cast<long long>(first + count - 1)));
            }
            for (const std::string& m : simt::take_misuses()) report.fail(what + ": emulator: " + m);
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--quick") options.quick = true;
        if (a == "--verbose") options.verbose = true;
        if (a == "--filter" && i + 1 < argc) options.filter = argv[++i];
    }
    const auto start = std::chrono::steady_clock::now();
    struct Section {
        const char* name;
        void (*run)();
    };
    const Section sections[] = {
        {"token log-probs", token_logprob_section},
        {"extreme rows", extreme_rows_section},
        {"split rows", split_rows_section},
        {"policy loss", policy_loss_section},
        {"sequence log-ratio", sequence_log_ratio_section},
        {"entropy threshold", entropy_threshold_section},
        {"advantages", advantages_section},
        {"gae", gae_section},
        {"errors", errors_section},
        {"batch invariance", batch_invariance_section},
    };
    for (const Section& s : sections) {
        const long before_pass = report.passed, before_fail = report.failed;
        const auto t0 = std::chrono::steady_clock::now();
        s.run();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("section %-20s %6ld passed, %4ld failed, %6.1f s\n", s.name, report.passed - before_pass, report.failed - before_fail, seconds);
        std::fflush(stdout);
    }
    const simt::Counters c = simt::counters();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("emulated %llu launches, %llu blocks, %llu threads, %llu switches in %.1f s%s\n",
                static_cast<unsigned long long>(c.launches), static_cast<unsigned long long>(c.blocks),
                static_cast<unsigned long long>(c.threads), static_cast<unsigned long long>(c.switches), seconds,
                options.quick ? format(" (--quick: %ld cases left out)", report.skipped_quick).c_str() : "");
    std::printf("simt: %ld passed, %ld failed\n", report.passed, report.failed);
    return report.failed == 0 ? 0 : 1;
}
