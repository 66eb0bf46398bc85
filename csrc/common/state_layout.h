// The accumulator's state, as every C++ and CUDA kernel writes it: the one place in C++ that
// spells its rows, its fixed-point scale and its limit (the Python owner is the accumulate op,
// which hands the same numbers to the Triton kernels).
//
// The state is an int64 tensor [kNumRows, hist_len], contiguous. Per rank bin k it holds the
// number of tokens and the exact sum of their logp, once by strict rank and once by pessimistic
// rank (rank + ties). A logp is quantised to q = floor(logp * 2^40 + 1/2) (exact for fp32 values
// of magnitude >= 2^-16) and added as two words, hi = q >> 32 and lo = q & (2^32 - 1); lo's carry
// is moved into hi, so a normalised state has lo in [0, 2^32). Integer addition is associative:
// sums do not depend on the order of tokens, threads, blocks, batches or processes.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace rankops {
namespace state {

enum Row : int {
  kCount = 0, kSumHi = 1, kSumLo = 2,              // by strict rank
  kCountPess = 3, kSumHiPess = 4, kSumLoPess = 5,  // by pessimistic rank (rank + ties)
};
constexpr int kNumRows = 6;

constexpr double kLogpScale = 1099511627776.0;  // 2^40: the fixed point's fractional bits
// 2^23: then |q| <= 2^63 and q fits an int64 (|logp| of 2^23 nats is far beyond any real model).
constexpr double kLogpLimit = 8388608.0;
constexpr int kLoBits = 32;
constexpr int64_t kLoMask = (int64_t{1} << kLoBits) - 1;

// Whether a token's logp can be accumulated; false for NaN (every comparison with NaN is).
RANKOPS_HOST_DEVICE inline bool accumulable(float logp) {
  return fabs(static_cast<double>(logp)) < kLogpLimit;
}

// Round half up, in double: the product is exact (a power-of-two scale), so is the floor.
RANKOPS_HOST_DEVICE inline int64_t quantize(float logp) {
  return static_cast<int64_t>(floor(static_cast<double>(logp) * kLogpScale + 0.5));
}

// Arithmetic shift: hi = floor(q / 2^32), so hi * 2^32 + lo == q for negative q too.
RANKOPS_HOST_DEVICE inline int64_t hi_word(int64_t q) { return q >> kLoBits; }
RANKOPS_HOST_DEVICE inline int64_t lo_word(int64_t q) { return q & kLoMask; }

// Element index of bin k of a row in the state tensor.
RANKOPS_HOST_DEVICE inline int64_t index(Row row, int64_t hist_len, int64_t k) {
  return static_cast<int64_t>(row) * hist_len + k;
}

// Moves lo's carry (or borrow) into hi, leaving lo in [0, 2^32) and hi * 2^32 + lo unchanged.
RANKOPS_HOST_DEVICE inline void normalize_carry(int64_t& hi, int64_t& lo) {
  hi += lo >> kLoBits;
  lo &= kLoMask;
}

// Adds q to the pair (hi, lo) and normalises it. Not atomic: the GPU kernels add hi_word and
// lo_word with separate integer atomics instead and leave the carry to the caller.
RANKOPS_HOST_DEVICE inline void add_fixed(int64_t& hi, int64_t& lo, int64_t q) {
  hi += hi_word(q);
  lo += lo_word(q);
  normalize_carry(hi, lo);
}

}  // namespace state
}  // namespace rankops
