// A small persistent thread pool for the CPU kernels. No OpenMP: the library must not depend
// on a runtime (libgomp) that the user's machine may lack or that libtorch ships another copy of.
#ifndef GSPO4J_PARALLEL_H
#define GSPO4J_PARALLEL_H

#include <cstdint>
#include <functional>

namespace gspo4j {

int num_threads();
void set_num_threads(int threads);

// Calls body(begin, end) on disjoint chunks covering [0, count), each at most `grain` long, on
// up to num_threads() threads (the caller included). Which thread runs a chunk varies from run
// to run, so a body must make each index's result depend on that index alone: reductions
// write per-chunk or per-row partials that the caller combines in a fixed order. The first
// exception thrown by a body is rethrown here after every chunk has finished.
void parallel_for(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

}  // namespace gspo4j

#endif
