#pragma once

// torch::nn-style BatchNorm modules on the torch_batchnorm operators. They have the
// parameters, buffers, options, pretty_print and clone of torch::nn::BatchNorm1d/2d/3d,
// and their forward follows Python's torch.nn.modules.batchnorm._BatchNorm.forward, so a
// state saved from either language means the same thing in both.

#include <ATen/core/Tensor.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <cstddef>
#include <ostream>

#include "torch_batchnorm/macros.h"
#include "torch_batchnorm/options.h"

namespace torch_batchnorm {

/// What BatchNorm1d/2d/3d share; `D` is the number in the class name, `Derived` the class.
template <size_t D, typename Derived>
class TBN_API BatchNormImplBase : public torch::nn::Cloneable<Derived> {
 public:
  /// Registers the parameters and buffers that `options` asks for and initialises them.
  explicit BatchNormImplBase(const BatchNormOptions& options_);

  /// Registers weight and bias (undefined unless affine) and running_mean, running_var and
  /// num_batches_tracked (undefined unless track_running_stats), then reset_parameters().
  void reset() override;

  /// Sets running_mean to 0, running_var to 1 and num_batches_tracked to 0, if tracked.
  void reset_running_stats();

  /// reset_running_stats(), then weight to 1 and bias to 0, if affine.
  void reset_parameters();

  /// Normalises `input` with batch statistics in training mode (updating the running
  /// statistics, if tracked) and with the running statistics in evaluation mode or when
  /// frozen; throws c10::Error, leaving every buffer untouched, on an input that does not
  /// fit.
  at::Tensor forward(const at::Tensor& input);

  /// Freezes the module (or unfreezes it, given false): frozen, it normalises as in
  /// evaluation mode, with the running statistics and leaving them as they are, even
  /// while training, which train() does not undo. Gradients still flow, as in evaluation.
  void freeze(bool frozen = true);

  /// Whether the module is frozen (see freeze()).
  bool is_frozen() const;

  /// Prints e.g. `torch_batchnorm::BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=true,
  /// track_running_stats=true)`.
  void pretty_print(std::ostream& stream) const override;

  /// The options the module was built with; changing eps or momentum later takes effect.
  BatchNormOptions options;

  /// Learned scale, shape [num_features]; undefined unless affine.
  at::Tensor weight;

  /// Learned shift, shape [num_features]; undefined unless affine.
  at::Tensor bias;

  /// Running mean, shape [num_features]; undefined unless track_running_stats.
  at::Tensor running_mean;

  /// Running unbiased variance, shape [num_features]; undefined unless track_running_stats.
  at::Tensor running_var;

  /// Number of training batches seen (int64 scalar); undefined unless track_running_stats.
  at::Tensor num_batches_tracked;

 private:
  bool frozen_ = false;
};

/// BatchNorm over 2D (N, C) or 3D (N, C, L) input; see torch::nn::BatchNorm1d.
class TBN_API BatchNorm1dImpl : public BatchNormImplBase<1, BatchNorm1dImpl> {
 public:
  using BatchNormImplBase<1, BatchNorm1dImpl>::BatchNormImplBase;
};

/// BatchNorm over 4D (N, C, H, W) input; see torch::nn::BatchNorm2d.
class TBN_API BatchNorm2dImpl : public BatchNormImplBase<2, BatchNorm2dImpl> {
 public:
  using BatchNormImplBase<2, BatchNorm2dImpl>::BatchNormImplBase;
};

/// BatchNorm over 5D (N, C, D, H, W) input; see torch::nn::BatchNorm3d.
class TBN_API BatchNorm3dImpl : public BatchNormImplBase<3, BatchNorm3dImpl> {
 public:
  using BatchNormImplBase<3, BatchNorm3dImpl>::BatchNormImplBase;
};

/// Module holder (shared pointer) of BatchNorm1dImpl, as torch::nn::BatchNorm1d.
TORCH_MODULE(BatchNorm1d);
/// Module holder (shared pointer) of BatchNorm2dImpl, as torch::nn::BatchNorm2d.
TORCH_MODULE(BatchNorm2d);
/// Module holder (shared pointer) of BatchNorm3dImpl, as torch::nn::BatchNorm3d.
TORCH_MODULE(BatchNorm3d);

// The members are defined and instantiated for these three in the library.
extern template class BatchNormImplBase<1, BatchNorm1dImpl>;
extern template class BatchNormImplBase<2, BatchNorm2dImpl>;
extern template class BatchNormImplBase<3, BatchNorm3dImpl>;

}  // namespace torch_batchnorm
