// rankops._C: a thin pybind11 layer over the kernels; rankops/_ext.py is its only caller. A tensor
// arrives as a data pointer (an int), logits as a Logits descriptor; each call fills the one
// argument struct (common/kernel_args.h) and re-checks what would otherwise corrupt memory.
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/token_stats.h"
#ifdef RANKOPS_WITH_CUDA
#include "cuda/kernels.cuh"
#endif

namespace py = pybind11;
using namespace rankops;
using Ptr = uintptr_t;

namespace {
template <typename T> T* ptr(Ptr p, const char* name) {
  if (p == 0) throw py::value_error(std::string("null pointer for ") + name);
  return reinterpret_cast<T*>(p);
}

Logits make_logits(Ptr data, int dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, int64_t n_cols) {
  if (dtype < 0 || dtype > 2) throw py::value_error("dtype: 0 float32, 1 bfloat16, 2 float16");
  if (shape.empty() || shape.size() > kMaxLeadDims + 1 || strides.size() != shape.size())
    throw py::value_error("logits need 1 to 9 dims (8 leading), and one stride per dim");
  Logits z;
  z.dtype = static_cast<DType>(dtype);
  z.n_lead = static_cast<int32_t>(shape.size() - 1);
  for (int d = 0; d < z.n_lead; ++d) {
    if (shape[d] < 0) throw py::value_error("negative size in shape");
    z.lead_sizes[d] = shape[d], z.lead_strides[d] = strides[d], z.n_rows *= shape[d];
  }
  z.row_len = shape.back(), z.col_stride = strides.back();
  if (n_cols < 1 || n_cols > z.row_len) throw py::value_error("need 1 <= n_cols <= shape[-1]");
  z.n_cols = n_cols;
  z.data = z.n_rows > 0 ? ptr<const void>(data, "logits") : nullptr;
  return z;
}

// The fields every op shares, and the per-token outputs / the state / the gradient's inputs.
KernelArgs args(const Logits& z, Ptr targets, int64_t ignore_index, int n_threads = 1) {
  if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
  KernelArgs a;
  a.logits = z, a.targets = ptr<const int64_t>(targets, "targets");
  a.ignore_index = ignore_index, a.n_threads = n_threads;
  return a;
}
void set_outputs(KernelArgs& a, Ptr rank, Ptr ties, Ptr logp, Ptr target_logit) {
  a.rank = ptr<int64_t>(rank, "rank"), a.ties = ptr<int64_t>(ties, "ties");
  a.logp = ptr<float>(logp, "logp"), a.target_logit = reinterpret_cast<const float*>(target_logit);
}
void set_stats(KernelArgs& a, Ptr stats, int64_t hist_len) {
  // rank + ties <= n_cols - 1 (the target is not its own tie): every bin lies below n_cols.
  if (hist_len < a.logits.n_cols) throw py::value_error("the state is shorter than n_cols");
  if (a.target_logit) throw py::value_error("stats and target_logit exclude each other");
  a.stats = ptr<int64_t>(stats, "stats"), a.hist_len = hist_len;
}
void set_grad(KernelArgs& a, Ptr lse, Ptr scale, Ptr grad) {
  a.lse = ptr<const float>(lse, "lse"), a.scale = ptr<const float>(scale, "scale");
  a.grad = ptr<void>(grad, "grad");
}
void check_cuda(const char* err) {
  if (err[0] != '\0') throw std::runtime_error(std::string("rankops CUDA kernel: ") + err);
}
}  // namespace

