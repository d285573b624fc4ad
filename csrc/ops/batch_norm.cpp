// Schemas of the torch_batchnorm operators and their typed C++ entry points. Backend
// kernels live in cpu/ and cuda/, the autograd kernel in autograd/; each file registers
// its own implementations.

#include "torch_batchnorm/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torch_batchnorm {

TORCH_LIBRARY(torch_batchnorm, m) {
  // Modelled on ATen's _native_batch_norm_legit: running statistics are mutated in
  // place and not returned; save_mean/save_invstd are in the accumulation dtype and
  // empty in evaluation mode.
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps) -> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  // Training uses save_mean/save_invstd, evaluation running_mean/running_var.
  // Outputs masked off are returned empty.
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, "
      "Tensor? running_mean, Tensor? running_var, Tensor? save_mean, Tensor? save_invstd, "
      "bool training, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Training split into pieces, for statistics that span processes (SyncBatchNorm):
  // per-channel mean and M2 (sum of squared deviations) of the local batch, in the
  // accumulation dtype;
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  // normalisation with statistics of `count` values per channel gathered elsewhere, with
  // the running-statistics update of batch_norm_forward in training;
  m.def(
      "batch_norm_forward_with_stats(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, Tensor m2, int count, "
      "float momentum, float eps) -> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  // the local sums sum(dy) and sum(dy * (x - mean)) per channel;
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // and the input gradient from sums over all `count` values per channel.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, int count) -> Tensor");
}

bool compiled_with_cuda() {
#ifdef TBN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_batchnorm::batch_norm_forward", "")
                       .typed<decltype(batch_norm_forward)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    bool training,
    double eps,
    std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_batchnorm::batch_norm_backward", "")
                       .typed<decltype(batch_norm_backward)>();
  return op.call(
      grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
      output_mask);
}

}  // namespace torch_batchnorm
