// Fused CUDA kernels: per token the target's rank (strict), tie count and log-softmax, and
// per-rank accumulation with integer atomics on exact fixed-point logp.
//
// Kernel 1: one block per (row, slice of slice_cols columns). The target logit is read first
// (or given: external target-logit mode); then each thread streams its share of the slice with
// 16-byte loads where the row is contiguous, counting values above and equal to the target and
// keeping a running sum of exp(x - ref), where ref is its running max (started at the target
// logit, so a -inf entry adds exp(-inf) = 0, never inf - inf). One exp per element: a larger
// value rescales the old sum instead of costing a second exp. The block reduces in a fixed order
// (warp shuffles, then shared memory), so results are bit-identical run after run. Kernel 2: one
// thread per row merges the row's slices in slice order and, with a state, accumulates.
// Rows are found from the logits' own leading sizes and strides (no reshape, no copy); offsets
// are 64-bit throughout, since N * V passes 2^31 in real evaluations.
#include "../common/state_layout.h"
#include "common.cuh"
#include "kernels.cuh"

namespace rankops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFinishThreads = 128;

// Columns per block: 64 KiB of logits (16384 fp32, 32768 bf16/fp16 columns), halved (down to
// 2048 columns) while there would be fewer than 1024 blocks, so few-row inputs still fill the
// GPU. Bigger blocks spread the block's end (the fixed-order merge of 256 threads) over more
// elements. A function of the shape and the element size alone: a given input always gets the
// same slices, and so the same bits.
int64_t slice_cols(int64_t n_rows, int64_t n_cols, int64_t elem_size) {
  int64_t cols = 65536 / elem_size;
  while (cols > 2048 && n_rows * ceil_div(n_cols, cols) < 1024) cols /= 2;
  return cols;
}

__host__ __device__ inline int64_t align_up(int64_t x, int64_t a) { return ceil_div(x, a) * a; }

struct Partials {  // structure of arrays over tasks = row * n_slices + slice
  float* ref;
  float* sum;
  int32_t* gt;
  int32_t* eq;
  int32_t* bad;
};

// Five arrays of 4-byte words, each starting on a 256-byte boundary.
int64_t partials_bytes(int64_t n_tasks) { return 5 * align_up(n_tasks * 4, 256); }

Partials carve(void* workspace, int64_t n_tasks) {
  char* p = static_cast<char*>(workspace);
  const int64_t f = align_up(n_tasks * 4, 256);
  return Partials{reinterpret_cast<float*>(p), reinterpret_cast<float*>(p + f),
                  reinterpret_cast<int32_t*>(p + 2 * f), reinterpret_cast<int32_t*>(p + 3 * f),
                  reinterpret_cast<int32_t*>(p + 4 * f)};
}

// Whether a row counts. With an external target logit the index only marks ignored rows and is
// never read; otherwise an out-of-range target (possible only unvalidated) reads nothing and
// comes back as an ignored row.
__device__ inline bool kept(const KernelArgs& a, int64_t t) {
  if (t == a.ignore_index) return false;
  return a.target_logit != nullptr || (t >= 0 && t < a.logits.n_cols);
}

template <typename T>
__device__ inline float target_value(const KernelArgs& a, const T* row, int64_t r, int64_t t) {
  return a.target_logit != nullptr ? a.target_logit[r] : to_float(row[t * a.logits.col_stride]);
}

// Bits of Partials::bad: what a slice holds. The end of a row needs them to follow
// docs/DESIGN.md: logsumexp = NaN if any value is NaN, else +inf if any is +inf, else -inf if
// all are -inf (the last one falls out of the sums: ref + log(0)).
constexpr int32_t kSawNan = 1, kSawPosInf = 2, kSawNegInf = 4;

// The first reference of a thread's sum: the target logit when it lies in the row and is
// finite (then every term is relative to a value of the row, and -inf adds exp(-inf) = 0,
// never inf - inf); otherwise the lowest finite float, which the first value above it
// replaces, so the reference is the running max and a shard far below an external target
// logit does not underflow to a zero sum.
__device__ inline float first_ref(const KernelArgs& a, float target) {
  return a.target_logit == nullptr && fabsf(target) <= 3.402823466e38f ? target : -3.402823466e38f;
}

