# Configures and builds examples/cpp from an empty folder: run by ctest as `cmake -P`.
# SOURCE_DIR, BUILD_DIR, PREFIXES ("|"-separated), GENERATOR, CXX_COMPILER, BUILD_TYPE.

string(REPLACE "|" ";" prefixes "${PREFIXES}")
file(REMOVE_RECURSE "${BUILD_DIR}")
file(MAKE_DIRECTORY "${BUILD_DIR}")

execute_process(
  COMMAND ${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${BUILD_DIR}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefixes}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
    "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring the example against the installed package failed")
endif()

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
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building the example failed")
endif()
