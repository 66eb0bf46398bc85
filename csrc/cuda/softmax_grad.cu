// The weighted cross-entropy gradient on CUDA, one read of the logits and one write of the grad:
//   grad[r, v] = scale[r] * (exp(z[r, v] - lse[r]) - [v == t_r])   for v < n_cols, else 0.
//
// One block per (row, tile of columns); no reduction, so the launch shape cannot change a bit of
// the result. Each element is one load, one exp2 (argument pre-scaled by log2(e)), one fp32
// multiply and one store rounded to nearest even. Where the row is contiguous and the logits and
// the grad sit at the same offset from a 16-byte boundary (always so when both are dense rows of
// the same length), the tile's body moves in 16-byte vectors with a scalar head and tail;
// otherwise every element is scalar. Offsets are 64-bit throughout: N * V passes 2^31.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "softmax_grad.cuh"

namespace rankops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVecsPerThread = 4;        // 16-byte vectors per thread and tile: 16 KiB a tile
constexpr int64_t kMaxGridY = 65535;     // hardware limit of gridDim.y; tiles beyond it loop
constexpr float kLog2e = 1.4426950408889634f;

template <typename T> __device__ inline float to_float(T v);
template <> __device__ inline float to_float<float>(float v) { return v; }
template <> __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ inline float to_float<__half>(__half v) { return __half2float(v); }

// Round to nearest even, once (cvt.rn); NaN stays NaN.
template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per vector
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
__global__ void __launch_bounds__(kThreads)
grad_kernel(const T* __restrict__ logits, T* __restrict__ grad, int64_t row_len, int64_t n_cols,
            int64_t row_stride, int64_t col_stride, const int64_t* __restrict__ targets,
            int64_t ignore_index, const float* __restrict__ lse, const float* __restrict__ scale,
            int64_t n_tiles) {
  constexpr int vec = kVec<T>;
  const int64_t row = blockIdx.x;
  const int64_t t = targets[row];
  // Out-of-range targets (possible only without validation) make the row an ignored one:
  // zeros, and nothing is read.
  const bool keep = t != ignore_index && t >= 0 && t < n_cols;
  const Row r{t, keep ? n_cols : 0, keep ? lse[row] : 0.0f, keep ? scale[row] : 0.0f};
  const T* in = logits + row * row_stride;
  T* out = grad + row * row_len;

  for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
    const int64_t begin = tile * kTileCols<T>;
    const int64_t end = begin + kTileCols<T> < row_len ? begin + kTileCols<T> : row_len;
    const uintptr_t in_addr = reinterpret_cast<uintptr_t>(in + begin);
    const uintptr_t out_addr = reinterpret_cast<uintptr_t>(out + begin);
    // A row that reads nothing only needs the output aligned.
    const bool vectorise = r.live_cols == 0 || (col_stride == 1 && in_addr % 16 == out_addr % 16);
    if (!vectorise) {
      for (int64_t c = begin + threadIdx.x; c < end; c += kThreads)
        out[c] = from_float<T>(r.grad(c, c < r.live_cols ? to_float(in[c * col_stride]) : 0.0f));
      continue;
    }
    const int64_t to_boundary = static_cast<int64_t>((16 - out_addr % 16) % 16 / sizeof(T));
    const int64_t body = begin + (end - begin < to_boundary ? end - begin : to_boundary);
    const int64_t n_vec = (end - body) / vec;
    const int64_t tail = body + n_vec * vec;
    for (int64_t c = begin + threadIdx.x; c < body; c += kThreads)
      out[c] = from_float<T>(r.grad(c, c < r.live_cols ? to_float(in[c]) : 0.0f));
    const uint4* in_vec = reinterpret_cast<const uint4*>(in + body);
    uint4* out_vec = reinterpret_cast<uint4*>(out + body);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const int64_t c0 = body + i * vec;
      // Every column of the vector is inside the row (c0 + vec <= end <= row_len), so a vector
      // that starts in the live part may read padded columns, never past the row.
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (c0 < r.live_cols) raw = __ldg(in_vec + i);
      const T* x = reinterpret_cast<const T*>(&raw);
      uint4 packed;
      T* y = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int j = 0; j < vec; ++j) y[j] = from_float<T>(r.grad(c0 + j, to_float(x[j])));
      out_vec[i] = packed;
    }
    for (int64_t c = tail + threadIdx.x; c < end; c += kThreads)
      out[c] = from_float<T>(r.grad(c, c < r.live_cols ? to_float(in[c]) : 0.0f));
  }
}

template <typename T>
const char* launch(const SoftmaxGradLaunch& L) {
  const int64_t n_tiles = (L.row_len + kTileCols<T> - 1) / kTileCols<T>;
  const dim3 grid(static_cast<unsigned>(L.n_rows),
                  static_cast<unsigned>(n_tiles < kMaxGridY ? n_tiles : kMaxGridY));
  grad_kernel<T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(L.stream)>>>(
      static_cast<const T*>(L.logits), static_cast<T*>(L.grad), L.row_len, L.n_cols, L.row_stride,
      L.col_stride, L.targets, L.ignore_index, L.lse, L.scale, n_tiles);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace

const char* softmax_grad(const SoftmaxGradLaunch& L) {
  if (L.n_rows < 0 || L.n_cols < 0 || L.n_cols > L.row_len)
    return "bad shape: need n_rows >= 0 and 0 <= n_cols <= row_len";
  if (L.n_rows == 0 || L.row_len == 0) return "";
  if (L.n_rows > 0x7fffffffLL) return "too many rows for one launch (gridDim.x)";
  switch (L.dtype) {
    case 0: return launch<float>(L);
    case 1: return launch<__nv_bfloat16>(L);
    case 2: return launch<__half>(L);
  }
  return "unsupported dtype code";
}

}  // namespace cuda
}  // namespace rankops
