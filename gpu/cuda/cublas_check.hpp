// Checking every cuBLAS call: a failure throws with the call, the file and the line.
#pragma once

#include <cublas_v2.h>

#include <stdexcept>
#include <string>

#define TROUPE_CUBLAS_CHECK(call)                                                                          \
  do {                                                                                                     \
    const cublasStatus_t troupe_status_ = (call);                                                          \
    if (troupe_status_ != CUBLAS_STATUS_SUCCESS)                                                           \
      throw std::runtime_error(std::string("cuBLAS error: ") + cublasGetStatusString(troupe_status_) + " in " + \
                               #call + " at " + __FILE__ + ":" + std::to_string(__LINE__));                \
  } while (0)