// A thread's running statistics. hi and lo (the largest and smallest non-NaN values) replace a
// per-element non-finite test; with the first reference finite, the sum turns NaN only for a
// NaN or a second +inf (inf - inf), so the slice's end can tell NaN from +inf (kernel 1).
// The sum of exp(x - ref) is sum + part: fp32 terms go into part, which moves into the double
// sum after each 16-byte vector (flush). A running fp32 sum is biased, not just noisy: after the
// large terms, each tiny one (exp(-18) ~ 1.5e-8 is typical of a vocabulary's bulk) loses its low
// bits or vanishes, always downwards (the CPU kernel's fp32 lanes read logp 2.1e-7 high on
// SmolLM2 that way). A few terms per part bound that loss; one double add per vector is cheap
// even where fp64 runs at 1/64 rate.
struct Acc {
  float ref, part, hi, lo;
  double sum;
  int32_t gt, eq;

  __device__ inline void add(float x, float target) {
    gt += x > target;
    eq += x == target;
    hi = fmaxf(hi, x);  // fmaxf/fminf skip NaN
    lo = fminf(lo, x);
    // One exp either way, outside the branch: exp(-|x - ref|) is the new term when x <= ref and
    // the rescale of the old sum when x > ref. The branch itself is then a few selects, and a
    // warp whose lanes split on it runs no exp twice.
    const float d = x - ref;
    const float e = exp_of(-fabsf(d));
    if (x > ref) {  // NaN never enters here
      sum = (sum + part) * e;
      part = 1.0f;
      ref = x;
    } else {
      part += e;
    }
  }

  __device__ inline void flush() {
    sum += part;
    part = 0.0f;
  }

  // Both flushed (part 0).
  __device__ inline void merge(const Acc& o) {
    const float m = fmaxf(ref, o.ref);
    const float shift = m == -INFINITY ? 0.0f : m;  // all -inf so far: no inf - inf
    sum = sum * exp_of(ref - shift) + o.sum * exp_of(o.ref - shift);
    ref = m;
    hi = fmaxf(hi, o.hi);
    lo = fminf(lo, o.lo);
    gt += o.gt;
    eq += o.eq;
  }
};

