# The PTX check: what the real nvcc build makes of the kernels, verified in every build that
# compiles them (cuda/README.md, "The PTX check").
#
# For every real architecture of GSPO4J_CUDA_ARCHITECTURES, cuda/token_logprob.cu and
# cuda/policy_loss.cu are compiled again on their own (nvcc -ptx, then ptxas -v on that PTX: the
# same front end and ptxas arguments as the gspo4j target's own compile), and the build fails when
# - a checked kernel spills or has a stack frame (ptxas -v): forward_kernel<D, kThreads> and
#   backward_kernel<D, kThreads> for every dtype and CTA size, and the five policy-loss kernels (entropy_threshold_kernel among them);
# - a token log-prob kernel's PTX entry lacks the main loop's 128-bit streaming accesses:
#   ld.global.cs.v4 in the forward and the backward, st.global.cs.v4 in the backward;
# - the entropy threshold's kernel holds a float64 product ptxas may fuse (a plain mul.f64 or an
#   fma.f64): its threshold must be the CPU's bits, so its products are __dmul_rn;
# - a kernel the check expects is not there (renamed, or an instantiation lost).
# The table of registers, stack and spills goes to the build log and to <build>/ptx_check.txt.
#
# Included by cuda/cuda.cmake, this file adds the target gspo4j_ptx_check to the default build.
# Run with cmake -P it is the parser, which also works on files made by hand:
#   cmake -DMODE=parse -DGROUP=token_logprob -DARCH=sm_80 -DPTX=file.ptx -DPTXAS_LOG=file.txt \
#         -DREPORT=report.txt [-DDTYPES=Float32,...] [-DTHREADS=128,...] -P cuda/ptx_check.cmake
# and MODE=selftest runs it on the fixtures of cuda/ptx_check/, requiring the bad ones rejected.

