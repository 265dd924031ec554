# The CUDA kernels of cuda/ compiled as C++ for the SIMT emulator (cuda/test/emulator), with the
# CPU kernels of native/ beside them in one program, so every CUDA entry point can be compared
# with the CPU one. Included by cmake/CMakeLists.txt when GSPO4J_SIMT is ON (Maven turns it on);
# nothing here is part of libgspo4j.so.
#
# Variants: plain (simt_suite, simt_selftest, and simt/libgspo4j.so for the Java tests), ASan +
# UBSan (simt_suite_asan, simt_selftest_asan) and, with GSPO4J_SIMT_TSAN=ON, TSan.
set(GSPO4J_SIMT_ASAN ON CACHE BOOL "Build the ASan+UBSan variant of the SIMT suite")
set(GSPO4J_SIMT_TSAN OFF CACHE BOOL "Build the TSan variant of the SIMT suite (on demand: cmake --build . --target simt_suite_tsan)")

set(SIMT_DIR "${GSPO4J_ROOT}/cuda/test")
set(SIMT_UNITS "")
# The .cu files themselves, included by generated one-line C++ units: the sources are compiled as
# written, and the `gspo4j` target keeps compiling them as CUDA.
foreach(unit runtime token_logprob policy_loss advantages)
  set(wrapper "${CMAKE_CURRENT_BINARY_DIR}/simt_units/${unit}.cpp")
  file(CONFIGURE OUTPUT "${wrapper}" CONTENT "#include \"${GSPO4J_ROOT}/cuda/${unit}.cu\"\n")
  list(APPEND SIMT_UNITS "${wrapper}")
endforeach()

set(SIMT_COMMON_SOURCES
  "${GSPO4J_NATIVE}/src/api.cpp"
  "${GSPO4J_NATIVE}/src/parallel.cpp"
  "${GSPO4J_NATIVE}/src/token_logprob.cpp"
  "${GSPO4J_NATIVE}/src/policy_loss.cpp"
  "${GSPO4J_NATIVE}/src/advantages.cpp"
  ${SIMT_UNITS})

# Under TSan the emulator itself is compiled uninstrumented (its scheduler state is shared by the
# fibers without synchronisation TSan could see) and only announces fibers and barriers: a
# separate unit, since source properties are per file.
set(SIMT_EMULATOR_TSAN "${CMAKE_CURRENT_BINARY_DIR}/simt_units/simt_tsan.cpp")
file(CONFIGURE OUTPUT "${SIMT_EMULATOR_TSAN}" CONTENT "#include \"${SIMT_DIR}/emulator/simt.cpp\"\n")
set_source_files_properties("${SIMT_EMULATOR_TSAN}" PROPERTIES COMPILE_OPTIONS "-fno-sanitize=thread;-DSIMT_TSAN_ANNOTATIONS")

# -ffp-contract=off: a product is rounded before it is added, as __fmul_rn promises and as the
# CPU kernels are compiled; the emulator then shows what the .cu sources compute, not what a
# compiler's fusing made of them.
set(SIMT_FLAGS -ffp-contract=off ${GSPO4J_WARNINGS} -Wno-unused-variable -Wno-unknown-pragmas)

