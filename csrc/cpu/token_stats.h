// Declarations of the CPU kernels (token_stats, accumulate, softmax_grad) and their dispatch.
// Every kernel takes the common argument struct (csrc/common/kernel_args.h).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../common/kernel_args.h"

namespace rankops {

struct Status {
  int64_t nonfinite_row = -1;  // first kept row holding NaN or +-inf, or -1
  int64_t bad_target_row = -1; // first row whose target is outside [0, n_cols) and not ignored
};

namespace cpu {
// One definition per instruction set, from csrc/cpu/token_stats_kernel.cpp and
// csrc/cpu/softmax_grad_kernel.cpp. They assume targets in range: call the dispatchers below,
// which check them first.
#define RANKOPS_DECLARE_ISA(isa) \
  namespace isa { Status token_stats(const KernelArgs& args); \
                  Status softmax_grad(const KernelArgs& args); }
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
