// The weighted cross-entropy gradient, one read of the logits and one write of the gradient:
//   grad[r, v] = scale[r] * (softmax(z_r)[v] - [v == t_r]).
//
// Compiled once per instruction set like token_stats_kernel.cpp. Each element costs a load, one
// exp and a rounded store, so the loop is bandwidth-bound on every ISA; there is no reduction,
// so the split into tasks cannot change a single bit of the result.
#include <cstdint>
#include <cstring>

#include <omp.h>

#include "kernel_math.h"
#include "token_stats.h"

namespace rankops {
namespace cpu {
namespace RANKOPS_ISA {
namespace {

constexpr int64_t kBlockCols = 16384;            // columns per task
constexpr int64_t kMinParallelWork = 1 << 15;    // below this many logits, one thread

template <typename T, typename IsBF16, bool kContiguous>
inline void grad_block(const T* __restrict row, int64_t col_stride, T* __restrict out, int64_t begin,
                       int64_t end, float lse, float scale) {
  for (int64_t v = begin; v < end; ++v) {
    const float z = load_value(row + (kContiguous ? v : v * col_stride), IsBF16{});
    store_value(out + v, scale * exp_bounded(z - lse), IsBF16{});
  }
}

template <typename T, typename IsBF16>
Status run(const KernelArgs& a) {
  const Logits& z = a.logits;
  const T* base = static_cast<const T*>(z.data);
  T* grad = static_cast<T*>(a.grad);  // contiguous [n_rows, row_len]
  const int64_t n_blocks = (z.row_len + kBlockCols - 1) / kBlockCols;
  const int n_threads = z.n_rows * z.row_len < kMinParallelWork ? 1 : a.n_threads;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t task = 0; task < z.n_rows * n_blocks; ++task) {
    const int64_t r = task / n_blocks;
    const int64_t begin = (task % n_blocks) * kBlockCols;
    const int64_t end = begin + kBlockCols < z.row_len ? begin + kBlockCols : z.row_len;
    T* out = grad + r * z.row_len;
    const int64_t t = a.targets[r];
    // Ignored rows and padded columns (v >= n_cols) get exact zeros (all-zero bits in every dtype).
    const int64_t live_end = t == a.ignore_index ? begin : (end < z.n_cols ? end : z.n_cols);
    if (live_end < end) {
      const int64_t zero_begin = live_end > begin ? live_end : begin;
      std::memset(out + zero_begin, 0, static_cast<size_t>(end - zero_begin) * sizeof(T));
    }
    if (live_end <= begin) continue;
    const T* row = base + z.row_offset(r);
    const float lse = a.lse[r], scale = a.scale[r];
    if (z.col_stride == 1)
      grad_block<T, IsBF16, true>(row, 1, out, begin, live_end, lse, scale);
    else
      grad_block<T, IsBF16, false>(row, z.col_stride, out, begin, live_end, lse, scale);
    if (t >= begin && t < live_end) {
      // The one-hot term, rounded once with the softmax term rather than subtracted after.
      const float z_t = load_value(row + t * z.col_stride, IsBF16{});
      store_value(out + t, scale * (exp_bounded(z_t - lse) - 1.0f), IsBF16{});
    }
  }
  return Status{};
}

}  // namespace

Status softmax_grad(const KernelArgs& a) {
  switch (a.logits.dtype) {
    case DType::kFloat32: return run<float, std::false_type>(a);
    case DType::kBFloat16: return run<uint16_t, std::true_type>(a);
    case DType::kFloat16: return run<uint16_t, std::false_type>(a);
  }
  return Status{};
}

}  // namespace RANKOPS_ISA
}  // namespace cpu
}  // namespace rankops
