# Installs the library into an empty prefix, then configures and builds examples/cpp in an
# empty folder against it: run by ctest as `cmake -P`. Variables: LIBRARY_BUILD_DIR,
# INSTALL_PREFIX, SOURCE_DIR, BUILD_DIR, PREFIXES ("|"-separated), GENERATOR,
# CXX_COMPILER, BUILD_TYPE.

function(check rc what)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed")
  endif()
endfunction()

file(REMOVE_RECURSE "${INSTALL_PREFIX}" "${BUILD_DIR}")
execute_process(
  COMMAND ${CMAKE_COMMAND} --install "${LIBRARY_BUILD_DIR}" --prefix "${INSTALL_PREFIX}"
  RESULT_VARIABLE rc)
check(${rc} "installing the library")

string(REPLACE "|" ";" prefixes "${PREFIXES}")
execute_process(
  COMMAND ${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${BUILD_DIR}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefixes}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
    "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
  RESULT_VARIABLE rc)
check(${rc} "configuring the example against the installed package")

if(DEFINED ENV{MAX_JOBS})
  set(jobs $ENV{MAX_JOBS})
else()
  include(ProcessorCount)
  ProcessorCount(jobs)
  if(jobs EQUAL 0)
    set(jobs 1)
  endif()
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build "${BUILD_DIR}" --parallel ${jobs} RESULT_VARIABLE rc)
check(${rc} "building the example")
