// rankops._C: a thin pybind11 layer over the kernels; rankops/_ext.py is its only caller. A tensor
// arrives as a data pointer (an int), logits as a Logits descriptor; each call fills the one
// argument struct, checked as it is built (common/kernel_args.cpp: bad arguments raise ValueError).
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
template <typename T> T* as(Ptr p) { return reinterpret_cast<T*>(p); }

#define OP_ARGS py::arg("logits"), py::arg("targets"), py::arg("ignore_index")
PYBIND11_MODULE(_C, m) {
  py::class_<Logits>(m, "Logits", "A logits tensor: pointer, dtype code, shape, strides (elements)")
      .def(py::init(&make_logits), py::arg("data"), py::arg("dtype"), py::arg("shape"),
           py::arg("strides"), py::arg("n_cols"));
  m.def("token_stats", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr rank, Ptr ties,
                          Ptr logp, Ptr target_logit, int n_threads) {
    KernelArgs a = make_args(z, targets, ignore_index, n_threads);
    set_outputs(a, rank, ties, logp, target_logit);
    py::gil_scoped_release release;
    const Status s = cpu::token_stats(a);
    return std::make_pair(s.nonfinite_row, s.bad_target_row);
  }, OP_ARGS, py::arg("rank"), py::arg("ties"), py::arg("logp"), py::arg("target_logit") = 0,
     py::arg("n_threads") = 1);
  m.def("accumulate", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr stats,
                         int64_t hist_len, bool check_finite, bool leave_out, int n_threads) {
    if (leave_out && check_finite) throw py::value_error("leave_out needs check_finite=False");
    KernelArgs a = make_args(z, targets, ignore_index, n_threads);
    set_stats(a, stats, hist_len);
    py::gil_scoped_release release;
    const cpu::AccumulateResult r = cpu::accumulate(a, check_finite, leave_out);
    return std::make_tuple(r.status.nonfinite_row, r.status.bad_target_row, r.bad_logp_row,
                           r.n_tied, r.n_skipped);
  }, OP_ARGS, py::arg("stats"), py::arg("hist_len"), py::arg("check_finite"), py::arg("leave_out"),
     py::arg("n_threads") = 1);
  m.def("softmax_grad", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr lse, Ptr scale,
                           Ptr grad, int n_threads) {
    KernelArgs a = make_args(z, targets, ignore_index, n_threads);
    set_grad(a, lse, scale, grad);
    py::gil_scoped_release release;
    return cpu::softmax_grad(a).bad_target_row;
  }, OP_ARGS, py::arg("lse"), py::arg("scale"), py::arg("grad"), py::arg("n_threads") = 1);
  // The fused output layer's block steps (cpu/token_stats.h): Partials live in caller-owned
  // byte buffers of partial_bytes each.
  m.attr("partial_bytes") = sizeof(cpu::Partial);
  m.attr("slice_cols") = cpu::kSliceCols;
  m.def("block_partials", [](const Logits& z, Ptr target_logit, Ptr slices, int n_threads) {
    KernelArgs a;  // no targets: every row is kept, its target logit given
    a.logits = z, a.n_threads = n_threads, a.target_logit = as<const float>(target_logit);
    py::gil_scoped_release release;
    cpu::block_partials(a, as<cpu::Partial>(slices));
  }, py::arg("logits"), py::arg("target_logit"), py::arg("slices"), py::arg("n_threads") = 1);
  m.def("fold_partials", [](Ptr running, Ptr slices, int64_t n_rows, int64_t n_slices, bool started,
                            int n_threads) {
    py::gil_scoped_release release;
    cpu::fold_partials(as<cpu::Partial>(running), as<const cpu::Partial>(slices), n_rows, n_slices,
                       started, n_threads);
  }, py::arg("running"), py::arg("slices"), py::arg("n_rows"), py::arg("n_slices"),
     py::arg("started"), py::arg("n_threads") = 1);
  m.def("finish_partials", [](Ptr running, Ptr target_logit, int64_t n_rows, Ptr rank, Ptr ties,
                              Ptr logp, int n_threads) {
    py::gil_scoped_release release;
    return cpu::finish_partials(as<const cpu::Partial>(running), as<const float>(target_logit),
                                n_rows, as<int64_t>(rank), as<int64_t>(ties), as<float>(logp),
                                n_threads);
  }, py::arg("running"), py::arg("target_logit"), py::arg("n_rows"), py::arg("rank"),
     py::arg("ties"), py::arg("logp"), py::arg("n_threads") = 1);
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
    KernelArgs a = make_args(z, targets, ignore_index);
    set_outputs(a, rank, ties, logp, target_logit);
    if (stats != 0) set_stats(a, stats, hist_len);
    set_cuda(a, nonfinite, workspace, workspace_bytes,
             cuda::token_stats_workspace_bytes(z.n_rows, z.n_cols), stream);
    check_cuda(cuda::token_stats(a));
  }, OP_ARGS, py::arg("rank"), py::arg("ties"), py::arg("logp"), py::arg("nonfinite"),
     py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
     py::arg("target_logit") = 0, py::arg("stats") = 0, py::arg("hist_len") = 0);
  m.def("cuda_softmax_grad", [](const Logits& z, Ptr targets, int64_t ignore_index, Ptr lse,
                                Ptr scale, Ptr grad, Ptr stream) {
    KernelArgs a = make_args(z, targets, ignore_index);
    set_grad(a, lse, scale, grad);
    a.stream = stream;
    check_cuda(cuda::softmax_grad(a));
  }, OP_ARGS, py::arg("lse"), py::arg("scale"), py::arg("grad"), py::arg("stream"));
#else
  m.attr("has_cuda") = false;
#endif
}
