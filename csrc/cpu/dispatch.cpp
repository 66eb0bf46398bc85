// Picks the widest compiled instruction set the running CPU supports, and builds the per-rank
// accumulation on top of the per-token kernel.
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "token_stats.h"

namespace rankops {
namespace cpu {
namespace {

struct IsaEntry {
  const char* name;
  Status (*token_stats)(const TokenStatsArgs&);
  Status (*softmax_grad)(const SoftmaxGradArgs&);
};

// Widest first.
const IsaEntry kIsas[] = {
#if defined(RANKOPS_HAVE_AVX512)
    {"avx512", &avx512::token_stats, &avx512::softmax_grad},
#endif
#if defined(RANKOPS_HAVE_AVX2)
    {"avx2", &avx2::token_stats, &avx2::softmax_grad},
#endif
    {"baseline", &baseline::token_stats, &baseline::softmax_grad},
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

bool cpu_has(const char* name) {
  if (std::strcmp(name, "baseline") == 0) return true;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (std::strcmp(name, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (std::strcmp(name, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

int widest_supported() {
  for (int i = 0; i < kNumIsas; ++i)
    if (cpu_has(kIsas[i].name)) return i;
  return kNumIsas - 1;
}

std::atomic<int> g_active{widest_supported()};

}  // namespace

const char* active_isa() { return kIsas[g_active.load()].name; }

const char* const* compiled_isas(int* count) {
  static const char* names[kNumIsas];
  for (int i = 0; i < kNumIsas; ++i) names[i] = kIsas[i].name;
  *count = kNumIsas;
  return names;
}

bool isa_supported(const char* name) {
  for (int i = 0; i < kNumIsas; ++i)
    if (std::strcmp(kIsas[i].name, name) == 0) return cpu_has(name);
  return false;
}

bool set_isa(const char* name) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0) {
    g_active.store(widest_supported());
    return true;
  }
  for (int i = 0; i < kNumIsas; ++i) {
    if (std::strcmp(kIsas[i].name, name) == 0 && cpu_has(name)) {
      g_active.store(i);
      return true;
    }
  }
  return false;
}

namespace {
// The first row whose target is neither ignore_index nor in [0, n_cols), or -1. Every kernel
// runs only after this O(N) check, so none reads outside a row.
int64_t first_bad_target(const TokenStatsArgs& a) {
  for (int64_t r = 0; r < a.n_rows; ++r) {
    const int64_t t = a.targets[r];
    if (t != a.ignore_index && (t < 0 || t >= a.n_cols)) return r;
  }
  return -1;
}
}  // namespace

Status token_stats(const TokenStatsArgs& args) {
  Status s;
  s.bad_target_row = first_bad_target(args);
  return s.bad_target_row >= 0 ? s : kIsas[g_active.load()].token_stats(args);
}

Status softmax_grad(const SoftmaxGradArgs& args) {
  Status s;
  s.bad_target_row = first_bad_target(args.in);
  return s.bad_target_row >= 0 ? s : kIsas[g_active.load()].softmax_grad(args);
}

namespace {
inline void add_fixed(int64_t* hi, int64_t* lo, int64_t q) {
  *hi += q >> 32;  // arithmetic shift: floor(q / 2^32)
  *lo += q & 0xffffffffLL;
  *hi += *lo >> 32;  // carry, so lo stays in [0, 2^32)
  *lo &= 0xffffffffLL;
}
}  // namespace

AccumulateResult accumulate(const TokenStatsArgs& args, const Histograms& hist, bool check_finite) {
  // Per-token results are O(N) next to the O(N*V) logits; keeping them lets the histograms be
  // updated after the parallel pass, and nothing is added when the call fails part-way.
  std::vector<int64_t> rank(static_cast<size_t>(args.n_rows));
  std::vector<int64_t> ties(static_cast<size_t>(args.n_rows));
  std::vector<float> logp(static_cast<size_t>(args.n_rows));
  TokenStatsArgs a = args;
  a.rank = rank.data();
  a.ties = ties.data();
  a.logp = logp.data();
  AccumulateResult result;
  result.status = token_stats(a);
  if (result.status.bad_target_row >= 0 || (check_finite && result.status.nonfinite_row >= 0))
    return result;
  std::vector<int64_t> fixed(static_cast<size_t>(args.n_rows));
  for (int64_t i = 0; i < args.n_rows; ++i) {
    if (rank[i] < 0) continue;  // ignored
    const double lp = static_cast<double>(logp[i]);
    if (!(std::fabs(lp) < kLogpLimit)) {  // also catches NaN
      result.bad_logp_row = i;
      return result;
    }
    fixed[i] = static_cast<int64_t>(std::floor(lp * kLogpScale + 0.5));
  }
  const int64_t n = hist.hist_len;
  int64_t* s = hist.stats;
  for (int64_t i = 0; i < args.n_rows; ++i) {
    const int64_t k = rank[i];
    if (k < 0) continue;
    const int64_t kp = k + ties[i];
    s[kCount * n + k] += 1;
    add_fixed(&s[kSumHi * n + k], &s[kSumLo * n + k], fixed[i]);
    s[kCountPess * n + kp] += 1;
    add_fixed(&s[kSumHiPess * n + kp], &s[kSumLoPess * n + kp], fixed[i]);
    result.n_kept += 1;
    result.n_tied += ties[i] > 0;
  }
  return result;
}

}  // namespace cpu
}  // namespace rankops
