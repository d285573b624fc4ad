#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "torch_batchnorm/macros.h"

namespace torch_batchnorm {

// The one validation routine of batch_norm_forward. Every backend kernel calls it
// before it reads or writes anything, so a rejected call leaves all buffers untouched,
// and so does the fake kernel (through the Python module), so that tracing rejects it too.
// Messages and exception types follow torch.nn.functional.batch_norm. Exported for that
// module, as are the other ops' routines.
TBN_API void check_batch_norm_forward(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double eps);

// The one validation routine of batch_norm_backward.
TBN_API void check_batch_norm_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    bool training,
    double eps);

// Validation of the ops that split training into pieces, for statistics that span
// several processes (SyncBatchNorm): local statistics, normalisation with given (global)
// statistics, the local backward sums, and the input gradient from global sums.
TBN_API void check_batch_norm_stats(const at::Tensor& input);

TBN_API void check_batch_norm_forward_with_stats(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const at::Tensor& mean,
    const at::Tensor& m2,
    int64_t count,
    double eps);

TBN_API void check_batch_norm_backward_reduce(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd);

TBN_API void check_batch_norm_backward_elemt(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    int64_t count);

// True when a float16/bfloat16 input comes with float32 parameters ("mixed type"):
// the kernels then read and write the parameters and statistics as float.
bool is_mixed_type(const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> params);

// The dtype of the parameters' gradients and of the statistics the kernels keep.
inline at::ScalarType param_dtype(const at::Tensor& input, bool mixed) {
  return mixed ? at::kFloat : input.scalar_type();
}

// Input viewed as [N, C, inner]: number of channels and of elements per channel.
inline int64_t num_channels(const at::Tensor& input) {
  return input.size(1);
}

}  // namespace torch_batchnorm
