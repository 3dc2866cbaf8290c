# Finds the system libraries Troupe builds on (Debian packages; scripts/setup.sh installs them)
# and exposes each as an imported target troupe::<name>. CUDA is optional.
find_package(PkgConfig REQUIRED)

pkg_check_modules(OPENBLAS REQUIRED IMPORTED_TARGET openblas)
add_library(troupe::openblas ALIAS PkgConfig::OPENBLAS)

pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
add_library(troupe::pcre2 ALIAS PkgConfig::PCRE2)

find_package(simdjson REQUIRED)
add_library(troupe::simdjson ALIAS simdjson::simdjson)

find_path(CLI11_INCLUDE_DIR CLI/CLI.hpp REQUIRED)
add_library(troupe_cli11 INTERFACE)
target_include_directories(troupe_cli11 SYSTEM INTERFACE ${CLI11_INCLUDE_DIR})
add_library(troupe::cli11 ALIAS troupe_cli11)

find_package(GTest REQUIRED)
find_package(Threads REQUIRED)

include(CheckLanguage)
set(TROUPE_HAVE_CUDA OFF)
if(TROUPE_CUDA)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(TROUPE_HAVE_CUDA ON)
    message(STATUS "Troupe: CUDA backend enabled (${CMAKE_CUDA_COMPILER})")
  else()
    message(STATUS "Troupe: no nvcc found; building the CPU backend only")
  endif()
endif()