if(NOT CMAKE_SCRIPT_MODE_FILE)
  option(GSPO4J_PTX_CHECK "Fail the build when the CUDA hot kernels spill or lose their 128-bit accesses" ON)
  if(NOT GSPO4J_PTX_CHECK)
    return()
  endif()
  set(GSPO4J_PTX_CHECK_SCRIPT "${CMAKE_CURRENT_LIST_FILE}")

  function(gspo4j_add_ptx_check)
    set(dir "${CMAKE_BINARY_DIR}/ptx_check")
    file(MAKE_DIRECTORY "${dir}")
    set(script "${GSPO4J_PTX_CHECK_SCRIPT}")
    set(arches "")
    foreach(entry IN LISTS GSPO4J_CUDA_ARCHITECTURES)
      if(entry MATCHES "^([0-9]+[a-z]?)(-real)?$")
        list(APPEND arches "sm_${CMAKE_MATCH_1}")
      elseif(NOT entry MATCHES "-virtual$")
        message(WARNING "ptx_check: CUDA architecture '${entry}' is not a number; its machine code is not checked")
      endif()
    endforeach()
    if(NOT arches)
      message(STATUS "gspo4j: PTX check off (no real architecture in GSPO4J_CUDA_ARCHITECTURES)")
      return()
    endif()
    # c++filt only names the unchecked kernels of the report; the checks match mangled names.
    find_program(GSPO4J_CXXFILT NAMES c++filt)
    file(GLOB headers CONFIGURE_DEPENDS "${GSPO4J_ROOT}/cuda/*.cuh" "${GSPO4J_ROOT}/native/src/*.h"
         "${GSPO4J_ROOT}/native/include/gspo4j/*.h")
    file(GLOB fixtures CONFIGURE_DEPENDS "${GSPO4J_ROOT}/cuda/ptx_check/*")
    # The gspo4j target's device-code flags: CMAKE_CUDA_FLAGS and the build type's (-O3 -DNDEBUG
    # for Release), its language standard, -O3, include directories and definitions (the rest of
    # its options are for the host compiler).
    string(TOUPPER "${CMAKE_BUILD_TYPE}" build_type)
    string(STRIP "${CMAKE_CUDA_FLAGS} ${CMAKE_CUDA_FLAGS_${build_type}}" flag_string)
    separate_arguments(flags UNIX_COMMAND "${flag_string}")
    set(includes "-I$<JOIN:$<TARGET_PROPERTY:gspo4j,INCLUDE_DIRECTORIES>,;-I>")
    set(definitions "$<TARGET_PROPERTY:gspo4j,COMPILE_DEFINITIONS>")
    set(definitions "$<$<BOOL:${definitions}>:-D$<JOIN:${definitions},;-D>>")

    add_custom_command(
      OUTPUT "${dir}/selftest.stamp"
      COMMAND "${CMAKE_COMMAND}" -DMODE=selftest "-DFIXTURES=${GSPO4J_ROOT}/cuda/ptx_check" "-DWORK=${dir}"
              "-DSTAMP=${dir}/selftest.stamp" -P "${script}"
      DEPENDS "${script}" ${fixtures}
      COMMENT "ptx_check: the parser rejects the bad fixtures of cuda/ptx_check"
      VERBATIM)
    set(reports "")
    foreach(group token_logprob policy_loss)
      set(source "${GSPO4J_ROOT}/cuda/${group}.cu")
      foreach(arch IN LISTS arches)
        set(stem "${dir}/${group}.${arch}")
        add_custom_command(
          OUTPUT "${stem}.ptx" "${stem}.ptxas.txt"
          COMMAND "${CMAKE_CUDA_COMPILER}" ${flags} "-std=c++${CMAKE_CUDA_STANDARD}" -O3 "-arch=${arch}" "${includes}"
                  "${definitions}" -ptx -o "${stem}.ptx" "${source}"
          COMMAND "${CMAKE_COMMAND}" -DMODE=ptxas "-DNVCC=${CMAKE_CUDA_COMPILER}" "-DFLAGS=${flag_string}" "-DARCH=${arch}"
                  "-DPTX=${stem}.ptx" "-DPTXAS_LOG=${stem}.ptxas.txt" -P "${script}"
          DEPENDS "${source}" ${headers} "${script}"
          COMMENT "ptx_check: nvcc -ptx and ptxas -v of cuda/${group}.cu for ${arch}"
          COMMAND_EXPAND_LISTS VERBATIM)
        add_custom_command(
          OUTPUT "${stem}.txt"
          COMMAND "${CMAKE_COMMAND}" -DMODE=parse "-DGROUP=${group}" "-DARCH=${arch}" "-DPTX=${stem}.ptx"
                  "-DPTXAS_LOG=${stem}.ptxas.txt" "-DREPORT=${stem}.txt" "-DCXXFILT=${GSPO4J_CXXFILT}" -P "${script}"
          DEPENDS "${stem}.ptx" "${stem}.ptxas.txt" "${script}"
          COMMENT "ptx_check: cuda/${group}.cu at ${arch}"
          VERBATIM)
        list(APPEND reports "${stem}.txt")
      endforeach()
    endforeach()
    string(JOIN "|" report_arg ${reports})
    add_custom_command(
      OUTPUT "${CMAKE_BINARY_DIR}/ptx_check.txt"
      COMMAND "${CMAKE_COMMAND}" -DMODE=collect "-DREPORTS=${report_arg}" "-DOUT=${CMAKE_BINARY_DIR}/ptx_check.txt" -P "${script}"
      DEPENDS ${reports} "${dir}/selftest.stamp" "${script}"
      VERBATIM)
    add_custom_target(gspo4j_ptx_check ALL DEPENDS "${CMAKE_BINARY_DIR}/ptx_check.txt")
    string(REPLACE ";" ", " arch_names "${arches}")
    message(STATUS "gspo4j: PTX check of the CUDA kernels for ${arch_names} (target gspo4j_ptx_check, report ptx_check.txt)")
  endfunction()

  gspo4j_add_ptx_check()
  return()
endif()

# ---- Script mode: cmake -DMODE=ptxas|parse|selftest|collect -P cuda/ptx_check.cmake ----
cmake_minimum_required(VERSION 3.18)

# The unrolled main loop of for_each_chunk (token_logprob.cu) issues kUnroll 128-bit loads in one
# basic block before it uses the first (the backward as many 128-bit stores, one per vector), and
# its remainder loop at least one more of each. Change with kUnroll.
set(unroll 4)

# Known exceptions, one ARCH|LABEL PREFIX|MOST SPILL BYTES|MOST STACK BYTES each, every one with
# its reason. A kernel over its allowance fails; an allowance that no kernel needs any more is
# noted in the report, to be removed.
# None today. (The sm_80 backward spilled 4-8 bytes at the 64-register cap of
# __launch_bounds__(kThreads, 1024 / kThreads) while thread 0 kept the target's x, y and lse
# across the column pass; it now reads them again after it.)
set(allowances)

