// Picks the widest compiled instruction set the running CPU supports, and builds the per-rank
// accumulation on top of the per-token kernel.
#include <atomic>
#include <cstring>
#include <vector>

#include "token_stats.h"

namespace rankops {
namespace cpu {
namespace {

using KernelFn = Status (*)(const TokenStatsArgs&);

struct IsaEntry {
  const char* name;
  KernelFn fn;
};

// Widest first.
const IsaEntry kIsas[] = {
#if defined(RANKOPS_HAVE_AVX512)
    {"avx512", &avx512::token_stats},
#endif
#if defined(RANKOPS_HAVE_AVX2)
    {"avx2", &avx2::token_stats},
#endif
    {"baseline", &baseline::token_stats},
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

Status token_stats(const TokenStatsArgs& args) { return kIsas[g_active.load()].fn(args); }

AccumulateResult accumulate(const TokenStatsArgs& args, const Histograms& hist) {
  // Per-token results are O(N) next to the O(N*V) logits; keeping them lets the histograms be
  // updated serially in token order after the parallel pass, so the float64 sums are
  // bit-identical run after run and independent of the thread count, and nothing is added
  // when the call fails part-way.
  std::vector<int64_t> rank(static_cast<size_t>(args.n_rows));
  std::vector<int64_t> ties(static_cast<size_t>(args.n_rows));
  std::vector<float> logp(static_cast<size_t>(args.n_rows));
  TokenStatsArgs a = args;
  a.rank = rank.data();
  a.ties = ties.data();
  a.logp = logp.data();
  AccumulateResult result;
  result.status = token_stats(a);
  if (result.status.bad_target_row >= 0 || result.status.nonfinite_row >= 0) return result;
  for (int64_t i = 0; i < args.n_rows; ++i) {
    const int64_t k = rank[i];
    if (k < 0) continue;  // ignored
    const int64_t kp = k + ties[i];
    const double lp = static_cast<double>(logp[i]);
    hist.count[k] += 1;
    hist.sum_logp[k] += lp;
    hist.count_pess[kp] += 1;
    hist.sum_logp_pess[kp] += lp;
    result.n_kept += 1;
    result.n_tied += ties[i] > 0;
  }
  return result;
}

}  // namespace cpu
}  // namespace rankops