# One emulated copy of the library, as an object library, per variant.
function(gspo4j_simt_variant variant)
  set(flags ${ARGN})
  if(variant STREQUAL "tsan")
    set(emulator "${SIMT_EMULATOR_TSAN}")
  else()
    set(emulator "${SIMT_DIR}/emulator/simt.cpp")
  endif()
  set(SIMT_SOURCES ${SIMT_COMMON_SOURCES} "${emulator}")
  set(isa_objects "")
  foreach(isa sse2 avx2 avx512)
    add_library(simt_rows_${isa}_${variant} OBJECT "${GSPO4J_NATIVE}/src/token_logprob_isa.cpp")
    target_include_directories(simt_rows_${isa}_${variant} PRIVATE "${GSPO4J_NATIVE}/include" "${GSPO4J_NATIVE}/src")
    target_compile_definitions(simt_rows_${isa}_${variant} PRIVATE GSPO4J_VECTOR_BYTES=${GSPO4J_ISA_BYTES_${isa}})
    target_compile_options(simt_rows_${isa}_${variant} PRIVATE ${GSPO4J_WARNINGS} ${GSPO4J_ISA_FLAGS_${isa}} ${flags})
    set_target_properties(simt_rows_${isa}_${variant} PROPERTIES EXCLUDE_FROM_ALL TRUE)
    list(APPEND isa_objects $<TARGET_OBJECTS:simt_rows_${isa}_${variant}>)
  endforeach()
  add_library(gspo4j_simt_${variant} OBJECT ${SIMT_SOURCES})
  # The emulator's shim headers come first: they stand in for cuda_runtime.h and friends.
  target_include_directories(gspo4j_simt_${variant} PUBLIC "${SIMT_DIR}/emulator/include" "${SIMT_DIR}/emulator"
    "${GSPO4J_NATIVE}/include" "${GSPO4J_NATIVE}/src" "${GSPO4J_ROOT}/cuda")
  target_compile_definitions(gspo4j_simt_${variant} PUBLIC GSPO4J_WITH_CUDA "GSPO4J_VERSION_STRING=\"${GSPO4J_VERSION}\"")
  target_compile_options(gspo4j_simt_${variant} PUBLIC ${SIMT_FLAGS} ${flags})
  set_target_properties(gspo4j_simt_${variant} PROPERTIES EXCLUDE_FROM_ALL TRUE)
  set(SIMT_ISA_OBJECTS_${variant} ${isa_objects} PARENT_SCOPE)

  add_executable(simt_suite_${variant} "${SIMT_DIR}/simt_suite.cpp" $<TARGET_OBJECTS:gspo4j_simt_${variant}> ${isa_objects})
  add_executable(simt_selftest_${variant} "${SIMT_DIR}/simt_selftest.cpp" "${emulator}")
  foreach(program simt_suite_${variant} simt_selftest_${variant})
    target_include_directories(${program} PRIVATE "${SIMT_DIR}/emulator/include" "${SIMT_DIR}/emulator"
      "${GSPO4J_NATIVE}/include" "${GSPO4J_NATIVE}/src" "${GSPO4J_ROOT}/cuda")
    target_compile_options(${program} PRIVATE ${SIMT_FLAGS} ${flags})
    target_link_options(${program} PRIVATE ${flags})
    target_link_libraries(${program} PRIVATE Threads::Threads)
    set_target_properties(${program} PROPERTIES EXCLUDE_FROM_ALL TRUE)
  endforeach()
endfunction()

gspo4j_simt_variant(plain -O2 -g)
add_custom_target(simt ALL DEPENDS simt_suite_plain simt_selftest_plain)

# The emulated library for the Java tests: the C header's functions with GSPO4J_DEVICE_CUDA
# served by the emulator (GSPO4J_SIMT_HOST_IS_DEVICE=1 lets it take host tensors). Named
# libgspo4j.so (soname included), in its own folder: the JNI glue needs libgspo4j.so, and a
# library already loaded under that soname satisfies it, so a JVM that loads this one first
# (CudaEmulatorTest: JavaCPP's pathsFirst with java.library.path = this folder) runs the Java
# layer on the emulator. Same exports as the real one (gspo4j.map).
add_library(gspo4j_simt SHARED $<TARGET_OBJECTS:gspo4j_simt_plain> ${SIMT_ISA_OBJECTS_plain})
target_link_libraries(gspo4j_simt PRIVATE Threads::Threads -Wl,--no-undefined "-Wl,--version-script=${CMAKE_CURRENT_SOURCE_DIR}/gspo4j.map")
set_target_properties(gspo4j_simt PROPERTIES LIBRARY_OUTPUT_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}/simt"
  OUTPUT_NAME gspo4j)
add_dependencies(simt gspo4j_simt)

if(GSPO4J_SIMT_ASAN)
  gspo4j_simt_variant(asan -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined)
  add_dependencies(simt simt_suite_asan simt_selftest_asan)
endif()
if(GSPO4J_SIMT_TSAN)
  gspo4j_simt_variant(tsan -O1 -g -fsanitize=thread)
  add_dependencies(simt simt_suite_tsan simt_selftest_tsan)
endif()