# The kernels of `group` that the check requires, as LABEL|MANGLED REGEX|ACCESSES, where ACCESSES
# is what the PTX entry must hold: "", "load" or "load+store" ("exact64": no float64 product
# that may fuse into an FMA, for results that must equal the CPU's bits). Kernels are matched on their
# mangled names (<length><name>, template arguments <length><dtype>E and Li<threads>E), so no
# demangler is needed.
function(expected_kernels group out)
  set(result "")
  if(group STREQUAL "token_logprob")
    string(REPLACE "," ";" dtypes "${DTYPES}")
    string(REPLACE "," ";" threads "${THREADS}")
    foreach(kernel_and_accesses "forward_kernel|load" "backward_kernel|load+store")
      string(REPLACE "|" ";" parts "${kernel_and_accesses}")
      list(GET parts 0 kernel)
      list(GET parts 1 accesses)
      string(LENGTH "${kernel}" kernel_length)
      foreach(dtype IN LISTS dtypes)
        string(LENGTH "${dtype}" dtype_length)
        foreach(count IN LISTS threads)
          list(APPEND result "${kernel}<${dtype}, ${count}>|${kernel_length}${kernel}I.*${dtype_length}${dtype}ELi${count}E|${accesses}")
        endforeach()
      endforeach()
    endforeach()
  elseif(group STREQUAL "policy_loss")
    foreach(kernel response_stats_kernel scales_kernel coefficients_kernel finish_kernel)
      string(LENGTH "${kernel}" kernel_length)
      list(APPEND result "${kernel}|${kernel_length}${kernel}E|")
    endforeach()
    # The top-entropy threshold: bit-equal to the CPU's, so no fusable float64 product.
    list(APPEND result "entropy_threshold_kernel|24entropy_threshold_kernelE|exact64")
  else()
    message(FATAL_ERROR "ptx_check: unknown GROUP '${group}' (token_logprob or policy_loss)")
  endif()
  set(${out} "${result}" PARENT_SCOPE)
endfunction()

# The spill and stack bytes allowed to `label` at ARCH, and the index of the allowance that
# grants them (-1 and 0 bytes when none does).
function(allowance label out_index out_spill out_stack)
  set(index -1)
  set(spill 0)
  set(stack 0)
  set(position 0)
  foreach(entry IN LISTS allowances)
    string(REPLACE "|" ";" fields "${entry}")
    list(GET fields 0 arch)
    list(GET fields 1 prefix)
    string(FIND "${label}" "${prefix}" at)
    if(arch STREQUAL ARCH AND at EQUAL 0)
      set(index ${position})
      list(GET fields 2 spill)
      list(GET fields 3 stack)
    endif()
    math(EXPR position "${position} + 1")
  endforeach()
  set(${out_index} ${index} PARENT_SCOPE)
  set(${out_spill} ${spill} PARENT_SCOPE)
  set(${out_stack} ${stack} PARENT_SCOPE)
endfunction()

function(pad out text width)
  string(LENGTH "${text}" length)
  if(length LESS width)
    math(EXPR missing "${width} - ${length}")
    string(REPEAT " " ${missing} spaces)
    set(text "${text}${spaces}")
  endif()
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

function(table_row out label regs stack spill_stores spill_loads loads stores verdict)
  pad(label "${label}" 34)
  set(row "${label}")
  foreach(value IN ITEMS "${regs}" "${stack}" "${spill_stores}" "${spill_loads}" "${loads}" "${stores}")
    pad(value "${value}" 8)
    string(APPEND row " ${value}")
  endforeach()
  string(REGEX REPLACE " +$" "" row "${row} ${verdict}")
  set(${out} "${row}" PARENT_SCOPE)
endfunction()

