// CUDA token statistics: host-side entry points (csrc/cuda/token_stats.cu).
#pragma once
#include <cstdint>

namespace rankops {
namespace cuda {

struct Launch {
  const void* logits = nullptr;   // [n_rows, >= n_cols] with the strides below (elements)
  int dtype = 0;                  // 0 float32, 1 bfloat16, 2 float16
  int64_t n_rows = 0, n_cols = 0, row_stride = 0, col_stride = 1;
  const int64_t* targets = nullptr;  // [n_rows]
  int64_t ignore_index = -100;
  int64_t slice_cols = 16384;     // columns per block; the partials merge in slice order
  void* workspace = nullptr;      // workspace_bytes(n_rows, n_slices) bytes
  int64_t* rank = nullptr;        // [n_rows] out
  int64_t* ties = nullptr;        // [n_rows] out
  float* logp = nullptr;          // [n_rows] out
  int32_t* bad = nullptr;         // [n_rows] out: 1 where a kept row holds NaN or +-inf
  int64_t* stats = nullptr;       // [6, hist_len] int64 or null: fixed-point accumulation
  int64_t hist_len = 0;
  uintptr_t stream = 0;           // cudaStream_t
};

int64_t workspace_bytes(int64_t n_rows, int64_t n_slices);

// Enqueues the kernels on launch.stream; returns an empty string or a CUDA error message.
const char* token_stats(const Launch& launch);

}  // namespace cuda
}  // namespace rankops
