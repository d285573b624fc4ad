// The C++ BatchNorm modules. Their forward is Python's _BatchNorm.forward on the
// torch_batchnorm operator, with one difference that only shows on failure:
// num_batches_tracked advances after the operator succeeded, so an input that is
// rejected leaves every buffer as it was; and, as the Python modules, they can be frozen.

#include "torch_batchnorm/modules.h"

#include <c10/util/Exception.h>
#include <torch/nn/init.h>
#include <torch/types.h>
#include <torch/utils.h>

#include "torch_batchnorm/functional.h"

namespace torch_batchnorm {
namespace {

// torch.nn.BatchNormNd._check_input_dim, with torch's words and exception type.
void check_input_dim(size_t d, const at::Tensor& input) {
  const int64_t dim = input.dim();
  if (d == 1) {
    TORCH_CHECK_VALUE(dim == 2 || dim == 3, "expected 2D or 3D input (got ", dim, "D input)");
  } else {
    const int64_t expected = static_cast<int64_t>(d) + 2;
    TORCH_CHECK_VALUE(dim == expected, "expected ", expected, "D input (got ", dim, "D input)");
  }
}

}  // namespace

template <size_t D, typename Derived>
BatchNormImplBase<D, Derived>::BatchNormImplBase(const BatchNormOptions& options_)
    : options(options_) {
  // Not the virtual call: the object is not a Derived yet.
  BatchNormImplBase::reset();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset() {
  const int64_t c = options.num_features();
  // Undefined tensors stand for Python's None: registered under the same names, absent
  // from named_parameters()/named_buffers() and so from any saved state.
  if (options.affine()) {
    weight = this->register_parameter("weight", torch::empty({c}));
    bias = this->register_parameter("bias", torch::empty({c}));
  } else {
    weight = this->register_parameter("weight", at::Tensor(), /*requires_grad=*/false);
    bias = this->register_parameter("bias", at::Tensor(), /*requires_grad=*/false);
  }
  if (options.track_running_stats()) {
    running_mean = this->register_buffer("running_mean", torch::zeros({c}));
    running_var = this->register_buffer("running_var", torch::ones({c}));
    num_batches_tracked =
        this->register_buffer("num_batches_tracked", torch::tensor(0, torch::kLong));
  } else {
    running_mean = this->register_buffer("running_mean", at::Tensor());
    running_var = this->register_buffer("running_var", at::Tensor());
    num_batches_tracked = this->register_buffer("num_batches_tracked", at::Tensor());
  }
  reset_parameters();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset_running_stats() {
  if (options.track_running_stats()) {
    torch::NoGradGuard no_grad;
    running_mean.zero_();
    running_var.fill_(1);
    num_batches_tracked.zero_();
  }
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset_parameters() {
  reset_running_stats();
  if (options.affine()) {
    torch::nn::init::ones_(weight);
    torch::nn::init::zeros_(bias);
  }
}

template <size_t D, typename Derived>
at::Tensor BatchNormImplBase<D, Derived>::forward(const at::Tensor& input) {
  check_input_dim(D, input);

  const bool training = this->is_training() && !frozen_;
  const bool counts = training && options.track_running_stats() && num_batches_tracked.defined();
  double momentum = options.momentum().value_or(0.0);
  if (counts && !options.momentum().has_value()) {
    // Cumulative moving average over the batches seen, this one included.
    momentum = 1.0 / static_cast<double>(num_batches_tracked.item<int64_t>() + 1);
  }
  if (counts && num_batches_tracked.is_inference()) {
    // A count made in inference mode cannot be updated outside it. This adds nothing and
    // throws torch's error where the update would, before the operator changes anything.
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(0);
  }
  // Batch statistics in training, and in evaluation when there are no running ones.
  const bool use_batch_stats = training || (!running_mean.defined() && !running_var.defined());
  // Running statistics are passed where they are updated (training with tracking) or
  // read (evaluation).
  const bool pass_running = !training || options.track_running_stats();
  at::Tensor out = batch_norm(input,
                              weight,
                              bias,
                              pass_running ? running_mean : at::Tensor(),
                              pass_running ? running_var : at::Tensor(),
                              use_batch_stats,
                              momentum,
                              options.eps());
  if (counts) {
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
  }
  return out;
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::freeze(bool frozen) {
  frozen_ = frozen;
}

template <size_t D, typename Derived>
bool BatchNormImplBase<D, Derived>::is_frozen() const {
  return frozen_;
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "torch_batchnorm::BatchNorm" << D << "d(" << options.num_features()
         << ", eps=" << options.eps() << ", momentum=";
  if (options.momentum().has_value()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << options.affine()
         << ", track_running_stats=" << options.track_running_stats();
  if (frozen_) {
    stream << ", frozen=true";
  }
  stream << ')';
}

template class BatchNormImplBase<1, BatchNorm1dImpl>;
template class BatchNormImplBase<2, BatchNorm2dImpl>;
template class BatchNormImplBase<3, BatchNorm3dImpl>;

}  // namespace torch_batchnorm
