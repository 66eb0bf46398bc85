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

// exp(d) for the sums of logsumexp. exp2f(d * kLog2e) alone has a one-sided error: kLog2e is
// 1.3e-8 (relative) below log2(e), so exp(d), d <= 0, comes out (1 + 1.3e-8 |d|) too large and
// logp ~1.3e-8 times the softmax's mean |d| (a few nats) too low. One more FMA removes it.
__device__ inline float exp_of(float d) { return exp2f(fmaf(d, kLog2e, d * kLog2eLo)); }

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
