#pragma once

// Typed C++ entry points of the torch_batchnorm operators. Each call goes through the
// dispatcher, so it reaches the CPU or CUDA kernel and, with tensors that require
// grad, the autograd kernel: the same path torch.ops.torch_batchnorm.* takes in Python.

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "torch_batchnorm/macros.h"

namespace torch_batchnorm {

/// Whether this build of the library contains the CUDA kernels.
TBN_API bool compiled_with_cuda();

/// Normalises `input` ([N, C, *]) per channel; in training updates running stats in place
/// and returns (output, save_mean, save_invstd), the saved statistics empty in evaluation.
TBN_API std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps);

/// Gradients (input, weight, bias) of batch_norm_forward; entries not in output_mask are empty.
TBN_API std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    bool training,
    double eps,
    std::array<bool, 3> output_mask);

}  // namespace torch_batchnorm
