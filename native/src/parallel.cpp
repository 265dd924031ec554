#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

namespace gspo4j {
namespace {

// One parallel_for call. Shared with the helper tasks through a shared_ptr, because a helper
// may start after the caller has already finished every chunk and returned.
struct Job {
    Job(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body)
        : count(count), grain(grain), chunks((count + grain - 1) / grain), body(body) {}

    const int64_t count;
    const int64_t grain;
    const int64_t chunks;
    const std::function<void(int64_t, int64_t)>& body;  // valid until `done` reaches chunks
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
    std::exception_ptr error;

    // Runs chunks until none is left. Returns once this thread can claim no more.
    void work() {
        for (;;) {
            const int64_t chunk = next.fetch_add(1);
            if (chunk >= chunks) return;
            const int64_t begin = chunk * grain;
            const int64_t end = std::min(count, begin + grain);
            try {
                body(begin, end);
            } catch (...) {
                std::lock_guard<std::mutex> lock(mutex);
                if (!error) error = std::current_exception();
            }
            if (done.fetch_add(1) + 1 == chunks) {
                std::lock_guard<std::mutex> lock(mutex);
                finished.notify_all();
            }
        }
    }
};

class Pool {
public:
    static Pool& instance() {
        // Leaked on purpose: joining workers from a static destructor at JVM exit can deadlock.
        static Pool* pool = new Pool(default_threads());
        return *pool;
    }

    int threads() const { return threads_.load(); }

    // Only records the count: workers start on the first parallel call that needs them, so a
    // count set before any kernel runs (the Java layer's default) starts no more threads.
    void set_threads(int threads) { threads_.store(threads); }

    void run(const std::shared_ptr<Job>& job, int helpers) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            while (static_cast<int>(workers_.size()) < helpers) {
                workers_.emplace_back([this] { loop(); });
            }
            for (int i = 0; i < helpers; ++i) queue_.push_back(job);
        }
        if (helpers == 1) wake_.notify_one(); else wake_.notify_all();
        job->work();
        std::unique_lock<std::mutex> lock(job->mutex);
        job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
    }

private:
    explicit Pool(int threads) : threads_(threads) {}

    // The CPUs this process may run on (its affinity mask, which taskset and cpusets narrow);
    // the hardware concurrency where that is unknown. CPU quotas (cgroup cpu.max) are not seen
    // here: the Java layer sets its own default, which honours them, before any kernel runs.
    static int default_threads() {
#ifdef __linux__
        cpu_set_t set;
        CPU_ZERO(&set);
        if (sched_getaffinity(0, sizeof(set), &set) == 0) {
            const int allowed = CPU_COUNT(&set);
            if (allowed > 0) return allowed;
        }
#endif
        const unsigned hardware = std::thread::hardware_concurrency();
        return hardware == 0 ? 1 : static_cast<int>(hardware);
    }

    void loop() {
        for (;;) {
            std::shared_ptr<Job> job;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return !queue_.empty(); });
                job = std::move(queue_.front());
                queue_.pop_front();
            }
            job->work();
        }
    }

    std::atomic<int> threads_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<std::shared_ptr<Job>> queue_;
    std::vector<std::thread> workers_;  // started on demand, grows only; extra workers idle when threads shrink
};

}  // namespace

int num_threads() { return Pool::instance().threads(); }

void set_num_threads(int threads) { Pool::instance().set_threads(threads); }

void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    if (count <= 0) return;
    grain = std::max<int64_t>(1, grain);
    const int64_t chunks = (count + grain - 1) / grain;
    const int threads = Pool::instance().threads();
    if (chunks == 1 || threads == 1) {
        body(0, count);
        return;
    }
    auto job = std::make_shared<Job>(count, grain, body);
    const int helpers = static_cast<int>(std::min<int64_t>(threads, chunks)) - 1;
    Pool::instance().run(job, helpers);
    if (job->error) std::rethrow_exception(job->error);
}

}  // namespace gspo4j
