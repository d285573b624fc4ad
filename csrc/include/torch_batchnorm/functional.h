#pragma once

// The differentiable functional form. It calls the batch_norm_forward operator through
// the dispatcher, so tensors that require grad reach the autograd kernel and
// backward() works from C++ exactly as it does from Python.

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "torch_batchnorm/ops.h"
#include "torch_batchnorm/options.h"

namespace torch_batchnorm {

/// Batch normalisation over dim 1 of `input` ([N, C, *]), with the contract of
/// at::batch_norm: in training the batch statistics normalise and, when given, the running
/// statistics are updated in place with `momentum`; otherwise the running statistics
/// normalise. Invalid arguments throw c10::Error before anything is modified.
inline at::Tensor batch_norm(const at::Tensor& input,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             bool training,
                             double momentum,
                             double eps) {
  return std::get<0>(
      batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps));
}

namespace functional {

/// torch::nn::functional::batch_norm's signature, on the torch_batchnorm operator.
inline at::Tensor batch_norm(const at::Tensor& input,
                             const at::Tensor& running_mean,
                             const at::Tensor& running_var,
                             const BatchNormFuncOptions& options = {}) {
  return torch_batchnorm::batch_norm(input,
                                     options.weight(),
                                     options.bias(),
                                     running_mean,
                                     running_var,
                                     options.training(),
                                     options.momentum(),
                                     options.eps());
}

}  // namespace functional

}  // namespace torch_batchnorm
