// Picks the widest compiled instruction set the running CPU supports, and builds the per-rank
// accumulation on top of the per-token kernel.
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/state_layout.h"
#include "token_stats.h"

namespace rankops {
namespace cpu {
namespace {

struct IsaEntry {
  const char* name;
  Status (*token_stats)(const KernelArgs&);
  Status (*softmax_grad)(const KernelArgs&);
  void (*block_partials)(const KernelArgs&, Partial*);
  void (*fold_partials)(Partial*, const Partial*, int64_t, int64_t, bool, int);
  int64_t (*finish_partials)(const Partial*, const float*, int64_t, int64_t*, int64_t*, float*, int);
};
#define RANKOPS_ISA_ENTRY(isa) {#isa, &isa::token_stats, &isa::softmax_grad, &isa::block_partials, \
                                &isa::fold_partials, &isa::finish_partials}

// Widest first.
const IsaEntry kIsas[] = {
#if defined(RANKOPS_HAVE_AVX512)
    RANKOPS_ISA_ENTRY(avx512),
#endif
#if defined(RANKOPS_HAVE_AVX2)
    RANKOPS_ISA_ENTRY(avx2),
#endif
    RANKOPS_ISA_ENTRY(baseline),
};
#undef RANKOPS_ISA_ENTRY
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

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& isa : kIsas) names.emplace_back(isa.name);
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
// runs only after this O(N) check, so none reads outside a row. An external target logit
// replaces the target index, which is then never read: nothing to check.
int64_t first_bad_target(const KernelArgs& a) {
  if (a.target_logit != nullptr) return -1;
  for (int64_t r = 0; r < a.logits.n_rows; ++r) {
    const int64_t t = a.targets[r];
    if (t != a.ignore_index && (t < 0 || t >= a.logits.n_cols)) return r;
  }
  return -1;
}
}  // namespace

Status token_stats(const KernelArgs& args) {
  Status s;
  s.bad_target_row = first_bad_target(args);
  return s.bad_target_row >= 0 ? s : kIsas[g_active.load()].token_stats(args);
}

Status softmax_grad(const KernelArgs& args) {
  Status s;
  s.bad_target_row = first_bad_target(args);
  return s.bad_target_row >= 0 ? s : kIsas[g_active.load()].softmax_grad(args);
}

// The block steps take caller-owned buffers straight from the binding: null pointers and
// impossible sizes are refused here, before any kernel touches them.
void block_partials(const KernelArgs& args, Partial* slices) {
  if (!args.target_logit || !slices || args.n_threads < 1)
    throw std::invalid_argument("block_partials needs target_logit, slices and n_threads >= 1");
  kIsas[g_active.load()].block_partials(args, slices);
}

void fold_partials(Partial* running, const Partial* slices, int64_t n_rows, int64_t n_slices,
                   bool started, int n_threads) {
  if (!running || !slices || n_rows < 0 || n_slices < 1 || n_threads < 1)
    throw std::invalid_argument("fold_partials: null buffer, n_rows < 0, n_slices < 1 or n_threads < 1");
  kIsas[g_active.load()].fold_partials(running, slices, n_rows, n_slices, started, n_threads);
}

int64_t finish_partials(const Partial* running, const float* target_logit, int64_t n_rows,
                        int64_t* rank, int64_t* ties, float* logp, int n_threads) {
  if (!running || !target_logit || !rank || !ties || !logp || n_rows < 0 || n_threads < 1)
    throw std::invalid_argument("finish_partials: null buffer, n_rows < 0 or n_threads < 1");
  return kIsas[g_active.load()].finish_partials(running, target_logit, n_rows, rank, ties, logp,
                                                n_threads);
}

AccumulateResult accumulate(const KernelArgs& args, bool check_finite, bool leave_out) {
  const int64_t n_rows = args.logits.n_rows;
  // Per-token results are O(N) next to the O(N*V) logits; keeping them lets the state be
  // updated after the parallel pass, and lets a failing call add nothing at all.
  std::vector<int64_t> rank(static_cast<size_t>(n_rows));
  std::vector<int64_t> ties(static_cast<size_t>(n_rows));
  std::vector<float> logp(static_cast<size_t>(n_rows));
  KernelArgs a = args;
  a.target_logit = nullptr;  // per-shard ranks are partial: they cannot be accumulated
  a.rank = rank.data();
  a.ties = ties.data();
  a.logp = logp.data();
  AccumulateResult result;
  result.status = token_stats(a);
  if (result.status.bad_target_row >= 0 || (check_finite && result.status.nonfinite_row >= 0))
    return result;
  // First pass: find the tokens that cannot be accumulated (NaN included). All or nothing stops
  // at the first; leave_out drops them (rank -1 marks a row as not added) and counts them.
  for (int64_t i = 0; i < n_rows; ++i) {
    if (rank[i] < 0 || state::accumulable(logp[i])) continue;
    if (result.bad_logp_row < 0) result.bad_logp_row = i;
    if (!leave_out) return result;
    rank[i] = -1;
    result.n_skipped += 1;
  }
  // Second pass, nothing can fail any more: add. Integer sums, so the order is immaterial.
  const int64_t n = args.hist_len;
  int64_t* s = args.stats;
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t k = rank[i];
    if (k < 0) continue;
    const int64_t kp = k + ties[i];  // rank + ties <= n_cols - 1 < hist_len
    const int64_t q = state::quantize(logp[i]);
    s[state::index(state::kCount, n, k)] += 1;
    state::add_fixed(s[state::index(state::kSumHi, n, k)], s[state::index(state::kSumLo, n, k)], q);
    s[state::index(state::kCountPess, n, kp)] += 1;
    state::add_fixed(s[state::index(state::kSumHiPess, n, kp)],
                     s[state::index(state::kSumLoPess, n, kp)], q);
    result.n_tied += ties[i] > 0;
  }
  // add_fixed normalises the bins it touches; a state merged from GPU atomics may still carry
  // elsewhere, and the contract is a normalised state on return. O(V), next to O(N * V) reads.
  for (int64_t k = 0; k < n; ++k) {
    state::normalize_carry(s[state::index(state::kSumHi, n, k)], s[state::index(state::kSumLo, n, k)]);
    state::normalize_carry(s[state::index(state::kSumHiPess, n, k)],
                           s[state::index(state::kSumLoPess, n, k)]);
  }
  return result;
}

}  // namespace cpu
}  // namespace rankops
