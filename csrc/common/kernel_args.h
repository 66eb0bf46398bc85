// The one argument struct of every kernel, CPU and CUDA alike.
//
// Tensors cross the extension boundary as raw pointers, sizes and strides (in elements), so the
// module links no libtorch and one build serves every torch version. Logits keep their own
// geometry: up to kMaxLeadDims strided row dimensions are walked in place (no reshape, no copy),
// the last dimension by col_stride.
#pragma once
#include <cstdint>
#include <vector>

#include "host_device.h"

namespace rankops {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kMaxLeadDims = 8;

// A logits tensor [*lead_sizes, row_len]; only the first n_cols columns of a row count.
struct Logits {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  int32_t n_lead = 0;                          // leading (row) dimensions, 0..kMaxLeadDims
  int64_t lead_sizes[kMaxLeadDims] = {};
  int64_t lead_strides[kMaxLeadDims] = {};     // elements
  int64_t n_rows = 1;                          // product of lead_sizes
  int64_t n_cols = 0;                          // columns that count (vocab_size truncation)
  int64_t row_len = 0;                         // the full last dimension, >= n_cols
  int64_t col_stride = 1;                      // elements

  // Element offset of flat (row-major) row `row`: peel the index of each leading dimension off
  // from the last. 64-bit throughout, since N * V passes 2^31 in real evaluations.
  RANKOPS_HOST_DEVICE inline int64_t row_offset(int64_t row) const {
    if (n_lead == 1) return row * lead_strides[0];
    int64_t offset = 0;
    for (int d = n_lead - 1; d >= 0; --d) {
      offset += (row % lead_sizes[d]) * lead_strides[d];
      row /= lead_sizes[d];
    }
    return offset;
  }
};

// Every op's arguments; an op reads the fields it needs and ignores the others.
struct KernelArgs {
  Logits logits;
  const int64_t* targets = nullptr;     // [n_rows], contiguous
  int64_t ignore_index = -100;
  // Optional [n_rows] float32: the target's logit, found elsewhere (vocabulary-parallel shards).
  // Then a row is kept iff targets[row] != ignore_index, the target index is never read, and
  // ties count every equal value of the row (the target may live on another shard).
  const float* target_logit = nullptr;

  // token_stats outputs, [n_rows] each.
  int64_t* rank = nullptr;              // #{v < n_cols : z_v > z_t}, -1 where ignored
  int64_t* ties = nullptr;              // equal values (less the target itself), 0 where ignored
  float* logp = nullptr;                // z_t - logsumexp(z[:n_cols]), 0 where ignored
  int32_t* nonfinite = nullptr;         // CUDA: 1 where a kept row holds NaN or +-inf

  // Accumulation: the state [state::kNumRows, hist_len] (csrc/common/state_layout.h), or null.
  int64_t* stats = nullptr;
  int64_t hist_len = 0;

  // softmax_grad: grad = scale * (exp(z - lse) - onehot), contiguous [n_rows, row_len].
  const float* lse = nullptr;           // [n_rows]
  const float* scale = nullptr;         // [n_rows]
  void* grad = nullptr;                 // the logits' dtype

  // Execution.
  int32_t n_threads = 1;                // CPU: OpenMP threads
  uintptr_t stream = 0;                 // CUDA: cudaStream_t
  void* workspace = nullptr;            // CUDA: scratch of workspace_bytes, allocated by the caller
  int64_t workspace_bytes = 0;
};

// Building the struct from the binding's arguments, with every check that keeps a kernel in
// bounds (csrc/common/kernel_args.cpp, host only). Pointers arrive as integers; a bad argument
// throws std::invalid_argument (ValueError in Python), a failed CUDA launch std::runtime_error.
Logits make_logits(uintptr_t data, int dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, int64_t n_cols);
KernelArgs make_args(const Logits& z, uintptr_t targets, int64_t ignore_index, int n_threads = 1);
void set_outputs(KernelArgs& a, uintptr_t rank, uintptr_t ties, uintptr_t logp, uintptr_t target_logit);
void set_stats(KernelArgs& a, uintptr_t stats, int64_t hist_len);  // the state [6, hist_len]
void set_grad(KernelArgs& a, uintptr_t lse, uintptr_t scale, uintptr_t grad);
// CUDA token_stats: the non-finite flags, a workspace of at least workspace_needed bytes, the stream.
void set_cuda(KernelArgs& a, uintptr_t nonfinite, uintptr_t workspace, int64_t workspace_bytes,
              int64_t workspace_needed, uintptr_t stream);
void check_cuda(const char* err);  // throws on a non-empty launch error

}  // namespace rankops
