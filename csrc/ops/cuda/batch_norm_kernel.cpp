// The CUDA implementations of batch_norm_forward and batch_norm_backward, and of the ops
// that split training into pieces for statistics that span processes (batch_norm_stats,
// batch_norm_forward_with_stats, batch_norm_backward_reduce, batch_norm_backward_elemt).
// Host code only: validation, layouts and outputs here; the kernels, and how they work, in
// batch_norm_launch_impl.cuh, reached through batch_norm_launch.h.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/batch_norm_check.h"
#include "ops/batch_norm_layout.h"
#include "ops/cuda/batch_norm_launch.h"

namespace torch_batchnorm {
namespace cuda {
namespace {

// A per-channel tensor the kernels can index as [C]: itself when contiguous, undefined
// when absent.
at::Tensor dense(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Writes back running statistics that were updated in a dense copy.
void copy_back(const std::optional<at::Tensor>& running, const at::Tensor& updated) {
  if (updated.defined() && !updated.is_same(*running)) {
    running->copy_(updated);
  }
}

// The elementwise pass alone: out = map(dy, x) with the per-channel map of `pass`.
void run_elementwise(const Layout& l,
                     const at::Tensor& x,
                     const at::Tensor& dy,
                     const at::Tensor& out,
                     Pass pass,
                     const ChannelTensors& channels,
                     int64_t count,
                     double eps) {
  if (l.channels == 0 || out.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_elementwise_cuda", [&] {
        Launch<scalar_t>::elementwise(l, x, dy, out, pass, channels, count, eps);
      });
}

// Launch<scalar_t>::reduce for x's dtype.
void run_reduce(Reduction r,
                const Layout& l,
                const at::Tensor& x,
                const at::Tensor& dy,
                const at::Tensor& out,
                Pass pass,
                const ChannelTensors& channels,
                const FinalizeTensors& fin,
                double eps) {
  if (l.channels == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_reduce_cuda", [&] {
        Launch<scalar_t>::reduce(r, l, x, dy, out, pass, channels, fin, eps);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps) {
  check_batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  at::Tensor out = empty_result(input);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor save_mean = at::empty({training ? l.channels : 0}, x.options().dtype(acc_type));
  at::Tensor save_invstd = at::empty_like(save_mean);

  ChannelTensors ch;
  ch.weight = dense(weight);
  ch.bias = dense(bias);
  if (!training) {
    ch.mean = dense(running_mean);
    ch.spread = dense(running_var);
    run_elementwise(l, x, at::Tensor(), out, Pass::kNormalizeEval, ch, l.per_channel(), eps);
    return {out, save_mean, save_invstd};
  }
  FinalizeTensors fin;
  fin.save_mean = save_mean;
  fin.save_invstd = save_invstd;
  fin.running_mean = dense(running_mean);
  fin.running_var = dense(running_var);
  fin.momentum = momentum;
  // What rounding the mean to save_mean dropped, for the normalizing pass.
  fin.residual = at::empty_like(save_mean);
  ch.mean = save_mean;
  ch.spread = save_invstd;
  ch.residual = fin.residual;
  run_reduce(Reduction::kStats, l, x, at::Tensor(), out, Pass::kNormalizeTraining, ch, fin, eps);
  copy_back(running_mean, fin.running_mean);
  copy_back(running_var, fin.running_var);
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    bool training,
    double eps,
    std::array<bool, 3> mask) {
  check_batch_norm_backward(
      grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat grad_format = grad_input_format(input, grad_out);
  Layout l{};
  const at::Tensor x = kernel_layout(input.contiguous(grad_format), l);
  const at::Tensor dy = same_layout(grad_out, l);
  const bool mixed = is_mixed_type(input, {&weight, &running_mean, &running_var});
  const auto param_type = param_dtype(input, mixed);
  const int64_t C = l.channels;
  at::Tensor grad_input =
      mask[0] ? empty_in_format(input, grad_format) : at::empty({0}, x.options());
  at::Tensor grad_weight = at::empty({mask[1] ? C : 0}, x.options().dtype(param_type));
  at::Tensor grad_bias = at::empty({mask[2] ? C : 0}, x.options().dtype(param_type));

  ChannelTensors ch;
  ch.mean = dense(training ? save_mean : running_mean);
  ch.spread = dense(training ? save_invstd : running_var);
  ch.weight = dense(weight);
  const Pass pass = training ? Pass::kGradTraining : Pass::kGradEval;
  // As on the CPU: the sums are taken whenever an output depends on them, so an empty
  // batch still produces grad_weight and grad_bias.
  const bool need_sums = training ? (mask[0] || mask[1] || mask[2]) : (mask[1] || mask[2]);
  if (!need_sums) {
    run_elementwise(l, x, dy, grad_input, pass, ch, l.per_channel(), eps);
    return {grad_input, grad_weight, grad_bias};
  }
  FinalizeTensors fin;
  fin.grad_weight = mask[1] ? grad_weight : at::Tensor();
  fin.grad_bias = mask[2] ? grad_bias : at::Tensor();
  // As on the CPU: training takes the sums about the batch mean, not save_mean.
  fin.centre_sums = training;
  if (training && mask[0]) {
    // The sums and the residual the grad-input pass reads.
    const at::Tensor sums = at::empty({3, C}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    ch.sum_dy = sums[0];
    ch.sum_dy_xmu = sums[1];
    ch.residual = sums[2];
    fin.sum_dy = ch.sum_dy;
    fin.sum_dy_xmu = ch.sum_dy_xmu;
    fin.residual = ch.residual;
  }
  run_reduce(Reduction::kGrad, l, x, dy, grad_input, pass, ch, fin, eps);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_batch_norm_stats(input);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  FinalizeTensors fin;
  fin.save_mean = at::empty({l.channels}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  fin.m2 = at::empty_like(fin.save_mean);
  run_reduce(Reduction::kStats,
             l,
             x,
             at::Tensor(),
             at::Tensor(),
             Pass::kNormalizeTraining,
             ChannelTensors(),
             fin,
             0.0);
  return {fin.save_mean, fin.m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_with_stats_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const at::Tensor& mean,
    const at::Tensor& m2,
    int64_t count,
    double momentum,
    double eps) {
  check_batch_norm_forward_with_stats(
      input, weight, bias, running_mean, running_var, mean, m2, count, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  at::Tensor out = empty_result(input);
  const int64_t C = l.channels;
  FinalizeTensors fin;
  fin.save_mean = at::empty({C}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  fin.save_invstd = at::empty_like(fin.save_mean);
  if (C == 0) {
    return {out, fin.save_mean, fin.save_invstd};
  }
  fin.running_mean = dense(running_mean);
  fin.running_var = dense(running_var);
  fin.momentum = momentum;
  ChannelTensors ch;
  ch.weight = dense(weight);
  ch.bias = dense(bias);
  ch.mean = fin.save_mean;
  ch.spread = fin.save_invstd;
  // The statistics are finalized (and the running statistics updated) even when this
  // process holds no values: they are those of all `count`.
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_with_stats_cuda", [&] {
        Launch<scalar_t>::finalize_stats(mean.contiguous(), m2.contiguous(), count, fin, ch, eps);
      });
  run_elementwise(l, x, at::Tensor(), out, Pass::kNormalizeTraining, ch, count, eps);
  copy_back(running_mean, fin.running_mean);
  copy_back(running_var, fin.running_var);
  return {out, fin.save_mean, fin.save_invstd};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_out,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& mean,
                                                                   const at::Tensor& invstd) {
  check_batch_norm_backward_reduce(grad_out, input, mean, invstd);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const at::Tensor dy = same_layout(grad_out, l);
  ChannelTensors ch;
  ch.mean = mean.contiguous();
  ch.spread = invstd.contiguous();
  FinalizeTensors fin;
  fin.sum_dy = at::empty({l.channels}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  fin.sum_dy_xmu = at::empty_like(fin.sum_dy);
  run_reduce(Reduction::kGrad, l, x, dy, at::Tensor(), Pass::kGradTraining, ch, fin, 0.0);
  return {fin.sum_dy, fin.sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_out,
                                          const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight,
                                          const at::Tensor& mean,
                                          const at::Tensor& invstd,
                                          const at::Tensor& sum_dy,
                                          const at::Tensor& sum_dy_xmu,
                                          int64_t count) {
  check_batch_norm_backward_elemt(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const at::Tensor dy = same_layout(grad_out, l);
  at::Tensor grad_input = empty_result(input);
  ChannelTensors ch;
  ch.mean = mean.contiguous();
  ch.spread = invstd.contiguous();
  ch.weight = dense(weight);
  ch.sum_dy = sum_dy.contiguous();
  ch.sum_dy_xmu = sum_dy_xmu.contiguous();
  // The sums and `count` are those of every process: the coefficients are the training
  // ones of batch_norm_backward with that count.
  run_elementwise(l, x, dy, grad_input, Pass::kGradTraining, ch, count, 0.0);
  return grad_input;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(torch_batchnorm, CUDA, m) {
  m.impl("batch_norm_forward", &cuda::batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &cuda::batch_norm_backward_cuda);
  m.impl("batch_norm_stats", &cuda::batch_norm_stats_cuda);
  m.impl("batch_norm_forward_with_stats", &cuda::batch_norm_forward_with_stats_cuda);
  m.impl("batch_norm_backward_reduce", &cuda::batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &cuda::batch_norm_backward_elemt_cuda);
}

}  // namespace torch_batchnorm