# ptxas -v of one PTX file: the numbers for each entry, by index, in the caller's scope.
macro(read_ptxas_log file)
  set(ptxas_entries "")
  set(ptxas_arches "")
  set(current "")
  set(properties_of "")
  file(STRINGS "${file}" log_lines REGEX "Compiling entry function|Function properties for|bytes stack frame|Used [0-9]+ registers")
  foreach(line IN LISTS log_lines)
    if(line MATCHES "Compiling entry function '([^']+)' for '([^']+)'")
      list(LENGTH ptxas_entries current)
      list(APPEND ptxas_entries "${CMAKE_MATCH_1}")
      list(APPEND ptxas_arches "${CMAKE_MATCH_2}")
      set(stack_${current} 0)
      set(spill_stores_${current} 0)
      set(spill_loads_${current} 0)
      set(regs_${current} "?")
      set(entry_name "${CMAKE_MATCH_1}")
    elseif(line MATCHES "Function properties for (.+)$")
      set(properties_of "${CMAKE_MATCH_1}")
    elseif(line MATCHES "([0-9]+) bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads")
      # A callee that is not inlined has its own block; its frame reaches the entry's
      # "cumulative stack size" below.
      if(NOT current STREQUAL "" AND properties_of STREQUAL entry_name)
        set(stack_${current} ${CMAKE_MATCH_1})
        set(spill_stores_${current} ${CMAKE_MATCH_2})
        set(spill_loads_${current} ${CMAKE_MATCH_3})
      endif()
    elseif(line MATCHES "Used ([0-9]+) registers" AND NOT current STREQUAL "")
      set(regs_${current} ${CMAKE_MATCH_1})
      if(line MATCHES "([0-9]+) bytes cumulative stack size" AND CMAKE_MATCH_1 GREATER stack_${current})
        set(stack_${current} ${CMAKE_MATCH_1})
      endif()
    endif()
  endforeach()
endmacro()

# The 128-bit streaming loads and stores of each PTX entry, in all and the most in one basic block
# (between labels and branches), by index, in the caller's scope. An entry runs from its .entry line
# to the next .entry or .func.
macro(read_ptx file)
  set(ptx_entries "")
  set(current "")
  file(STRINGS "${file}" ptx_lines
       REGEX "^[.]visible[ \t]+[.]entry|^[.]entry|[.]func|^[$]L__|[ \t]bra[. \t]|^[ \t]*(ret|exit)|(ld|st)[.]global[.]cs[.]v4[.]|mul[.]rn[.]f32|mul[.]f64|fma[.][a-z]+[.]f64")
  foreach(line IN LISTS ptx_lines)
    if(line MATCHES "^([.]visible[ \t]+)?[.]entry[ \t]+([^ \t(]+)")
      list(LENGTH ptx_entries current)
      list(APPEND ptx_entries "${CMAKE_MATCH_2}")
      set(pinned_${current} 0)
      set(fusable64_${current} 0)
      foreach(kind loads stores)
        set(${kind}_${current} 0)
        set(${kind}_run_${current} 0)
        set(${kind}_block 0)
      endforeach()
    elseif(line MATCHES "[.]func")
      set(current "")
    elseif(current STREQUAL "")
    elseif(line MATCHES "mul[.]rn[.]f32")
      math(EXPR pinned_${current} "${pinned_${current}} + 1")
    elseif(line MATCHES "mul[.]f64|fma[.][a-z]+[.]f64")
      math(EXPR fusable64_${current} "${fusable64_${current}} + 1")
    elseif(line MATCHES "^[ \t]*(ld|st)[.]global[.]cs[.]v4[.]")
      if(CMAKE_MATCH_1 STREQUAL "ld")
        set(kind loads)
      else()
        set(kind stores)
      endif()
      math(EXPR ${kind}_${current} "${${kind}_${current}} + 1")
      math(EXPR ${kind}_block "${${kind}_block} + 1")
      if(${kind}_block GREATER ${kind}_run_${current})
        set(${kind}_run_${current} ${${kind}_block})
      endif()
    else()
      set(loads_block 0)  # a label, a branch or a return: the basic block ends
      set(stores_block 0)
    endif()
  endforeach()
endmacro()

# Whether the PTX entry `index` holds the main loop's 128-bit `kind` (loads or stores): appends
# what is wrong to the list named `out`.
function(check_vector_accesses index kind instruction out)
  set(found "${${out}}")
  set(total ${${kind}_${index}})
  set(run ${${kind}_run_${index}})
  math(EXPR least "${unroll} + 1")
  if(run LESS unroll)
    list(APPEND found "at most ${run} ${instruction} in one basic block, ${unroll} expected (the unrolled main loop's 128-bit ${kind})")
  endif()
  if(total LESS least)
    list(APPEND found "${total} ${instruction} in its PTX entry, at least ${least} expected (the main loop's ${unroll} and the remainder loop's)")
  endif()
  set(${out} "${found}" PARENT_SCOPE)
