#pragma once

// The network of the examples. python_state.py builds the same one with torch.nn, so
// both have the same state_dict keys ("0.weight", "1.running_mean", ...).

#include <torch/nn.h>
#include <torch_batchnorm/torch_batchnorm.h>

// Two conv + BatchNorm2d + ReLU blocks, global average pooling, a linear classifier.
inline torch::nn::Sequential make_net(int64_t in_channels, int64_t classes) {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(in_channels, 16, 3).padding(1).bias(false)),
                        torch_batchnorm::BatchNorm2d(16),
                        nn::ReLU(),
                        nn::Conv2d(nn::Conv2dOptions(16, 32, 3).padding(1).stride(2).bias(false)),
                        torch_batchnorm::BatchNorm2d(32),
                        nn::ReLU(),
                        nn::AdaptiveAvgPool2d(1),
                        nn::Flatten(),
                        nn::Linear(32, classes));
}