__device__ inline Acc shfl_down(const Acc& a, int offset) {
  Acc o;
  o.ref = __shfl_down_sync(0xffffffffu, a.ref, offset);
  o.part = 0.0f;  // merged accumulators are flushed
  o.sum = __shfl_down_sync(0xffffffffu, a.sum, offset);
  o.gt = __shfl_down_sync(0xffffffffu, a.gt, offset);
  o.eq = __shfl_down_sync(0xffffffffu, a.eq, offset);
  o.hi = __shfl_down_sync(0xffffffffu, a.hi, offset);
  o.lo = __shfl_down_sync(0xffffffffu, a.lo, offset);
  return o;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
slice_kernel(const KernelArgs a, int64_t slice_cols, int64_t n_slices, Partials parts) {
  const Logits& z = a.logits;
  const int64_t task = blockIdx.x;
  const int64_t row = task / n_slices, slice = task % n_slices;
  const int64_t t = a.targets[row];
  const bool keep = kept(a, t);
  // One 64-bit division chain per block, to walk up to 8 strided leading dimensions.
  const T* row_ptr = static_cast<const T*>(z.data) + z.row_offset(row);
  const float target = keep ? target_value(a, row_ptr, row, t) : 0.0f;
  const int64_t begin = slice * slice_cols;
  const int64_t end = keep ? min(begin + slice_cols, z.n_cols) : begin;  // ignored: read nothing

  Acc acc{first_ref(a, target), 0.0f, -INFINITY, INFINITY, 0.0, 0, 0};
  // The order of the adds depends on column indices alone, never on addresses or strides, so a
  // strided view gives the bits of its contiguous copy: the slice is cut into groups of kVec
  // columns (begin is a multiple of kVec), thread t takes groups t, t + kThreads, ..., adding a
  // group's kVec terms in column order and then flushing; the columns after the last whole group
  // go one per thread, unflushed. Where the row is contiguous and 16-byte aligned a group is one
  // 16-byte load; elsewhere (a column stride, or rows of an odd length) the same groups are read
  // element by element.
  const int64_t n_vec = (end - begin) / kVec<T>;
  const int64_t tail = begin + n_vec * kVec<T>;
  if (z.col_stride == 1 && reinterpret_cast<uintptr_t>(row_ptr + begin) % 16 == 0) {
    // kUnroll groups are loaded before any is summed, so each thread keeps kUnroll 16-byte
    // loads in flight (one at a time leaves the memory system idle between them at the
    // occupancy these registers allow). Streamed once: evict-first loads.
    const uint4* vec = reinterpret_cast<const uint4*>(row_ptr + begin);
    constexpr int kUnroll = 4;
    for (int64_t i0 = threadIdx.x; i0 < n_vec; i0 += kUnroll * kThreads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u * kThreads;
        if (i < n_vec) raw[u] = __ldcs(vec + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u * kThreads < n_vec) {
          const T* x = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
          for (int j = 0; j < kVec<T>; ++j) acc.add(to_float(x[j]), target);
          acc.flush();  // 4 (fp32) or 8 (16-bit) terms per part
        }
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const int64_t c0 = begin + i * kVec<T>;
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) acc.add(to_float(row_ptr[(c0 + j) * z.col_stride]), target);
      acc.flush();
    }
  }
  for (int64_t c = tail + threadIdx.x; c < end; c += kThreads)
    acc.add(to_float(row_ptr[c * z.col_stride]), target);
  acc.flush();

  // Fixed-order reduction: within each warp, then across warps in warp order.
  for (int offset = 16; offset > 0; offset >>= 1) acc.merge(shfl_down(acc, offset));
  __shared__ Acc warp_acc[kWarps];
  __shared__ int32_t ambiguous;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  Acc total = warp_acc[0];
  int32_t saw = 0;
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) total.merge(warp_acc[w]);
    const bool pos_inf = total.hi == INFINITY, nan_sum = total.sum != total.sum;
    saw = (pos_inf ? kSawPosInf : 0) | (total.lo == -INFINITY ? kSawNegInf : 0) |
          (nan_sum && !pos_inf ? kSawNan : 0);
    // A NaN sum beside a +inf may come from inf - inf alone: only a look at the values tells.
    ambiguous = pos_inf && nan_sum;
  }
  __syncthreads();
  if (ambiguous) {  // rare: a slice with a +inf and a NaN sum; the block looks for a NaN
    int32_t nan_here = 0;
    for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
      const float x = to_float(row_ptr[c * z.col_stride]);
      nan_here |= x != x;
    }
    nan_here = __syncthreads_or(nan_here);
    if (nan_here) saw |= kSawNan;
  }
  if (threadIdx.x == 0) {
    parts.ref[task] = total.ref;
    parts.sum[task] = static_cast<float>(total.sum);  // one rounding per slice: noise, no bias
    parts.gt[task] = total.gt;
    parts.eq[task] = total.eq;
    parts.bad[task] = saw;
  }
}

template <typename T>
__global__ void finish_kernel(const KernelArgs a, int64_t n_slices, Partials parts) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= a.logits.n_rows) return;
  const int64_t t = a.targets[row];
  if (!kept(a, t)) {
    a.rank[row] = -1;
    a.ties[row] = 0;
    a.logp[row] = 0.0f;
    a.nonfinite[row] = 0;
    return;
  }
  const T* row_ptr = static_cast<const T*>(a.logits.data) + a.logits.row_offset(row);
  const float target = target_value(a, row_ptr, row, t);
  Acc acc{-INFINITY, 0.0f, -INFINITY, INFINITY, 0.0, 0, 0};
  int64_t gt = 0, eq = 0;
  int32_t saw = 0;
  // Slice order: never depends on scheduling. Unrolled so that several slices' partials are
  // loaded before they are merged (few rows with a huge vocabulary have up to 128 slices).
