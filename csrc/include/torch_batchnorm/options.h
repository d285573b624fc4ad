#pragma once

// Options of the C++ modules. They are torch's own option types, so code written for
// torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(...)) ports by changing the
// namespace of the module alone, and one options object can build either module.

#include <torch/nn/options/batchnorm.h>

namespace torch_batchnorm {

/// Options of BatchNorm1d/2d/3d: num_features, eps (1e-5), momentum (0.1; std::nullopt
/// for a cumulative average over num_batches_tracked), affine (true), track_running_stats
/// (true).
using BatchNormOptions = torch::nn::BatchNormOptions;
/// Options of BatchNorm1d.
using BatchNorm1dOptions = torch::nn::BatchNorm1dOptions;
/// Options of BatchNorm2d.
using BatchNorm2dOptions = torch::nn::BatchNorm2dOptions;
/// Options of BatchNorm3d.
using BatchNorm3dOptions = torch::nn::BatchNorm3dOptions;

namespace functional {
/// Options of functional::batch_norm: weight, bias, training (false), momentum (0.1),
/// eps (1e-5).
using BatchNormFuncOptions = torch::nn::functional::BatchNormFuncOptions;
}  // namespace functional

}  // namespace torch_batchnorm
