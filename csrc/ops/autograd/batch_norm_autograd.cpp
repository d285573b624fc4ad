// Autograd kernel of batch_norm_forward, in C++ so LibTorch programs train with it too.

#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include "torch_batchnorm/ops.h"

namespace torch_batchnorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool is_defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var,
      bool training,
      double momentum,
      double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, save_mean, save_invstd] = batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, momentum, eps);
    // Evaluation differentiates through the running statistics, which training would
    // overwrite in place: save them only when they are constants.
    const at::Tensor undefined;
    ctx->save_for_backward({
        input,
        is_defined(weight) ? *weight : undefined,
        training ? undefined : *running_mean,
        training ? undefined : *running_var,
        save_mean,
        save_invstd,
    });
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = is_defined(bias);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    return {out, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = grads[0];
    const at::Tensor& input = saved[0];
    const auto opt = [](const at::Tensor& t) -> std::optional<at::Tensor> {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    // needs_input_grad counts only the tensors that were defined in forward: with weight
    // None, edge 1 is bias (or a running statistic, or nothing at all).
    const bool has_weight = saved[1].defined();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0),
                                   has_weight && ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    at::Tensor grad_input;
    at::Tensor grad_weight;
    at::Tensor grad_bias;
    if (grad_out.defined() && (mask[0] || mask[1] || mask[2])) {
      std::tie(grad_input, grad_weight, grad_bias) = batch_norm_backward(
          grad_out, input, opt(saved[1]), opt(saved[2]), opt(saved[3]), opt(saved[4]),
          opt(saved[5]), training, eps, mask);
    }
    const at::Tensor none;
    return {
        mask[0] ? grad_input : none,
        mask[1] ? grad_weight : none,
        mask[2] ? grad_bias : none,
        none,
        none,
        none,
        none,
        none};
  }
};

// batch_norm_backward has no derivative of its own. Without an autograd kernel, a
// second differentiation through batch_norm (create_graph=True, then backward again)
// would only warn and return zeros; like an ATen op without a derivative formula, its
// outputs get a node that raises when the backward reaches it.
class BatchNormBackwardFunction : public torch::autograd::Function<BatchNormBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
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
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_weight, grad_bias] = batch_norm_backward(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training,
        eps, output_mask);
    return {grad_input, grad_weight, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false, "derivative for torch_batchnorm::batch_norm_backward is not implemented");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
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
  auto grads = BatchNormBackwardFunction::apply(
      grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
      output_mask);
  return {grads[0], grads[1], grads[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_autograd(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps) {
  // No gradient flows to the running statistics (training overwrites them in place), so
  // like torch refuse ones that ask for it rather than return none silently.
  torch::autograd::check_no_requires_grad(running_mean, "running_mean", "batch_norm_forward");
  torch::autograd::check_no_requires_grad(running_var, "running_var", "batch_norm_forward");
  auto outs = BatchNormFunction::apply(
      input, weight, bias, running_mean, running_var, training, momentum, eps);
  // The update happened below autograd; bump the versions so graphs that saved the
  // old running statistics notice, as they do with torch's batch_norm.
  if (training && is_defined(running_mean)) {
    torch::autograd::increment_version(*running_mean);
    torch::autograd::increment_version(*running_var);
  }
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_batchnorm, Autograd, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace torch_batchnorm
