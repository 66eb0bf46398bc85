// Device helpers shared by the CUDA kernels (token_stats.cu, softmax_grad.cu), written once:
// dtype conversions, the dtype dispatch, 16-byte vector spans, integer atomics, launch errors.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/kernel_args.h"

namespace rankops {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * log2(e)): one MUFU.EX2
constexpr float kLog2eLo = 1.92596299e-8f;     // log2(e) - kLog2e: the fp32 constant is that low

// exp(d), d <= 0 (or -inf, or NaN), for the sums of logsumexp, without a one-sided error.
// The hardware's exp2 (MUFU.EX2, what exp2f and __expf become) errs low on average: on an H100
// logp came out ~4e-8 high on average over a realistic sample (tests/test_logp_bias.py: bound
// 2e-8), a bias that a corpus mean does not average away. So 2^t, t = d log2(e), is computed on
// the FMA units: t = j + f with j an integer and |f| <= 1/2, 2^f by a degree-6 polynomial
// (relative error under 2e-9, mean ~0), times 2^j built in the exponent bits. log2(e) is split
// in two fp32 constants: kLog2e alone is 1.3e-8 (relative) low, which would read logp ~1e-8
// times the softmax's mean |d| low. Below 2^-126 (d < -87.3) the term is 0; NaN stays NaN.
__device__ inline float exp_of(float d) {
  const float t = fmaf(d, kLog2e, d * kLog2eLo);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: t + kRound rounds t to an integer
  const float r = t + kRound;
  const float f = t - (r - kRound);
  float p = 0.00015345810970757157f;  // coefficients of f^6 down to f^0
  p = fmaf(p, f, 0.0013399930903688073f);
  p = fmaf(p, f, 0.009618489071726799f);
  p = fmaf(p, f, 0.05550328642129898f);
  p = fmaf(p, f, 0.24022646248340607f);
  p = fmaf(p, f, 0.6931471824645996f);
  p = fmaf(p, f, 1.0f);
  const int j = __float_as_int(r) - 0x4B400000;  // the integer t was rounded to
  const float y = p * __int_as_float((j + 127) << 23);
  return t >= -126.0f ? y : (t != t ? t : 0.0f);
}

// Exact upcasts: bf16 and fp16 are subsets of fp32.
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

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with T the element type of the dtype code; returns f's result.
template <typename F> const char* dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
  }
  return "unsupported dtype code";
}

// The error of the launches just enqueued, as the entry points return it ("" when none).
inline const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per uint4

// [begin, end) of a contiguous array split for 16-byte loads: scalar elements [begin, body),
// then n_vec aligned vectors from body, then scalar elements [tail, end). `addr` is the address
// of element `begin`; an address not even element-aligned gets no vectors at all.
struct VecSpan {
  int64_t body, n_vec, tail;
};
template <typename T>
__device__ inline VecSpan vec_span(uintptr_t addr, int64_t begin, int64_t end) {
  const int64_t to_boundary = static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(T));
  const int64_t n = end - begin;
  const int64_t head = addr % sizeof(T) != 0 ? n : (n < to_boundary ? n : to_boundary);
  const int64_t n_vec = (n - head) / kVec<T>;
  return VecSpan{begin + head, n_vec, begin + head + n_vec * kVec<T>};
}

// int64 atomics through the unsigned 64-bit overload: two's-complement addition is the same.
__device__ inline void atomic_add_i64(int64_t* p, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

__host__ __device__ inline int64_t ceil_div(int64_t x, int64_t d) { return (x + d - 1) / d; }

}  // namespace cuda
}  // namespace rankops
