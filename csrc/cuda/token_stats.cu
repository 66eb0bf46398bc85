// Fused CUDA kernels: per token the target's rank (strict), tie count and log-softmax, and
// per-rank accumulation with integer atomics on exact fixed-point logp.
//
// Kernel 1: one block per (row, slice of slice_cols columns). The target logit is read first;
// then each thread streams its share of the slice with 16-byte loads, counting values above and
// equal to the target and keeping a running sum of exp(x - ref), where ref is its running max
// (started at the target logit, so a -inf entry adds exp(-inf) = 0, never inf - inf). One exp
// per element: a larger value rescales the old sum instead of costing a second exp. The block
// reduces in a fixed order (warp shuffles, then shared memory), so results are bit-identical run
// after run. Kernel 2: one thread per row merges the row's slices in slice order.
// Offsets are 64-bit throughout: N * V passes 2^31 in real evaluations.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "token_stats.cuh"

namespace rankops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

struct Partials {  // structure of arrays over tasks = row * n_slices + slice
  float* ref;
  float* sum;
  int32_t* gt;
  int32_t* eq;
  int32_t* bad;
};

__host__ __device__ inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

Partials carve(void* workspace, int64_t n_tasks) {
  char* p = static_cast<char*>(workspace);
  const int64_t f = align_up(n_tasks * 4, 256);
  Partials parts;
  parts.ref = reinterpret_cast<float*>(p);
  parts.sum = reinterpret_cast<float*>(p + f);
  parts.gt = reinterpret_cast<int32_t*>(p + 2 * f);
  parts.eq = reinterpret_cast<int32_t*>(p + 3 * f);
  parts.bad = reinterpret_cast<int32_t*>(p + 4 * f);
  return parts;
}

template <typename T> __device__ inline float to_float(T v);
template <> __device__ inline float to_float<float>(float v) { return v; }
template <> __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ inline float to_float<__half>(__half v) { return __half2float(v); }

// A thread's running statistics.
struct Acc {
  float ref, sum;
  int32_t gt, eq, bad;

  __device__ inline void add(float x, float target) {
    gt += x > target;
    eq += x == target;
    bad |= !(fabsf(x) <= 3.402823466e38f);  // NaN or +-inf
    if (x > ref) {  // rescale instead of a second exp; NaN never enters here
      sum = sum * exp2f((ref - x) * kLog2e) + 1.0f;
      ref = x;
    } else {
      sum += exp2f((x - ref) * kLog2e);
    }
  }

  __device__ inline void merge(const Acc& o) {
    const float m = fmaxf(ref, o.ref);
    const float shift = m == -INFINITY ? 0.0f : m;
    sum = sum * exp2f((ref - shift) * kLog2e) + o.sum * exp2f((o.ref - shift) * kLog2e);
    ref = m;
    gt += o.gt;
    eq += o.eq;
    bad |= o.bad;
  }
};

__device__ inline Acc shfl_down(const Acc& a, int offset) {
  Acc o;
  o.ref = __shfl_down_sync(0xffffffffu, a.ref, offset);
  o.sum = __shfl_down_sync(0xffffffffu, a.sum, offset);
  o.gt = __shfl_down_sync(0xffffffffu, a.gt, offset);
  o.eq = __shfl_down_sync(0xffffffffu, a.eq, offset);
  o.bad = __shfl_down_sync(0xffffffffu, a.bad, offset);
  return o;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
slice_kernel(const T* __restrict__ logits, int64_t n_cols, int64_t row_stride, int64_t col_stride,
             const int64_t* __restrict__ targets, int64_t ignore_index, int64_t slice_cols,
             int64_t n_slices, Partials parts) {
  const int64_t task = blockIdx.x;
  const int64_t row = task / n_slices, slice = task % n_slices;
  const int64_t t = targets[row];
  // Out-of-range targets (possible only without validation) read nothing: the row is ignored.
  const bool keep = t != ignore_index && t >= 0 && t < n_cols;
  const T* row_ptr = logits + row * row_stride;
  const float target = keep ? to_float(row_ptr[t * col_stride]) : 0.0f;
  const int64_t begin = slice * slice_cols;
  const int64_t end = keep ? min(begin + slice_cols, n_cols) : begin;

  Acc acc{target, 0.0f, 0, 0, 0};
  if (col_stride == 1) {
    // 16-byte loads over the aligned body; scalar prologue and epilogue.
    constexpr int kVec = 16 / sizeof(T);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row_ptr + begin);
    const int64_t to_boundary = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
    const int64_t head = end - begin < to_boundary ? end - begin : to_boundary;
    const bool aligned_elems = addr % sizeof(T) == 0;
    const int64_t body_begin = begin + (aligned_elems ? head : (end - begin));
    const int64_t n_vec = (end - body_begin) / kVec;
    for (int64_t c = begin + threadIdx.x; c < body_begin; c += kThreads) acc.add(to_float(row_ptr[c]), target);
    const uint4* vec = reinterpret_cast<const uint4*>(row_ptr + body_begin);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      uint4 raw = __ldg(vec + i);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc.add(to_float(v[j]), target);
    }
    for (int64_t c = body_begin + n_vec * kVec + threadIdx.x; c < end; c += kThreads)
      acc.add(to_float(row_ptr[c]), target);
  } else {
    for (int64_t c = begin + threadIdx.x; c < end; c += kThreads)
      acc.add(to_float(row_ptr[c * col_stride]), target);
  }

  // Fixed-order reduction: within each warp, then across warps in warp order.
  for (int offset = 16; offset > 0; offset >>= 1) acc.merge(shfl_down(acc, offset));
  __shared__ Acc warp_acc[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total = warp_acc[0];
    for (int w = 1; w < kWarps; ++w) total.merge(warp_acc[w]);
    parts.ref[task] = total.ref;
    parts.sum[task] = total.sum;
    parts.gt[task] = total.gt;
    parts.eq[task] = total.eq;
    parts.bad[task] = total.bad;
  }
}

