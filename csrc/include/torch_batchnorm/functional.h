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

namespace detail {

/// A weight or bias as the operator takes it: 1-D. at::batch_norm takes them of any shape
/// that holds C values ([1, C, 1, 1] parameters, say) and reads them flat. The reshape is
/// a view that autograd records, so their gradients come back in their own shape.
inline std::optional<at::Tensor> channel_vector(const std::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined() && t->dim() != 1) {
    return t->reshape({-1});
  }
  return t;
}

}  // namespace detail

/// Batch normalisation over dim 1 of `input` ([N, C, *]), with the contract of
/// at::batch_norm: in training the batch statistics normalise and, when given, the running
/// statistics are updated in place with `momentum`; otherwise the running statistics
/// normalise. `weight` and `bias` hold C values each, in any shape. Invalid arguments
/// throw c10::Error before anything is modified.
inline at::Tensor batch_norm(const at::Tensor& input,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             bool training,
                             double momentum,
                             double eps) {
  return std::get<0>(batch_norm_forward(input, detail::channel_vector(weight),
                                        detail::channel_vector(bias), running_mean, running_var,
                                        training, momentum, eps));
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
