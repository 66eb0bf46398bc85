// RANKOPS_HOST_DEVICE marks the inline helpers that host C++ and CUDA device code share
// (csrc/common/*.h): nvcc compiles them for both sides, a plain C++ compiler sees plain inlines.
#pragma once

#if defined(__CUDACC__)
#define RANKOPS_HOST_DEVICE __host__ __device__
#else
#define RANKOPS_HOST_DEVICE
#endif