#define OP_ARGS py::arg("logits"), py::arg("targets"), py::arg("ignore_index")
PYBIND11_MODULE(_C, m) {
  py::class_<Logits>(m, "Logits", "A logits tensor: pointer, dtype code, shape, strides (elements)")
      .def(py::init(&make_logits), py::arg("data"), py::arg("dtype"), py::arg("shape"),
           py::arg("strides"), py::arg("n_cols"));
  m.def("token_stats", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr rank, Ptr ties,
                          Ptr logp, Ptr target_logit, int n_threads) {
    KernelArgs a = args(z, targets, ignore_index, n_threads);
    set_outputs(a, rank, ties, logp, target_logit);
    py::gil_scoped_release release;
    const Status s = cpu::token_stats(a);
    return std::make_pair(s.nonfinite_row, s.bad_target_row);
  }, OP_ARGS, py::arg("rank"), py::arg("ties"), py::arg("logp"), py::arg("target_logit") = 0,
     py::arg("n_threads") = 1);
  m.def("accumulate", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr stats,
                         int64_t hist_len, bool check_finite, bool leave_out, int n_threads) {
    if (leave_out && check_finite) throw py::value_error("leave_out needs check_finite=False");
    KernelArgs a = args(z, targets, ignore_index, n_threads);
    set_stats(a, stats, hist_len);
    py::gil_scoped_release release;
    const cpu::AccumulateResult r = cpu::accumulate(a, check_finite, leave_out);
    return std::make_tuple(r.status.nonfinite_row, r.status.bad_target_row, r.bad_logp_row,
                           r.n_tied, r.n_skipped);
  }, OP_ARGS, py::arg("stats"), py::arg("hist_len"), py::arg("check_finite"), py::arg("leave_out"),
     py::arg("n_threads") = 1);
  m.def("softmax_grad", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr lse, Ptr scale,
                           Ptr grad, int n_threads) {
    KernelArgs a = args(z, targets, ignore_index, n_threads);
    set_grad(a, lse, scale, grad);
    py::gil_scoped_release release;
    return cpu::softmax_grad(a).bad_target_row;
  }, OP_ARGS, py::arg("lse"), py::arg("scale"), py::arg("grad"), py::arg("n_threads") = 1);
  m.def("cpu_isa", [] { return std::string(cpu::active_isa()); });
  m.def("cpu_compiled_isas", &cpu::compiled_isas, "widest first");
  m.def("cpu_isa_supported", [](const std::string& s) { return cpu::isa_supported(s.c_str()); },
        py::arg("name"));
  m.def("set_cpu_isa", [](const std::string& s) {
    if (!cpu::set_isa(s.c_str())) throw py::value_error("ISA '" + s + "' not compiled in or unsupported");
  }, py::arg("name"));
#ifdef RANKOPS_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("cuda_workspace_bytes", &cuda::token_stats_workspace_bytes, py::arg("n_rows"), py::arg("n_cols"));
  m.def("cuda_token_stats", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr rank, Ptr ties,
                               Ptr logp, Ptr nonfinite, Ptr workspace, int64_t workspace_bytes,
                               Ptr stream, Ptr target_logit, Ptr stats, int64_t hist_len) {
    KernelArgs a = args(z, targets, ignore_index);
    set_outputs(a, rank, ties, logp, target_logit);
    a.nonfinite = ptr<int32_t>(nonfinite, "nonfinite");
    if (stats != 0) set_stats(a, stats, hist_len);
    if (workspace_bytes < cuda::token_stats_workspace_bytes(z.n_rows, z.n_cols))
      throw py::value_error("workspace too small");
    a.workspace = ptr<void>(workspace, "workspace"), a.workspace_bytes = workspace_bytes;
    a.stream = stream;
    check_cuda(cuda::token_stats(a));
  }, OP_ARGS, py::arg("rank"), py::arg("ties"), py::arg("logp"), py::arg("nonfinite"),
     py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
     py::arg("target_logit") = 0, py::arg("stats") = 0, py::arg("hist_len") = 0);
  m.def("cuda_softmax_grad", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr lse,
                                Ptr scale, Ptr grad, Ptr stream) {
    KernelArgs a = args(z, targets, ignore_index);
    set_grad(a, lse, scale, grad);
    a.stream = stream;
    check_cuda(cuda::softmax_grad(a));
  }, OP_ARGS, py::arg("lse"), py::arg("scale"), py::arg("grad"), py::arg("stream"));
#else
  m.attr("has_cuda") = false;
#endif
}
