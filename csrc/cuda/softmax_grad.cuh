// CUDA softmax_grad: host-side entry point (csrc/cuda/softmax_grad.cu).
#pragma once
#include <cstdint>

namespace rankops {
namespace cuda {

struct SoftmaxGradLaunch {
  const void* logits = nullptr;   // [n_rows, row_len] with the strides below (elements)
  int dtype = 0;                  // 0 float32, 1 bfloat16, 2 float16
  int64_t n_rows = 0;
  int64_t row_len = 0;            // columns of logits and grad
  int64_t n_cols = 0;             // columns that count (<= row_len); the rest get zeros
  int64_t row_stride = 0, col_stride = 1;
  const int64_t* targets = nullptr;  // [n_rows]
  int64_t ignore_index = -100;
  const float* lse = nullptr;     // [n_rows]
  const float* scale = nullptr;   // [n_rows]
  void* grad = nullptr;           // [n_rows, row_len] out, contiguous, the logits' dtype
  uintptr_t stream = 0;           // cudaStream_t
};

// Enqueues the kernel on launch.stream; returns an empty string or an error message.
const char* softmax_grad(const SoftmaxGradLaunch& launch);

}  // namespace cuda
}  // namespace rankops