__device__ inline void add_fixed(int64_t* stats, int64_t hist_len, int row_hi, int64_t bin, int64_t q) {
  // Two's-complement addition is the same on unsigned words.
  atomicAdd(reinterpret_cast<unsigned long long*>(stats + row_hi * hist_len + bin),
            static_cast<unsigned long long>(q >> 32));
  atomicAdd(reinterpret_cast<unsigned long long*>(stats + (row_hi + 1) * hist_len + bin),
            static_cast<unsigned long long>(q & 0xffffffffLL));
}

template <typename T>
__global__ void finish_kernel(const T* __restrict__ logits, int64_t n_rows, int64_t n_cols,
                              int64_t row_stride, int64_t col_stride,
                              const int64_t* __restrict__ targets, int64_t ignore_index,
                              int64_t n_slices, Partials parts, int64_t* rank_out,
                              int64_t* ties_out, float* logp_out, int32_t* bad_out,
                              int64_t* stats, int64_t hist_len) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= n_rows) return;
  const int64_t t = targets[row];
  const bool keep = t != ignore_index && t >= 0 && t < n_cols;
  if (!keep) {
    rank_out[row] = -1;
    ties_out[row] = 0;
    logp_out[row] = 0.0f;
    bad_out[row] = 0;
    return;
  }
  const float target = to_float(logits[row * row_stride + t * col_stride]);
  Acc acc{-INFINITY, 0.0f, 0, 0, 0};
  int64_t gt = 0, eq = 0;
  for (int64_t s = 0; s < n_slices; ++s) {  // slice order: never depends on scheduling
    const int64_t i = row * n_slices + s;
    Acc p{parts.ref[i], parts.sum[i], 0, 0, parts.bad[i]};
    acc.merge(p);
    gt += parts.gt[i];
    eq += parts.eq[i];
  }
  const int64_t ties = eq - (target == target ? 1 : 0);
  const float logp = target - (acc.ref + logf(acc.sum));
  rank_out[row] = gt;
  ties_out[row] = ties;
  logp_out[row] = logp;
  bad_out[row] = acc.bad;
  if (stats != nullptr && fabsf(logp) < 8388608.0f) {  // |logp| * 2^40 must fit an int64
    const int64_t q = static_cast<int64_t>(floor(static_cast<double>(logp) * 1099511627776.0 + 0.5));
    atomicAdd(reinterpret_cast<unsigned long long*>(stats + 0 * hist_len + gt), 1ull);
    add_fixed(stats, hist_len, 1, gt, q);
    atomicAdd(reinterpret_cast<unsigned long long*>(stats + 3 * hist_len + gt + ties), 1ull);
    add_fixed(stats, hist_len, 4, gt + ties, q);
  }
}

template <typename T>
const char* launch(const Launch& L) {
  const T* logits = static_cast<const T*>(L.logits);
  const int64_t n_slices = (L.n_cols + L.slice_cols - 1) / L.slice_cols;
  const int64_t n_tasks = L.n_rows * n_slices;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(L.stream);
  Partials parts = carve(L.workspace, n_tasks);
  slice_kernel<T><<<static_cast<unsigned>(n_tasks), kThreads, 0, stream>>>(
      logits, L.n_cols, L.row_stride, L.col_stride, L.targets, L.ignore_index, L.slice_cols,
      n_slices, parts);
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((L.n_rows + threads - 1) / threads);
  finish_kernel<T><<<blocks, threads, 0, stream>>>(
      logits, L.n_rows, L.n_cols, L.row_stride, L.col_stride, L.targets, L.ignore_index, n_slices,
      parts, L.rank, L.ties, L.logp, L.bad, L.stats, L.hist_len);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace

int64_t workspace_bytes(int64_t n_rows, int64_t n_slices) {
  return 5 * align_up(n_rows * n_slices * 4, 256);
}

const char* token_stats(const Launch& L) {
  if (L.n_rows == 0) return "";
  if (L.n_rows * ((L.n_cols + L.slice_cols - 1) / L.slice_cols) > 0x7fffffffLL)
    return "too many (row, slice) blocks for one launch";
  switch (L.dtype) {
    case 0: return launch<float>(L);
    case 1: return launch<__nv_bfloat16>(L);
    case 2: return launch<__half>(L);
  }
  return "unsupported dtype code";
}

}  // namespace cuda
}  // namespace rankops