#pragma unroll 8
  for (int64_t s = 0; s < n_slices; ++s) {
    const int64_t i = row * n_slices + s;
    acc.merge(Acc{parts.ref[i], 0.0f, -INFINITY, INFINITY, parts.sum[i], 0, 0});
    gt += parts.gt[i];
    eq += parts.eq[i];
    saw |= parts.bad[i];
  }
  // The target never ties with itself; an external target may live on another shard, so there
  // every equal value counts (the caller subtracts the target where it holds it).
  const bool own_target = a.target_logit == nullptr && target == target;
  const int64_t ties = eq - (own_target ? 1 : 0);
  // IEEE from here: a finite target minus +inf is -inf; -inf - -inf and inf - inf are NaN.
  // In double: an fp32 ref + log(sum) and target - lse would each round at the scale of the
  // logits (|ref| ~ 20: steps of 2e-6).
  double lse = acc.ref + log(acc.sum);  // all -inf: sum 0, so -inf
  if (saw & kSawPosInf) lse = INFINITY;
  if (saw & kSawNan) lse = NAN;
  const float logp = static_cast<float>(static_cast<double>(target) - lse);
  a.rank[row] = gt;
  a.ties[row] = ties;
  a.logp[row] = logp;
  a.nonfinite[row] = saw != 0;
  // Only logp gates the add (a -inf logit elsewhere in the row is fine); the caller decides from
  // the flags whether non-finite logits fail the call. Integer atomics: the sums are exact and
  // independent of the order of the adds; lo's carry is moved by the caller afterwards.
  if (a.stats != nullptr && state::accumulable(logp)) {
    const int64_t q = state::quantize(logp), n = a.hist_len, kp = gt + ties;
    atomic_add_i64(a.stats + state::index(state::kCount, n, gt), 1);
    atomic_add_i64(a.stats + state::index(state::kSumHi, n, gt), state::hi_word(q));
    atomic_add_i64(a.stats + state::index(state::kSumLo, n, gt), state::lo_word(q));
    atomic_add_i64(a.stats + state::index(state::kCountPess, n, kp), 1);
    atomic_add_i64(a.stats + state::index(state::kSumHiPess, n, kp), state::hi_word(q));
    atomic_add_i64(a.stats + state::index(state::kSumLoPess, n, kp), state::lo_word(q));
  }
}

}  // namespace

// Enough for every dtype: fp32's slices are the narrowest (a 16-bit dtype starts from twice the
// columns and halves under the same rule), so they give the most (row, slice) tasks.
int64_t token_stats_workspace_bytes(int64_t n_rows, int64_t n_cols) {
  return partials_bytes(n_rows * ceil_div(n_cols, slice_cols(n_rows, n_cols, 4)));
}

const char* token_stats(const KernelArgs& a) {
  const int64_t n_rows = a.logits.n_rows, n_cols = a.logits.n_cols;
  if (n_rows == 0) return "";
  const int64_t cols = slice_cols(n_rows, n_cols, a.logits.dtype == DType::kFloat32 ? 4 : 2);
  const int64_t n_slices = ceil_div(n_cols, cols);
  if (n_rows * n_slices > 0x7fffffffLL) return "too many (row, slice) blocks for one launch";
  if (a.workspace_bytes < partials_bytes(n_rows * n_slices)) return "workspace too small";
  const Partials parts = carve(a.workspace, n_rows * n_slices);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  return dispatch_dtype(a.logits.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    slice_kernel<T><<<static_cast<unsigned>(n_rows * n_slices), kThreads, 0, stream>>>(
        a, cols, n_slices, parts);
    finish_kernel<T><<<static_cast<unsigned>(ceil_div(n_rows, kFinishThreads)), kFinishThreads, 0,
                       stream>>>(a, n_slices, parts);
    return launch_error();
  });
}

}  // namespace cuda
}  // namespace rankops
