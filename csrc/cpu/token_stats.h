// Shared declarations of the CPU token-statistics kernel.
//
// Tensors cross the extension boundary as raw pointers, sizes and strides (in elements), so
// the module links no libtorch and one build serves every torch version.
#pragma once
#include <cstdint>

namespace rankops {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kMaxLeadDims = 8;

struct TokenStatsArgs {
  const void* logits = nullptr;  // [*lead, n_cols_total]; only the first n_cols columns are read
  DType dtype = DType::kFloat32;
  int n_lead = 1;                // number of leading (row) dimensions
  int64_t lead_sizes[kMaxLeadDims] = {0};
  int64_t lead_strides[kMaxLeadDims] = {0};  // elements
  int64_t n_rows = 0;            // product of lead_sizes
  int64_t n_cols = 0;            // columns that count (vocab_size truncation applied)
  int64_t col_stride = 1;        // elements
  const int64_t* targets = nullptr;  // [n_rows], contiguous
  int64_t ignore_index = -100;
  int64_t* rank = nullptr;       // [n_rows] out: #{v : z_v > z_t}, -1 where ignored
  int64_t* ties = nullptr;       // [n_rows] out: #{v != t : z_v == z_t}, 0 where ignored
  float* logp = nullptr;         // [n_rows] out: z_t - logsumexp(z), 0 where ignored
  int n_threads = 1;
};

struct Status {
  int64_t nonfinite_row = -1;  // first kept row holding NaN or +-inf, or -1
  int64_t bad_target_row = -1; // first row whose target is outside [0, n_cols) and not ignored
};

// The weighted cross-entropy gradient (csrc/cpu/softmax_grad_kernel.cpp):
//   grad[r, v] = scale[r] * (exp(z[r, v] - lse[r]) - [v == t_r])  for v < n_cols,
//   0 for n_cols <= v < grad_row_len and for rows whose target is ignore_index.
// The logits' geometry, targets and ignore_index come from `in`; its rank/ties/logp are unused.
struct SoftmaxGradArgs {
  TokenStatsArgs in;
  const float* lse = nullptr;    // [n_rows] logsumexp of each row's first n_cols logits
  const float* scale = nullptr;  // [n_rows]
  void* grad = nullptr;          // [n_rows, grad_row_len], contiguous, the logits' dtype
  int64_t grad_row_len = 0;      // >= n_cols: the logits' full last dimension
};

namespace cpu {
// One definition per instruction set, from csrc/cpu/token_stats_kernel.cpp and
// csrc/cpu/softmax_grad_kernel.cpp. They assume targets in range: call the dispatchers below,
// which check them first.
#define RANKOPS_DECLARE_ISA(isa) \
  namespace isa { Status token_stats(const TokenStatsArgs& args); \
                  Status softmax_grad(const SoftmaxGradArgs& args); }
RANKOPS_DECLARE_ISA(baseline)
RANKOPS_DECLARE_ISA(avx2)
RANKOPS_DECLARE_ISA(avx512)
#undef RANKOPS_DECLARE_ISA

// Runtime dispatch (csrc/cpu/dispatch.cpp).
const char* active_isa();
const char* const* compiled_isas(int* count);
bool isa_supported(const char* name);
bool set_isa(const char* name);  // "" or "auto" selects the widest supported

// Check the targets (Status::bad_target_row), then run the active instruction set's kernel.
Status token_stats(const TokenStatsArgs& args);
Status softmax_grad(const SoftmaxGradArgs& args);

// Exact fixed-point sums of logp: each token's logp is quantised to q = floor(logp * 2^40 + 1/2)
// (exact for fp32 values of magnitude >= 2^-16) and added as two int64 words, hi = q >> 32 and
// lo = q & (2^32 - 1), with lo's carry moved into hi. Integer addition is associative, so the
// sums do not depend on the order of tokens, threads, batches or processes.
constexpr double kLogpScale = 1099511627776.0;  // 2^40
constexpr double kLogpLimit = 8388608.0;        // 2^23: |logp| * 2^40 must fit an int64

// The accumulator's state: six int64 rows of hist_len bins, in this order.
enum StatRow : int {
  kCount = 0, kSumHi = 1, kSumLo = 2,        // by strict rank
  kCountPess = 3, kSumHiPess = 4, kSumLoPess = 5,  // by pessimistic rank (rank + ties)
  kNumStatRows = 6
};

struct Histograms {
  int64_t* stats = nullptr;  // [kNumStatRows, hist_len], contiguous
  int64_t hist_len = 0;
};

struct AccumulateResult {
  Status status;
  int64_t bad_logp_row = -1;  // first kept row whose logp is non-finite or beyond 2^23
  int64_t n_kept = 0;   // tokens added
  int64_t n_tied = 0;   // of which had at least one tie with the target
};

// Per-rank accumulation. The histograms are touched only when the whole call succeeds. With
// check_finite, a row with a non-finite logit fails the call; without, only a non-finite logp
// does (a -inf logit elsewhere in the row is fine).
AccumulateResult accumulate(const TokenStatsArgs& args, const Histograms& hist, bool check_finite);
}  // namespace cpu
}  // namespace rankops
