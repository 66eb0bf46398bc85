// The weighted cross-entropy gradient on CUDA, one read of the logits and one write of the grad:
//   grad[r, v] = scale[r] * (exp(z[r, v] - lse[r]) - [v == t_r])   for v < n_cols, else 0.
//
// One block per (row, tile of columns); no reduction, so the launch shape cannot change a bit of
// the result. Each element is one load, one exp2 (argument pre-scaled by log2(e)), one fp32
// multiply and one store rounded to nearest even. The logits' rows are found from their own
// leading sizes and strides (no reshape, no copy); grad is contiguous [n_rows, row_len]. Where
// the row is contiguous and the logits and the grad sit at the same offset from a 16-byte
// boundary (always so when both are dense rows of the same length), the tile's body moves in
// 16-byte vectors with a scalar head and tail; otherwise every element is scalar. Offsets are
// 64-bit throughout: N * V passes 2^31.
#include "common.cuh"
#include "kernels.cuh"

namespace rankops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVecsPerThread = 4;        // 16-byte vectors per thread and tile: 16 KiB a tile
constexpr int64_t kMaxGridY = 65535;     // hardware limit of gridDim.y; tiles beyond it loop
template <typename T> constexpr int64_t kTileCols = int64_t{kVec<T>} * kThreads * kVecsPerThread;

struct Row {
  int64_t target;
  int64_t live_cols;  // n_cols, or 0 for an ignored row: then every column is padding
  float lse, scale;

  __device__ inline float grad(int64_t c, float z) const {
    if (c >= live_cols) return 0.0f;  // +0.0 whatever the scale (inf * 0 would be NaN)
    // Subtract before scaling by log2(e): z * log2(e) alone would put rounding error of the
    // size of |z| u into the exponent, (z - lse) * log2(e) only |z - lse| u.
    const float p = exp2f((z - lse) * kLog2e);
    // The one-hot term is subtracted before the single rounding of the product.
    return scale * (p - (c == target ? 1.0f : 0.0f));
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_kernel(const KernelArgs a, int64_t n_tiles) {
  const Logits& z = a.logits;
  const int64_t row = blockIdx.x;
  const int64_t t = a.targets[row];
  // Out-of-range targets (possible only without validation) make the row an ignored one:
  // zeros, and nothing is read.
  const bool keep = t != a.ignore_index && t >= 0 && t < z.n_cols;
  const Row r{t, keep ? z.n_cols : 0, keep ? a.lse[row] : 0.0f, keep ? a.scale[row] : 0.0f};
  const T* in = static_cast<const T*>(z.data) + z.row_offset(row);
  T* out = static_cast<T*>(a.grad) + row * z.row_len;

  for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
    const int64_t begin = tile * kTileCols<T>;
    const int64_t end = min(begin + kTileCols<T>, z.row_len);
    const uintptr_t in_addr = reinterpret_cast<uintptr_t>(in + begin);
    const uintptr_t out_addr = reinterpret_cast<uintptr_t>(out + begin);
    // A row that reads nothing only needs the output aligned.
    const bool vectorise = r.live_cols == 0 || (z.col_stride == 1 && in_addr % 16 == out_addr % 16);
    if (!vectorise) {
      for (int64_t c = begin + threadIdx.x; c < end; c += kThreads)
        out[c] = from_float<T>(r.grad(c, c < r.live_cols ? to_float(in[c * z.col_stride]) : 0.0f));
      continue;
    }
    const VecSpan v = vec_span<T>(out_addr, begin, end);
    for (int64_t c = begin + threadIdx.x; c < v.body; c += kThreads)
      out[c] = from_float<T>(r.grad(c, c < r.live_cols ? to_float(in[c]) : 0.0f));
    const uint4* in_vec = reinterpret_cast<const uint4*>(in + v.body);
    uint4* out_vec = reinterpret_cast<uint4*>(out + v.body);
    for (int64_t i = threadIdx.x; i < v.n_vec; i += kThreads) {
      const int64_t c0 = v.body + i * kVec<T>;
      // Every column of the vector is inside the row (c0 + kVec <= end <= row_len), so a vector
      // that starts in the live part may read padded columns, never past the row.
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (c0 < r.live_cols) raw = __ldg(in_vec + i);
      const T* x = reinterpret_cast<const T*>(&raw);
      uint4 packed;
      T* y = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) y[j] = from_float<T>(r.grad(c0 + j, to_float(x[j])));
      out_vec[i] = packed;
    }
    for (int64_t c = v.tail + threadIdx.x; c < end; c += kThreads)
      out[c] = from_float<T>(r.grad(c, c < r.live_cols ? to_float(in[c]) : 0.0f));
  }
}

}  // namespace

const char* softmax_grad(const KernelArgs& a) {
  const Logits& z = a.logits;
  if (z.n_rows == 0 || z.row_len == 0) return "";
  if (z.n_rows > 0x7fffffffLL) return "too many rows for one launch (gridDim.x)";
  return dispatch_dtype(z.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t n_tiles = ceil_div(z.row_len, kTileCols<T>);
    const dim3 grid(static_cast<unsigned>(z.n_rows),
                    static_cast<unsigned>(n_tiles < kMaxGridY ? n_tiles : kMaxGridY));
    grad_kernel<T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, n_tiles);
    return launch_error();
  });
}

}  // namespace cuda
}  // namespace rankops