endfunction()

function(check_kernels)
  foreach(required GROUP ARCH PTX PTXAS_LOG REPORT)
    if(NOT DEFINED ${required})
      message(FATAL_ERROR "ptx_check: MODE=parse needs -D${required}=...")
    endif()
  endforeach()
  if(NOT DEFINED DTYPES)
    set(DTYPES "Float32,BFloat16,Float16")  # token_logprob.cu's with_dtype
  endif()
  if(NOT DEFINED THREADS)
    set(THREADS "128,256,512,1024")  # token_logprob.cu's with_threads
  endif()
  read_ptxas_log("${PTXAS_LOG}")
  read_ptx("${PTX}")
  expected_kernels("${GROUP}" expected)

  set(failures "")
  set(notes "")
  set(allowances_matched "")
  set(allowances_used "")
  set(rows "")
  set(checked_indices "")
  foreach(arch IN LISTS ptxas_arches)
    if(NOT arch STREQUAL ARCH)
      list(APPEND failures "the ptxas log is for ${arch}, not ${ARCH}")
      break()
    endif()
  endforeach()
  foreach(kernel IN LISTS expected)
    string(REPLACE "|" ";" parts "${kernel}")
    list(GET parts 0 label)
    list(GET parts 1 pattern)
    list(GET parts 2 accesses)
    set(index "")
    set(count 0)
    foreach(name IN LISTS ptxas_entries)
      if(name MATCHES "${pattern}")
        list(FIND ptxas_entries "${name}" index)
        math(EXPR count "${count} + 1")
      endif()
    endforeach()
    set(ptx_index -1)
    if(count EQUAL 1)
      list(GET ptxas_entries ${index} mangled)
      list(FIND ptx_entries "${mangled}" ptx_index)
    endif()
    if(NOT count EQUAL 1 OR ptx_index EQUAL -1)
      if(count GREATER 1)
        list(APPEND failures "${label}: ${count} kernels match its pattern ${pattern}")
      else()
        list(APPEND failures "${label}: not found in the ptxas log and the PTX (renamed, or no longer instantiated? The expected kernels are listed in cuda/ptx_check.cmake)")
      endif()
      table_row(row "${label}" - - - - - - "MISSING")
      list(APPEND rows "${row}")
      continue()
    endif()
    list(APPEND checked_indices ${index})
    set(stack ${stack_${index}})
    set(stores ${spill_stores_${index}})
    set(loads ${spill_loads_${index}})
    set(spill ${stores})
    if(loads GREATER spill)
      set(spill ${loads})
    endif()
    set(problems "")
    set(verdict "ok")
    allowance("${label}" allowance_index allowed_spill allowed_stack)
    if(allowance_index GREATER -1)
      list(APPEND allowances_matched ${allowance_index})
    endif()
    if(spill GREATER allowed_spill OR stack GREATER allowed_stack)
      set(allowance_text "")
      if(allowed_spill GREATER 0 OR allowed_stack GREATER 0)
        set(allowance_text " (allowed: ${allowed_spill} bytes spilled, ${allowed_stack} bytes of stack)")
      endif()
      list(APPEND problems "${stores} bytes spill stores, ${loads} bytes spill loads, ${stack} bytes stack frame${allowance_text}")
    elseif(spill GREATER 0 OR stack GREATER 0)
      set(verdict "allowed (known spill, cuda/ptx_check.cmake)")
      list(APPEND allowances_used ${allowance_index})
    endif()
    set(vector_loads "")
    set(vector_stores "")
    # x = z / tau as __fmul_rn: a rounded product that ptxas never fuses into x - max or x - lse,
    # so lp, the softmax statistics and the backward start from the same x (issue 11, finding 6).
    # "exact64": every float64 product rounded on its own (__dmul_rn: mul.rn.f64), none a plain
    # mul.f64 that ptxas may fuse, no FMA: the kernel's result must equal the CPU's bit for bit.
    if(accesses MATCHES "exact64" AND NOT fusable64_${ptx_index} EQUAL 0)
      list(APPEND problems "${fusable64_${ptx_index}} float64 products that may fuse into an FMA (plain mul.f64 or fma.f64): round them with __dmul_rn")
    endif()
    if(accesses MATCHES "load" AND pinned_${ptx_index} EQUAL 0)
      list(APPEND problems "no mul.rn.f32 in its PTX entry: the product z * (1/tau) is not pinned with __fmul_rn and may fuse into an FMA")
    endif()
    if(accesses MATCHES "load")
      check_vector_accesses(${ptx_index} loads ld.global.cs.v4 problems)
      set(vector_loads "${loads_${ptx_index}}/${loads_run_${ptx_index}}")
    endif()
    if(accesses MATCHES "store")
      check_vector_accesses(${ptx_index} stores st.global.cs.v4 problems)
      set(vector_stores "${stores_${ptx_index}}/${stores_run_${ptx_index}}")
    endif()
    if(problems)
      set(verdict "FAIL")
      foreach(problem IN LISTS problems)
        list(APPEND failures "${label}: ${problem}")
      endforeach()
    endif()
    table_row(row "${label}" ${regs_${index}} ${stack} ${stores} ${loads} "${vector_loads}" "${vector_stores}" "${verdict}")
    list(APPEND rows "${row}")
  endforeach()

  list(REMOVE_DUPLICATES allowances_matched)
  foreach(index IN LISTS allowances_matched)
    if(NOT index IN_LIST allowances_used)
      list(GET allowances ${index} entry)
      list(APPEND notes "no kernel needs the allowance ${entry} any more: remove it from cuda/ptx_check.cmake")
    endif()
  endforeach()

  # The file's other kernels, for the record.
  set(other_indices "")
  set(other_names "")
  list(LENGTH ptxas_entries entry_count)
  if(entry_count GREATER 0)
    math(EXPR last "${entry_count} - 1")
    foreach(index RANGE ${last})
      if(NOT index IN_LIST checked_indices)
        list(APPEND other_indices ${index})
        list(GET ptxas_entries ${index} name)
        list(APPEND other_names "${name}")
      endif()
    endforeach()
  endif()
  set(readable "${other_names}")
  if(other_names AND CXXFILT)
    execute_process(COMMAND "${CXXFILT}" ${other_names} OUTPUT_VARIABLE demangled RESULT_VARIABLE status)
    if(status EQUAL 0)
      string(REGEX REPLACE "\n$" "" demangled "${demangled}")
      string(REPLACE "\n" ";" demangled "${demangled}")
      list(LENGTH demangled demangled_count)
      list(LENGTH other_names other_count)
      if(demangled_count EQUAL other_count)
        set(readable "")
        foreach(name IN LISTS demangled)
          string(REGEX REPLACE "^void " "" name "${name}")
          string(REPLACE "gspo4j::cuda::(anonymous namespace)::" "" name "${name}")
          string(REGEX REPLACE "\\(.*$" "" name "${name}")
          list(APPEND readable "${name}")
        endforeach()
      endif()
    endif()
  endif()
  foreach(index name IN ZIP_LISTS other_indices readable)
    table_row(row "${name}" ${regs_${index}} ${stack_${index}} ${spill_stores_${index}} ${spill_loads_${index}} "" ""
              "not checked")
    list(APPEND rows "${row}")
  endforeach()

  table_row(header "kernel" regs stack spill-st spill-ld ld.v4 st.v4 "")
  set(text "ptx_check ${GROUP} ${ARCH}: registers and bytes from ptxas -v, ld.v4 and st.v4 the 128-bit streaming\n")
  string(APPEND text "accesses of the kernel's PTX entry, in all / the most in one basic block\n${header}\n")
  foreach(row IN LISTS rows)
    string(APPEND text "${row}\n")
  endforeach()
  foreach(note IN LISTS notes)
    string(APPEND text "note: ${note}\n")
  endforeach()
  message("${text}")
  if(failures)
    file(REMOVE "${REPORT}")
    set(message "ptx_check FAILED for ${GROUP} at ${ARCH}:\n")
    foreach(failure IN LISTS failures)
      string(APPEND message "  ${ARCH} ${failure}\n")
    endforeach()
    string(APPEND message "(inputs: ${PTX}, ${PTXAS_LOG})")
    message(FATAL_ERROR "${message}")
  endif()
  file(WRITE "${REPORT}" "${text}")
