// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu). Plain C++: the bindings include it.
// Each takes the common argument struct, enqueues on args.stream (no allocation, no sync) and
// returns an empty string or an error message.
#pragma once
#include <cstdint>

#include "../common/kernel_args.h"

namespace rankops {
namespace cuda {

// token_stats.cu: rank, ties, logp and the non-finite flag of each row; with args.stats, the
// fused accumulation of every kept token whose logp can be accumulated (integer atomics on
// hi and lo words: the caller normalises the carry). Needs a workspace of this many bytes.
int64_t token_stats_workspace_bytes(int64_t n_rows, int64_t n_cols);
const char* token_stats(const KernelArgs& args);

// softmax_grad.cu: grad = scale * (exp(z - lse) - onehot), zeros past n_cols and in ignored rows.
const char* softmax_grad(const KernelArgs& args);

}  // namespace cuda
}  // namespace rankops
