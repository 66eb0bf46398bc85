// Fused one-pass CPU kernel: per row, the target's rank (strict), tie count and log-softmax.
//
// This file is compiled once per instruction set (RANKOPS_ISA = baseline, avx2, avx512) with
// the matching -m flags; the loops are written so the compiler vectorises them (checked with
// -fopt-info-vec), which keeps one source for every ISA.
//
// Memory traffic is one read of each logit, in a single fused loop: per element one compare
// against the target for the rank, one for the ties, and one exp. The exponentials are summed
// relative to a reference value that trails the running max (it starts at the target logit and
// moves only when a chunk passes it by a wide margin), so there is no per-element rescaling
// and no second pass over the data.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "kernel_math.h"  // checks RANKOPS_ISA
#include "token_stats.h"

namespace rankops {
namespace cpu {
namespace RANKOPS_ISA {
namespace {

constexpr int64_t kChunk = 2048;           // values per chunk: the rebase granularity
constexpr int64_t kMinParallelWork = 1 << 15;  // below this many logits, threads cost more than they save
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// A row's statistics are Partials (token_stats.h), one per slice of kSliceCols columns, merged
// left to right by merge_into.
inline void merge_into(Partial& a, const Partial& b) {
  const float m = a.ref > b.ref ? a.ref : b.ref;
  if (m != kNegInf) {
    a.sum_exp = a.sum_exp * std::exp(static_cast<double>(a.ref) - m) +
                b.sum_exp * std::exp(static_cast<double>(b.ref) - m);
  }
  a.ref = m;
  a.n_greater += b.n_greater;
  a.n_equal += b.n_equal;
  a.max = a.max > b.max ? a.max : b.max;
  a.nonfinite = a.nonfinite || b.nonfinite;
  a.posinf = a.posinf || b.posinf;
  a.nan = a.nan || b.nan;
}

// While exp(x - ref) <= e^64 no fp32 term or part can overflow (2048 * e^64 ~ 1e31), so the
// reference only moves when a chunk's max passes it by more than this.
constexpr float kRebaseMargin = 64.0f;

struct ChunkStats {
  float max, min;
  double sum_exp;
  int32_t n_greater, n_equal;
};

// Lane-parallel accumulators: element i of a chunk goes to lane i mod kLanes, and the lanes are
// combined in a fixed order at the end. The fixed-width inner loops below vectorise on every
// ISA, and the summation order is set by this code rather than by the vectoriser, so it is the
// same on every ISA. A step loads 64 bytes (16 fp32 or 32 bf16/fp16 values): with 16 lanes of
// a 16-bit type GCC picks 256-bit vectors for the whole loop body and halves AVX-512's width.
//
// The sums are two-level: each lane adds kFlushSteps fp32 terms, then moves them into a double.
// An fp32 lane over a whole chunk is biased, not just noisy: the reference term (1 for the
// target, which usually sits near the top) and the few other large terms land in a lane, and
// every tiny term added after them (exp(-18) ~ 1.5e-8 is typical of a vocabulary's bulk) loses
// its low bits or vanishes below half an ulp, always downwards. On SmolLM2's logits that left
// the sum ~2e-7 low and logp 2.1e-7 high on average. With 8 terms per fp32 lane a large term
// swallows at most 7 others, and the logp bias is 8e-9 (docs/DESIGN.md); a double per element
// (bias ~0) costs ~35% in fp32 (a widening convert and a double add per 8 values), this ~5%.
template <typename T>
struct Lanes {
  static constexpr int kLanes = 64 / sizeof(T);
  float max[kLanes], min[kLanes], part[kLanes];
  double sum[kLanes];
  int32_t gt[kLanes], eq[kLanes];
  Lanes() {
    for (int j = 0; j < kLanes; ++j) {
      max[j] = kNegInf; min[j] = -kNegInf; part[j] = 0.0f; sum[j] = 0.0; gt[j] = 0; eq[j] = 0;
    }
  }
  void flush() {  // part -> sum: exact conversion, one double rounding per kFlushSteps terms
    for (int j = 0; j < kLanes; ++j) { sum[j] += static_cast<double>(part[j]); part[j] = 0.0f; }
  }
};
constexpr int kFlushSteps = 8;  // steps (of kLanes values) per fp32 part, then into the double sum

template <typename T, typename IsBF16, bool kContiguous>
inline void lanes_step(Lanes<T>& L, const T* __restrict src, int64_t stride, int width, float target,
                       float ref) {
  for (int j = 0; j < width; ++j) {
    const float v = load_value(src + (kContiguous ? j : j * stride), IsBF16{});
    L.max[j] = v > L.max[j] ? v : L.max[j];
    L.min[j] = v < L.min[j] ? v : L.min[j];
    L.gt[j] += v > target;
    L.eq[j] += v == target;
    L.part[j] += exp_bounded(v - ref);
  }
}

// The fused pass: every statistic of a chunk from one load of each value. The stride is a
// template parameter so the contiguous case is a plain vector load rather than a gather.
// min and max expose -inf and +inf; a NaN makes sum_exp NaN, or (if the chunk is all NaN)
// leaves max < min, since comparisons skip NaN.
template <typename T, typename IsBF16, bool kContiguous>
inline ChunkStats chunk_stats(const T* __restrict src, int64_t stride, int64_t n, float target,
                              float ref) {
  Lanes<T> L;
  constexpr int kLanes = Lanes<T>::kLanes;
  int64_t i = 0;
  for (; i + kFlushSteps * kLanes <= n;) {
    for (int k = 0; k < kFlushSteps; ++k, i += kLanes)
      lanes_step<T, IsBF16, kContiguous>(L, src + i * stride, stride, kLanes, target, ref);
    L.flush();
  }
  for (; i + kLanes <= n; i += kLanes)
    lanes_step<T, IsBF16, kContiguous>(L, src + i * stride, stride, kLanes, target, ref);
  if (i < n)
    lanes_step<T, IsBF16, kContiguous>(L, src + i * stride, stride, static_cast<int>(n - i), target, ref);
  L.flush();
  ChunkStats c{kNegInf, -kNegInf, 0.0, 0, 0};
  for (int j = 0; j < kLanes; ++j) {
    c.max = L.max[j] > c.max ? L.max[j] : c.max;
    c.min = L.min[j] < c.min ? L.min[j] : c.min;
    c.sum_exp += L.sum[j];
    c.n_greater += L.gt[j];
    c.n_equal += L.eq[j];
  }
  return c;
}

// A chunk's sum again after the reference moved (rare): a double sum per lane, unbiased.
template <typename T, typename IsBF16, bool kContiguous>
inline double chunk_sum_exp(const T* __restrict src, int64_t stride, int64_t n, float ref) {
  constexpr int kLanes = Lanes<T>::kLanes;
  double lanes[kLanes] = {0.0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j)
      lanes[j] += static_cast<double>(
          exp_bounded(load_value(src + (i + j) * (kContiguous ? 1 : stride), IsBF16{}) - ref));
  for (int j = 0; i + j < n; ++j)
    lanes[j] += static_cast<double>(
        exp_bounded(load_value(src + (i + j) * (kContiguous ? 1 : stride), IsBF16{}) - ref));
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
}

template <typename T, typename IsBF16, bool kContiguous>
Partial slice_stats(const T* row, int64_t col_stride, int64_t begin, int64_t end, float target) {
  Partial acc;
  // The target logit is known before the stream starts and is usually near the top of its
  // row, so it is a good first reference.
  acc.ref = std::isfinite(target) ? target : 0.0f;
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = end - c0 < kChunk ? end - c0 : kChunk;
    const T* src = row + c0 * col_stride;
    ChunkStats c = chunk_stats<T, IsBF16, kContiguous>(src, col_stride, n, target, acc.ref);
    acc.n_greater += c.n_greater;
    acc.n_equal += c.n_equal;
    acc.nonfinite = acc.nonfinite || c.max == -kNegInf || c.min == kNegInf || c.max < c.min;
    acc.max = c.max > acc.max ? c.max : acc.max;
    acc.posinf = acc.posinf || c.max == kPosInf;
    acc.nan = acc.nan || c.max < c.min;  // a chunk of NaN only
    if (c.max > acc.ref + kRebaseMargin) {
      // Rare: move the reference up to this chunk's max and redo its sum (the chunk is in L1).
      acc.sum_exp *= std::exp(static_cast<double>(acc.ref) - c.max);
      acc.ref = c.max;
      c.sum_exp = chunk_sum_exp<T, IsBF16, kContiguous>(src, col_stride, n, acc.ref);
    }
    // Without a +inf in the chunk, exp of a finite or -inf value relative to a finite or +inf
    // reference is finite: only a NaN makes the sum NaN.
    const bool nan_sum = c.sum_exp != c.sum_exp;
    acc.nonfinite = acc.nonfinite || nan_sum;
    acc.nan = acc.nan || (nan_sum && c.max != kPosInf);
    acc.sum_exp += c.sum_exp;
  }
  return acc;
}

template <typename T, typename IsBF16>
Partial slice_stats(const T* row, int64_t col_stride, int64_t begin, int64_t end, float target) {
  return col_stride == 1 ? slice_stats<T, IsBF16, true>(row, 1, begin, end, target)
                         : slice_stats<T, IsBF16, false>(row, col_stride, begin, end, target);
}

// The rare ends of a row, outside the streaming loop: whether a row holds a NaN (asked only
// when it holds a +inf too), and its sum of exp(z - ref) again (asked only when every value lies
// so far below the reference that exp_bounded's clamp would have counted them wrong).
template <typename T, typename IsBF16>
bool row_has_nan(const T* row, int64_t col_stride, int64_t n_cols) {
  for (int64_t c = 0; c < n_cols; ++c) {
    const float v = load_value(row + c * col_stride, IsBF16{});
    if (v != v) return true;
  }
  return false;
}
template <typename T, typename IsBF16>
double row_sum_exp(const T* row, int64_t col_stride, int64_t n_cols, float ref) {
  double sum = 0.0;
  for (int64_t c = 0; c < n_cols; ++c)
    sum += exp_bounded(load_value(row + c * col_stride, IsBF16{}) - ref);
  return sum;
}

// logsumexp of a row from its merged Partial. docs/DESIGN.md: NaN if any is NaN, else +inf if
// any is +inf, else -inf if all are -inf; the streaming sums cannot tell these apart, so the
// flags do, for rows that hold a non-finite value (finite rows pay one test per row). What only
// the row itself can tell comes from the callbacks: whether it holds a NaN (asked only when it
// holds a +inf too), and its sum of exp(z - m) relative to its maximum m.
template <typename HasNan, typename SumExp>
double lse_of(const Partial& p, HasNan has_nan, SumExp sum_exp_below) {
  if (p.nonfinite) {
    if (p.nan || (p.posinf && has_nan()))
      return std::numeric_limits<double>::quiet_NaN();
    if (p.posinf) return std::numeric_limits<double>::infinity();
    if (p.max == kNegInf) return -std::numeric_limits<double>::infinity();
  }
  // An external target logit far above the whole row: the reference never came down to the
  // row's values, so sum them again relative to their own maximum.
  if (p.max < p.ref - kRebaseMargin)
    return static_cast<double>(p.max) + std::log(sum_exp_below(p.max));
  return static_cast<double>(p.ref) + std::log(p.sum_exp);
}

template <typename T, typename IsBF16>
double row_lse(const Logits& z, const T* row, const Partial& p) {
  return lse_of(p, [&] { return row_has_nan<T, IsBF16>(row, z.col_stride, z.n_cols); },
                [&](float m) { return row_sum_exp<T, IsBF16>(row, z.col_stride, z.n_cols, m); });
}

template <typename T, typename IsBF16>
inline void write_row(const KernelArgs& a, int64_t r, const T* row, float target, const Partial& p) {
  a.rank[r] = p.n_greater;
  // The target never ties with itself; an external target logit may live on another shard, so
  // there every equal value counts (the caller subtracts the target where it holds it).
  const bool own_target = a.target_logit == nullptr && target == target;
  a.ties[r] = p.n_equal - (own_target ? 1 : 0);
  // logp = z_t - logsumexp, in double with IEEE semantics: inf - inf and -inf - -inf are NaN.
  a.logp[r] = static_cast<float>(static_cast<double>(target) - row_lse<T, IsBF16>(a.logits, row, p));
}

// A row is always computed as the same fixed slices of kSliceCols columns, merged left to
// right, whether the slices run on one thread or on several: the result is then bit-identical
// for every thread count.
template <typename T, typename IsBF16>
Partial row_stats(const Logits& z, const T* row, float target, const Partial* done,
                  int64_t n_slices) {
  Partial p;
  for (int64_t s = 0; s < n_slices; ++s) {
    const int64_t begin = s * kSliceCols;
    const int64_t end = begin + kSliceCols < z.n_cols ? begin + kSliceCols : z.n_cols;
    const Partial q = done ? done[s] : slice_stats<T, IsBF16>(row, z.col_stride, begin, end, target);
    if (s == 0) p = q; else merge_into(p, q);
  }
  return p;
}

// The target's logit: read from its row, or given (external target-logit mode, where the
// target index is never read). A float32 target logit is exact for every logit dtype.
template <typename T, typename IsBF16>
inline float target_value(const KernelArgs& a, const T* row, int64_t r) {
  if (a.target_logit != nullptr) return a.target_logit[r];
  return load_value(row + a.targets[r] * a.logits.col_stride, IsBF16{});
}

template <typename T, typename IsBF16>
Status run(const KernelArgs& a) {
  const Logits& z = a.logits;
  const T* base = static_cast<const T*>(z.data);
  Status status;
  // The targets are in range: the dispatcher (dispatch.cpp) checked them before calling.
  const int n_threads = z.n_rows * z.n_cols < kMinParallelWork ? 1 : a.n_threads;
  const int64_t n_slices = (z.n_cols + kSliceCols - 1) / kSliceCols;
  // Few rows: hand out (row, slice) pairs instead of rows, so a single row still uses every
  // thread; the per-slice partials are merged afterwards in the same order.
  const bool by_slice = z.n_rows < 2 * static_cast<int64_t>(n_threads) && n_slices > 1;
  std::vector<Partial> parts(by_slice ? static_cast<size_t>(z.n_rows * n_slices) : 0);
  if (by_slice) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t task = 0; task < z.n_rows * n_slices; ++task) {
      const int64_t r = task / n_slices, s = task % n_slices;
      if (a.targets[r] == a.ignore_index) continue;
      const T* row = base + z.row_offset(r);
      const int64_t begin = s * kSliceCols;
      const int64_t end = begin + kSliceCols < z.n_cols ? begin + kSliceCols : z.n_cols;
      parts[task] = slice_stats<T, IsBF16>(row, z.col_stride, begin, end,
                                           target_value<T, IsBF16>(a, row, r));
    }
  }
  int64_t first_nonfinite = std::numeric_limits<int64_t>::max();
#pragma omp parallel for schedule(static) num_threads(by_slice ? 1 : n_threads) \
    reduction(min : first_nonfinite)
  for (int64_t r = 0; r < z.n_rows; ++r) {
    if (a.targets[r] == a.ignore_index) {
      a.rank[r] = -1;
      a.ties[r] = 0;
      a.logp[r] = 0.0f;
      continue;
    }
    const T* row = base + z.row_offset(r);
    const float target = target_value<T, IsBF16>(a, row, r);
    const Partial p = row_stats<T, IsBF16>(z, row, target, by_slice ? &parts[r * n_slices] : nullptr,
                                           n_slices);
    write_row<T, IsBF16>(a, r, row, target, p);
    if (p.nonfinite && r < first_nonfinite) first_nonfinite = r;
  }
  if (first_nonfinite != std::numeric_limits<int64_t>::max()) status.nonfinite_row = first_nonfinite;
  return status;
}

// The fused output layer's steps (token_stats.h): the slices of one block of columns, each
// computed exactly as run() computes it.
template <typename T, typename IsBF16>
void block_partials_of(const KernelArgs& a, Partial* slices) {
  const Logits& z = a.logits;
  const T* base = static_cast<const T*>(z.data);
  const int n_threads = z.n_rows * z.n_cols < kMinParallelWork ? 1 : a.n_threads;
  const int64_t n_slices = (z.n_cols + kSliceCols - 1) / kSliceCols;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t task = 0; task < z.n_rows * n_slices; ++task) {
    const int64_t r = task / n_slices, s = task % n_slices;
    const T* row = base + z.row_offset(r);
    const int64_t begin = s * kSliceCols;
    const int64_t end = begin + kSliceCols < z.n_cols ? begin + kSliceCols : z.n_cols;
    Partial q = slice_stats<T, IsBF16>(row, z.col_stride, begin, end, a.target_logit[r]);
    // The row is gone by the time it is finished, so its NaN test (run() asks it only of rows
    // holding a +inf) is answered here, per slice, where the values still are.
    if (q.posinf && !q.nan)
      q.nan = row_has_nan<T, IsBF16>(row + begin * z.col_stride, z.col_stride, end - begin);
    slices[task] = q;
  }
}

}  // namespace

