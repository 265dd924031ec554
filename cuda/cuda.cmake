# The CUDA kernels of cuda/, added to the gspo4j target by cmake/CMakeLists.txt when GSPO4J_CUDA is
# ON, or AUTO and nvcc is found.
#
# Machine code for sm_80 (A100) and sm_90 (H100/H200) plus sm_90 PTX, which the driver compiles
# for newer GPUs on first use. The CUDA runtime is linked statically and the driver library
# (libcuda.so) is opened by it only on the first CUDA call, so the same libgspo4j.so loads and
# runs its CPU path on a machine without a GPU or a driver.
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_VISIBILITY_PRESET hidden)

set(GSPO4J_CUDA_ARCHITECTURES "80-real;90-real;90-virtual" CACHE STRING "CUDA architectures of the kernels")

target_sources(gspo4j PRIVATE
  "${GSPO4J_ROOT}/cuda/runtime.cu"
  "${GSPO4J_ROOT}/cuda/token_logprob.cu"
  "${GSPO4J_ROOT}/cuda/policy_loss.cu"
  "${GSPO4J_ROOT}/cuda/advantages.cu")
target_include_directories(gspo4j PRIVATE "${GSPO4J_ROOT}/cuda")
target_compile_definitions(gspo4j PRIVATE GSPO4J_WITH_CUDA)
# No --use_fast_math: the kernels rely on IEEE NaN/Inf to detect bad input; the one fast
# exponential they use (ex2.approx) is written out where it is safe.
target_compile_options(gspo4j PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-Wall>)
set_target_properties(gspo4j PROPERTIES
  CUDA_ARCHITECTURES "${GSPO4J_CUDA_ARCHITECTURES}"
  CUDA_RUNTIME_LIBRARY Static
  CUDA_SEPARABLE_COMPILATION OFF)

# What nvcc makes of the hot kernels (spills, stack, 128-bit accesses), checked in every build.
include("${GSPO4J_ROOT}/cuda/ptx_check.cmake")