endfunction()

if(MODE STREQUAL "ptxas")
  # ptxas -v on the PTX through nvcc, which picks the ptxas beside it and passes it the same
  # arguments as in the gspo4j target's compile (those of FLAGS that concern ptxas included).
  string(REGEX REPLACE "[.]ptx$" ".cubin" cubin "${PTX}")
  separate_arguments(flags UNIX_COMMAND "${FLAGS}")
  execute_process(COMMAND "${NVCC}" ${flags} "-arch=${ARCH}" -cubin -Xptxas -v -o "${cubin}" "${PTX}"
                  RESULT_VARIABLE status OUTPUT_VARIABLE log ERROR_VARIABLE log)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "ptx_check: ptxas failed on ${PTX}:\n${log}")
  endif()
  file(WRITE "${PTXAS_LOG}" "${log}")
elseif(MODE STREQUAL "parse")
  check_kernels()
elseif(MODE STREQUAL "selftest")
  # The good fixtures must pass; the bad ones must fail with each of these messages.
  set(common -DGROUP=token_logprob -DARCH=sm_90 -DDTYPES=Float32)
  execute_process(COMMAND "${CMAKE_COMMAND}" -DMODE=parse ${common} -DTHREADS=128 "-DPTX=${FIXTURES}/good.ptx"
                          "-DPTXAS_LOG=${FIXTURES}/good.ptxas.txt" "-DREPORT=${WORK}/selftest.good.txt" -P "${CMAKE_CURRENT_LIST_FILE}"
                  RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "ptx_check self-test: the good fixtures were rejected:\n${output}")
  endif()
  execute_process(COMMAND "${CMAKE_COMMAND}" -DMODE=parse ${common} -DTHREADS=128,256 "-DPTX=${FIXTURES}/bad.ptx"
                          "-DPTXAS_LOG=${FIXTURES}/bad.ptxas.txt" "-DREPORT=${WORK}/selftest.bad.txt" -P "${CMAKE_CURRENT_LIST_FILE}"
                  RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(status EQUAL 0)
    message(FATAL_ERROR "ptx_check self-test: the bad fixtures passed:\n${output}")
  endif()
  foreach(expected
      "sm_90 forward_kernel<Float32, 128>: 0 bytes spill stores, 0 bytes spill loads, 16 bytes stack frame"
      "sm_90 forward_kernel<Float32, 128>: at most 1 ld.global.cs.v4 in one basic block, 4 expected"
      "sm_90 forward_kernel<Float32, 128>: 1 ld.global.cs.v4 in its PTX entry, at least 5 expected"
      "sm_90 backward_kernel<Float32, 128>: 4 bytes spill stores, 4 bytes spill loads, 8 bytes stack frame"
      "sm_90 backward_kernel<Float32, 128>: 4 ld.global.cs.v4 in its PTX entry, at least 5 expected"
      "sm_90 backward_kernel<Float32, 128>: at most 0 st.global.cs.v4 in one basic block, 4 expected"
      "sm_90 backward_kernel<Float32, 128>: 0 st.global.cs.v4 in its PTX entry, at least 5 expected"
      "sm_90 forward_kernel<Float32, 128>: no mul.rn.f32 in its PTX entry"
      "sm_90 forward_kernel<Float32, 256>: not found"
      "sm_90 backward_kernel<Float32, 256>: not found")
    string(FIND "${output}" "${expected}" at)
    if(at EQUAL -1)
      message(FATAL_ERROR "ptx_check self-test: the bad fixtures' failure lacks \"${expected}\":\n${output}")
    endif()
  endforeach()
  # The backward's main loop keeps its four 128-bit loads: not a failure.
  string(FIND "${output}" "backward_kernel<Float32, 128>: at most 4 ld" at)
  if(NOT at EQUAL -1)
    message(FATAL_ERROR "ptx_check self-test: the bad fixtures' backward main loop was rejected:\n${output}")
  endif()
  file(WRITE "${STAMP}" "good fixtures pass, bad fixtures fail as expected\n")
elseif(MODE STREQUAL "collect")
  string(REPLACE "|" ";" reports "${REPORTS}")
  set(text "")
  foreach(report IN LISTS reports)
    file(READ "${report}" part)
    string(APPEND text "${part}\n")
  endforeach()
  file(WRITE "${OUT}" "${text}")
  list(LENGTH reports count)
  message("ptx_check: ${count} reports pass; the table is in ${OUT}")
else()
  message(FATAL_ERROR "ptx_check: MODE must be ptxas, parse, selftest or collect (got '${MODE}')")
endif()