void block_partials(const KernelArgs& a, Partial* slices) {
  switch (a.logits.dtype) {
    case DType::kFloat32: return block_partials_of<float, std::false_type>(a, slices);
    case DType::kBFloat16: return block_partials_of<uint16_t, std::true_type>(a, slices);
    case DType::kFloat16: return block_partials_of<uint16_t, std::false_type>(a, slices);
  }
}

void fold_partials(Partial* running, const Partial* slices, int64_t n_rows, int64_t n_slices,
                   bool started, int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_rows * n_slices < 4096 ? 1 : n_threads)
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t s = 0; s < n_slices; ++s) {
      const Partial& q = slices[r * n_slices + s];
      if (s == 0 && !started) running[r] = q; else merge_into(running[r], q);  // as row_stats
    }
  }
}

int64_t finish_partials(const Partial* running, const float* target_logit, int64_t n_rows,
                        int64_t* rank, int64_t* ties, float* logp, int n_threads) {
  int64_t first_nonfinite = std::numeric_limits<int64_t>::max();
#pragma omp parallel for schedule(static) num_threads(n_rows < 4096 ? 1 : n_threads) \
    reduction(min : first_nonfinite)
  for (int64_t r = 0; r < n_rows; ++r) {
    const Partial& p = running[r];
    const float target = target_logit[r];
    rank[r] = p.n_greater;
    ties[r] = p.n_equal - (target == target ? 1 : 0);  // the target lies in its row: not its own tie
    // The nan flags are exact (block_partials). The rescan of a row far below its reference is
    // reached only with a -inf target (a finite target lies in its row, so the row's max is at
    // least the target, the first reference, and every later one), where logp is -inf for any
    // finite logsumexp: the merged sum stands in for it.
    const double lse = lse_of(p, [] { return false; }, [&](float m) {
      return p.sum_exp * std::exp(static_cast<double>(p.ref) - m); });
    logp[r] = static_cast<float>(static_cast<double>(target) - lse);
    if (p.nonfinite && r < first_nonfinite) first_nonfinite = r;
  }
  return first_nonfinite == std::numeric_limits<int64_t>::max() ? -1 : first_nonfinite;
}

Status token_stats(const KernelArgs& a) {
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
