// rankops._C: a thin pybind11 layer over the kernels. Tensors arrive as data pointers with
// sizes and strides (elements); the Python side (rankops/_ext.py) owns allocation and the
// user-facing checks, this layer re-checks what would otherwise corrupt memory.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/token_stats.h"
#ifdef RANKOPS_WITH_CUDA
#include "cuda/softmax_grad.cuh"
#include "cuda/token_stats.cuh"
#endif

namespace py = pybind11;
using rankops::TokenStatsArgs;

namespace {

TokenStatsArgs make_args(uintptr_t logits_ptr, int dtype_code, const std::vector<int64_t>& lead_sizes,
                         const std::vector<int64_t>& lead_strides, int64_t n_cols,
                         int64_t col_stride, uintptr_t targets_ptr, int64_t ignore_index,
                         int n_threads) {
  if (dtype_code < 0 || dtype_code > 2)
    throw py::value_error("dtype_code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                          std::to_string(dtype_code));
  if (lead_sizes.empty() || lead_sizes.size() > rankops::kMaxLeadDims)
    throw py::value_error("logits must have between 1 and " +
                          std::to_string(rankops::kMaxLeadDims) + " leading dimensions");
  if (lead_sizes.size() != lead_strides.size())
    throw py::value_error("lead_sizes and lead_strides differ in length");
  if (n_cols < 1) throw py::value_error("n_cols must be >= 1");
  if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
  if (logits_ptr == 0 || targets_ptr == 0) throw py::value_error("null tensor pointer");
  TokenStatsArgs a;
  a.logits = reinterpret_cast<const void*>(logits_ptr);
  a.dtype = static_cast<rankops::DType>(dtype_code);
  a.n_lead = static_cast<int>(lead_sizes.size());
  a.n_rows = 1;
  for (int d = 0; d < a.n_lead; ++d) {
    if (lead_sizes[d] < 0) throw py::value_error("negative size in lead_sizes");
    a.lead_sizes[d] = lead_sizes[d];
    a.lead_strides[d] = lead_strides[d];
    a.n_rows *= lead_sizes[d];
  }
  a.n_cols = n_cols;
  a.col_stride = col_stride;
  a.targets = reinterpret_cast<const int64_t*>(targets_ptr);
  a.ignore_index = ignore_index;
  a.n_threads = n_threads;
  return a;
}

py::tuple token_stats(uintptr_t logits_ptr, int dtype_code, const std::vector<int64_t>& lead_sizes,
                      const std::vector<int64_t>& lead_strides, int64_t n_cols, int64_t col_stride,
                      uintptr_t targets_ptr, int64_t ignore_index, uintptr_t rank_ptr,
                      uintptr_t ties_ptr, uintptr_t logp_ptr, int n_threads) {
  TokenStatsArgs a = make_args(logits_ptr, dtype_code, lead_sizes, lead_strides, n_cols,
                               col_stride, targets_ptr, ignore_index, n_threads);
  if (rank_ptr == 0 || ties_ptr == 0 || logp_ptr == 0) throw py::value_error("null output pointer");
  a.rank = reinterpret_cast<int64_t*>(rank_ptr);
  a.ties = reinterpret_cast<int64_t*>(ties_ptr);
  a.logp = reinterpret_cast<float*>(logp_ptr);
  rankops::Status s;
  {
    py::gil_scoped_release release;
    s = rankops::cpu::token_stats(a);
  }
  return py::make_tuple(s.nonfinite_row, s.bad_target_row);
}

py::tuple accumulate(uintptr_t logits_ptr, int dtype_code, const std::vector<int64_t>& lead_sizes,
                     const std::vector<int64_t>& lead_strides, int64_t n_cols, int64_t col_stride,
                     uintptr_t targets_ptr, int64_t ignore_index, uintptr_t stats_ptr,
                     int64_t hist_len, bool check_finite, int n_threads) {
  TokenStatsArgs a = make_args(logits_ptr, dtype_code, lead_sizes, lead_strides, n_cols,
                               col_stride, targets_ptr, ignore_index, n_threads);
  // rank + ties <= n_cols - 1, so every index lands inside a histogram of n_cols bins.
  if (hist_len < n_cols)
    throw py::value_error("histograms (" + std::to_string(hist_len) +
                          " bins) are shorter than the vocabulary (" + std::to_string(n_cols) + ")");
  if (stats_ptr == 0) throw py::value_error("null stats pointer");
  rankops::cpu::Histograms h;
  h.stats = reinterpret_cast<int64_t*>(stats_ptr);
  h.hist_len = hist_len;
  rankops::cpu::AccumulateResult r;
  {
    py::gil_scoped_release release;
    r = rankops::cpu::accumulate(a, h, check_finite);
  }
  return py::make_tuple(r.status.nonfinite_row, r.status.bad_target_row, r.bad_logp_row, r.n_kept,
                        r.n_tied);
}

// Writes the weighted cross-entropy gradient into grad [n_rows, grad_row_len] (contiguous, the
// logits' dtype). Returns the first row with a target outside [0, n_cols), or -1.
int64_t softmax_grad(uintptr_t logits_ptr, int dtype_code, const std::vector<int64_t>& lead_sizes,
                     const std::vector<int64_t>& lead_strides, int64_t n_cols, int64_t col_stride,
                     uintptr_t targets_ptr, int64_t ignore_index, uintptr_t lse_ptr,
                     uintptr_t scale_ptr, uintptr_t grad_ptr, int64_t grad_row_len, int n_threads) {
  rankops::SoftmaxGradArgs g;
  g.in = make_args(logits_ptr, dtype_code, lead_sizes, lead_strides, n_cols, col_stride,
                   targets_ptr, ignore_index, n_threads);
  if (lse_ptr == 0 || scale_ptr == 0 || grad_ptr == 0) throw py::value_error("null tensor pointer");
  if (grad_row_len < n_cols) throw py::value_error("grad_row_len must be >= n_cols");
  g.lse = reinterpret_cast<const float*>(lse_ptr);
  g.scale = reinterpret_cast<const float*>(scale_ptr);
  g.grad = reinterpret_cast<void*>(grad_ptr);
  g.grad_row_len = grad_row_len;
  rankops::Status s;
  {
    py::gil_scoped_release release;
    s = rankops::cpu::softmax_grad(g);
  }
  return s.bad_target_row;
}

#ifdef RANKOPS_WITH_CUDA
// Enqueues the CUDA kernels on `stream`; every tensor is already on the device and allocated
// by the caller (rankops/_ext.py), the workspace included, so nothing here allocates or syncs.
void cuda_token_stats(uintptr_t logits_ptr, int dtype_code, int64_t n_rows, int64_t n_cols,
                      int64_t row_stride, int64_t col_stride, uintptr_t targets_ptr,
                      int64_t ignore_index, int64_t slice_cols, uintptr_t workspace_ptr,
                      int64_t workspace_bytes, uintptr_t rank_ptr, uintptr_t ties_ptr,
                      uintptr_t logp_ptr, uintptr_t bad_ptr, uintptr_t stats_ptr, int64_t hist_len,
                      uintptr_t stream) {
  if (dtype_code < 0 || dtype_code > 2) throw py::value_error("dtype_code must be 0, 1 or 2");
  if (n_rows < 0 || n_cols < 1) throw py::value_error("n_rows must be >= 0 and n_cols >= 1");
  if (slice_cols < 1) throw py::value_error("slice_cols must be >= 1");
  const int64_t n_slices = (n_cols + slice_cols - 1) / slice_cols;
  if (workspace_bytes < rankops::cuda::workspace_bytes(n_rows, n_slices))
    throw py::value_error("workspace is too small");
  if (stats_ptr != 0 && hist_len < n_cols)
    throw py::value_error("histograms are shorter than the vocabulary");
  if (!logits_ptr || !targets_ptr || !workspace_ptr || !rank_ptr || !ties_ptr || !logp_ptr || !bad_ptr)
    throw py::value_error("null tensor pointer");
  rankops::cuda::Launch L;
  L.logits = reinterpret_cast<const void*>(logits_ptr);
  L.dtype = dtype_code;
  L.n_rows = n_rows;
  L.n_cols = n_cols;
  L.row_stride = row_stride;
  L.col_stride = col_stride;
  L.targets = reinterpret_cast<const int64_t*>(targets_ptr);
  L.ignore_index = ignore_index;
  L.slice_cols = slice_cols;
  L.workspace = reinterpret_cast<void*>(workspace_ptr);
  L.rank = reinterpret_cast<int64_t*>(rank_ptr);
  L.ties = reinterpret_cast<int64_t*>(ties_ptr);
  L.logp = reinterpret_cast<float*>(logp_ptr);
  L.bad = reinterpret_cast<int32_t*>(bad_ptr);
  L.stats = reinterpret_cast<int64_t*>(stats_ptr);
  L.hist_len = hist_len;
  L.stream = stream;
  const char* err = rankops::cuda::token_stats(L);
  if (err[0] != '\0') throw std::runtime_error(std::string("rankops CUDA kernel: ") + err);
}

// Enqueues the gradient kernel on `stream`: grad [n_rows, row_len] contiguous, the logits' dtype.
// Out-of-range targets are not an error here (the kernel zeroes their rows, reading nothing).
void cuda_softmax_grad(uintptr_t logits_ptr, int dtype_code, int64_t n_rows, int64_t row_len,
                       int64_t n_cols, int64_t row_stride, int64_t col_stride,
                       uintptr_t targets_ptr, int64_t ignore_index, uintptr_t lse_ptr,
                       uintptr_t scale_ptr, uintptr_t grad_ptr, uintptr_t stream) {
  if (dtype_code < 0 || dtype_code > 2) throw py::value_error("dtype_code must be 0, 1 or 2");
  if (n_rows < 0 || n_cols < 1 || row_len < n_cols)
    throw py::value_error("need n_rows >= 0 and 1 <= n_cols <= row_len");
  if (!logits_ptr || !targets_ptr || !lse_ptr || !scale_ptr || !grad_ptr)
    throw py::value_error("null tensor pointer");
  rankops::cuda::SoftmaxGradLaunch L;
  L.logits = reinterpret_cast<const void*>(logits_ptr);
  L.dtype = dtype_code;
  L.n_rows = n_rows;
  L.row_len = row_len;
  L.n_cols = n_cols;
  L.row_stride = row_stride;
  L.col_stride = col_stride;
  L.targets = reinterpret_cast<const int64_t*>(targets_ptr);
  L.ignore_index = ignore_index;
  L.lse = reinterpret_cast<const float*>(lse_ptr);
  L.scale = reinterpret_cast<const float*>(scale_ptr);
  L.grad = reinterpret_cast<void*>(grad_ptr);
  L.stream = stream;
  const char* err = rankops::cuda::softmax_grad(L);
  if (err[0] != '\0') throw std::runtime_error(std::string("rankops CUDA kernel: ") + err);
}
#endif

std::vector<std::string> compiled_isas() {
  int n = 0;
  const char* const* names = rankops::cpu::compiled_isas(&n);
  return std::vector<std::string>(names, names + n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rankops compiled kernels (CPU; CUDA when built with it)";
  m.def("token_stats", &token_stats,
        "Per-token rank, ties and logp; returns (first non-finite row, first bad target row), -1 if none");
  m.def("accumulate", &accumulate,
        "Per-rank accumulation into int64 stats [6, hist_len]; returns (first non-finite row, first bad "
        "target row, first bad logp row, n_kept, n_tied), -1 where none");
  m.def("softmax_grad", &softmax_grad,
        "Weighted cross-entropy gradient into a caller-allocated buffer; returns the first bad target row or -1");
  m.def("cpu_isa", []() { return std::string(rankops::cpu::active_isa()); },
        "The instruction set the CPU kernel runs with");
  m.def("cpu_compiled_isas", &compiled_isas, "Instruction sets compiled into this build, widest first");
  m.def("cpu_isa_supported", [](const std::string& n) { return rankops::cpu::isa_supported(n.c_str()); });
  m.def("set_cpu_isa", [](const std::string& name) {
    if (!rankops::cpu::set_isa(name.c_str()))
      throw py::value_error("instruction set '" + name + "' is not compiled in or not supported by this CPU");
  }, "Force an instruction set ('auto' restores the widest supported); for tests and benchmarks");
#ifdef RANKOPS_WITH_CUDA
  m.def("cuda_token_stats", &cuda_token_stats, "Enqueue the CUDA token-stats kernels on a stream");
  m.def("cuda_workspace_bytes", &rankops::cuda::workspace_bytes);
  m.def("cuda_softmax_grad", &cuda_softmax_grad, "Enqueue the CUDA softmax_grad kernel on a stream");
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
