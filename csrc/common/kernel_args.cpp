// Building and checking the argument struct from what crosses the binding (plain integers for
// pointers, vectors for shape and strides). Host C++ only; a bad argument throws
// std::invalid_argument (pybind11 raises it as ValueError), a failed CUDA launch
// std::runtime_error. Each check stands between a caller's mistake and a read or write out of
// bounds, so every entry point of the binding goes through these.
#include <stdexcept>
#include <string>

#include "kernel_args.h"

namespace rankops {
namespace {
template <typename T> T* ptr(uintptr_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string("null pointer for ") + name);
  return reinterpret_cast<T*>(p);
}
}  // namespace

Logits make_logits(uintptr_t data, int dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, int64_t n_cols) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype: 0 float32, 1 bfloat16, 2 float16");
  if (shape.empty() || shape.size() > kMaxLeadDims + 1 || strides.size() != shape.size())
    throw std::invalid_argument("logits need 1 to 9 dims (8 leading), and one stride per dim");
  Logits z;
  z.dtype = static_cast<DType>(dtype);
  z.n_lead = static_cast<int32_t>(shape.size() - 1);
  for (int d = 0; d < z.n_lead; ++d) {
    if (shape[d] < 0) throw std::invalid_argument("negative size in shape");
    z.lead_sizes[d] = shape[d], z.lead_strides[d] = strides[d], z.n_rows *= shape[d];
  }
  z.row_len = shape.back(), z.col_stride = strides.back();
  if (n_cols < 1 || n_cols > z.row_len) throw std::invalid_argument("need 1 <= n_cols <= shape[-1]");
  z.n_cols = n_cols;
  z.data = z.n_rows > 0 ? ptr<const void>(data, "logits") : nullptr;
  return z;
}

KernelArgs make_args(const Logits& z, uintptr_t targets, int64_t ignore_index, int n_threads) {
  if (n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");
  KernelArgs a;
  a.logits = z, a.targets = ptr<const int64_t>(targets, "targets");
  a.ignore_index = ignore_index, a.n_threads = n_threads;
  return a;
}

void set_outputs(KernelArgs& a, uintptr_t rank, uintptr_t ties, uintptr_t logp, uintptr_t target_logit) {
  a.rank = ptr<int64_t>(rank, "rank"), a.ties = ptr<int64_t>(ties, "ties");
  a.logp = ptr<float>(logp, "logp"), a.target_logit = reinterpret_cast<const float*>(target_logit);
}

void set_stats(KernelArgs& a, uintptr_t stats, int64_t hist_len) {
  // rank + ties <= n_cols - 1 (the target is not its own tie): every bin lies below n_cols.
  if (hist_len < a.logits.n_cols) throw std::invalid_argument("the state is shorter than n_cols");
  if (a.target_logit) throw std::invalid_argument("stats and target_logit exclude each other");
  a.stats = ptr<int64_t>(stats, "stats"), a.hist_len = hist_len;
}

void set_grad(KernelArgs& a, uintptr_t lse, uintptr_t scale, uintptr_t grad) {
  a.lse = ptr<const float>(lse, "lse"), a.scale = ptr<const float>(scale, "scale");
  a.grad = ptr<void>(grad, "grad");
}

void set_cuda(KernelArgs& a, uintptr_t nonfinite, uintptr_t workspace, int64_t workspace_bytes,
              int64_t workspace_needed, uintptr_t stream) {
  a.nonfinite = ptr<int32_t>(nonfinite, "nonfinite");
  if (workspace_bytes < workspace_needed) throw std::invalid_argument("workspace too small");
  a.workspace = ptr<void>(workspace, "workspace"), a.workspace_bytes = workspace_bytes;
  a.stream = stream;
}

void check_cuda(const char* err) {
  if (err[0] != '\0') throw std::runtime_error(std::string("rankops CUDA kernel: ") + err);
}

}  // namespace rankops
