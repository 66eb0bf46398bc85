// Declarations of the CPU kernels (token_stats, accumulate, softmax_grad) and their dispatch.
// Every kernel takes the common argument struct (csrc/common/kernel_args.h).
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../common/kernel_args.h"

namespace rankops {

struct Status {
  int64_t nonfinite_row = -1;  // first kept row holding NaN or +-inf, or -1
  int64_t bad_target_row = -1; // first row whose target is outside [0, n_cols) and not ignored
};

namespace cpu {

// Statistics of one slice of a row, as the token_stats kernel computes them. sum_exp is relative
// to ref: the slice's logsumexp is ref + log(sum_exp). Slices merge associatively (log-add-exp
// for the sums, integer addition for the counts), always in slice order.
// The flags only matter at the end of a row that holds a non-finite value (nonfinite): max is
// the largest non-NaN value; posinf says a +inf was seen; nan says a NaN was seen (certain only
// for chunks without a +inf, where a NaN sum can have no other cause).
// Plain data, the same on every instruction set: the fused output layer keeps arrays of them
// between blocks (block_partials below).
struct Partial {
  float ref = -std::numeric_limits<float>::infinity();
  double sum_exp = 0.0;
  int64_t n_greater = 0;
  int64_t n_equal = 0;   // includes the target itself
  float max = -std::numeric_limits<float>::infinity();
  bool nonfinite = false;
  bool posinf = false;
  bool nan = false;
};

// The fused output layer (rankops/ops/linear_token_stats.py) computes a row's logits block by
// block and never holds the whole row; these three steps are the token_stats kernel's own row
// arithmetic cut at slice boundaries, so a row folded from its blocks gets bit for bit what
// token_stats gives on the whole row (blocks start at multiples of kSliceCols).
//  - block_partials: args.logits is one block [n_rows, n_cols] of columns, args.target_logit
//    each row's target logit (float32); writes each slice's Partial to slices[n_rows, n_slices]
//    (n_slices = ceil(n_cols / kSliceCols)). A slice's nan flag is made exact (rescanned when
//    the slice holds a +inf), since the row cannot be rescanned at the end.
//  - fold_partials: merges slices[n_rows, n_slices] into running[n_rows] in slice order;
//    started = false makes the first slice the running value, as the kernel does.
//  - finish_partials: rank, ties (less the target itself) and logp from running and the
//    target logits; returns the first row holding a non-finite value, or -1.
constexpr int64_t kSliceCols = 16384;  // a row is computed as slices of this many columns

#define RANKOPS_DECLARE_BLOCK_OPS \
  void block_partials(const KernelArgs& args, Partial* slices); \
  void fold_partials(Partial* running, const Partial* slices, int64_t n_rows, int64_t n_slices, \
                     bool started, int n_threads); \
  int64_t finish_partials(const Partial* running, const float* target_logit, int64_t n_rows, \
                          int64_t* rank, int64_t* ties, float* logp, int n_threads);

// One definition per instruction set, from csrc/cpu/token_stats_kernel.cpp and
// csrc/cpu/softmax_grad_kernel.cpp. They assume targets in range: call the dispatchers below,
// which check them first.
#define RANKOPS_DECLARE_ISA(isa) \
  namespace isa { Status token_stats(const KernelArgs& args); \
                  Status softmax_grad(const KernelArgs& args); \
                  RANKOPS_DECLARE_BLOCK_OPS }
RANKOPS_DECLARE_ISA(baseline)
RANKOPS_DECLARE_ISA(avx2)
RANKOPS_DECLARE_ISA(avx512)
#undef RANKOPS_DECLARE_ISA

// Runtime dispatch (csrc/cpu/dispatch.cpp).
const char* active_isa();
std::vector<std::string> compiled_isas();  // widest first
bool isa_supported(const char* name);
bool set_isa(const char* name);  // "" or "auto" selects the widest supported

// Check the targets (Status::bad_target_row; not in external target-logit mode, which reads no
// target index), then run the active instruction set's kernel.
// token_stats fills rank/ties/logp; softmax_grad fills grad (every row of it).
Status token_stats(const KernelArgs& args);
Status softmax_grad(const KernelArgs& args);
// The block steps above, on the active instruction set (the merge's rounding is the kernel's).
RANKOPS_DECLARE_BLOCK_OPS
#undef RANKOPS_DECLARE_BLOCK_OPS

struct AccumulateResult {
  Status status;
  int64_t bad_logp_row = -1;  // first kept row whose logp is not state::accumulable
  int64_t n_tied = 0;         // added tokens with at least one tie
  int64_t n_skipped = 0;      // kept tokens left out (leave_out only)
};

// Per-rank accumulation into args.stats (csrc/common/state_layout.h), no external target logit.
// All or nothing by default: nothing is added when a target is out of range, when check_finite
// finds a kept row with a non-finite logit, or when a kept token's logp cannot be accumulated.
// With leave_out (which needs check_finite off), every kept token whose logp can be accumulated
// is added and the others are skipped and counted. Touched states come back carry-normalised.
AccumulateResult accumulate(const KernelArgs& args, bool check_finite, bool leave_out);
}  // namespace cpu
}  // namespace rankops
