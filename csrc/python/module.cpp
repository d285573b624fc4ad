// The Python extension module. The ops live in libtorch_batchnorm and register with the
// dispatcher when it loads; this module links it, so importing it loads the ops.

#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include "ops/batch_norm_check.h"
#include "torch_batchnorm/functional.h"
#include "torch_batchnorm/ops.h"

namespace py = pybind11;

namespace {

// Binds an op's validation routine, raising torch's exception types (ValueError,
// IndexError, ...) as the op does.
template <typename... Args>
void def_check(py::module_& m, const char* name, void (*check)(Args...)) {
  m.def(name, [check](Args... args) {
    HANDLE_TH_ERRORS
    check(args...);
    END_HANDLE_TH_ERRORS_PYBIND
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_batchnorm native library: BatchNorm ops under torch.ops.torch_batchnorm";
  m.def("compiled_with_cuda", &torch_batchnorm::compiled_with_cuda,
        "Whether the CUDA kernels were compiled into this build.");
  // torch.ops' generic Python entry converts every argument against the schema, which
  // on small inputs costs as much as the kernels (2.2 us of a 3.8 us call). This direct
  // binding still goes through the dispatcher (autograd, dispatch modes, fake tensors),
  // but knows nothing of __torch_function__ or torch.compile: functional.batch_norm
  // takes it only when neither is involved.
  m.def(
      "batch_norm",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight,
         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
         const std::optional<at::Tensor>& running_var, bool training, double momentum,
         double eps) {
        // torch's exception types (ValueError, IndexError, ...) and warnings, as the op
        // raises them through torch.ops.
        HANDLE_TH_ERRORS
        py::gil_scoped_release no_gil;
        return torch_batchnorm::batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "torch_batchnorm::batch_norm (the output of batch_norm_forward), for eager calls.");
  // The ops' validation routines, for their fake kernels (_fake.py): tracing (torch.compile,
  // torch.export, the meta device) rejects what the kernels would, in the same words.
  namespace tbn = torch_batchnorm;
  def_check(m, "check_batch_norm_forward", &tbn::check_batch_norm_forward);
  def_check(m, "check_batch_norm_backward", &tbn::check_batch_norm_backward);
  def_check(m, "check_batch_norm_stats", &tbn::check_batch_norm_stats);
  def_check(m, "check_batch_norm_forward_with_stats", &tbn::check_batch_norm_forward_with_stats);
  def_check(m, "check_batch_norm_backward_reduce", &tbn::check_batch_norm_backward_reduce);
  def_check(m, "check_batch_norm_backward_elemt", &tbn::check_batch_norm_backward_elemt);
}
