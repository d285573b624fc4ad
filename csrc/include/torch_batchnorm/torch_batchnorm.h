#pragma once

// The whole C++ API of torch_batchnorm:
//   torch_batchnorm::batch_norm(...)                     differentiable functional form
//   torch_batchnorm::BatchNorm1d/2d/3d(BatchNormOptions)  torch::nn-style modules
//   torch_batchnorm::batch_norm_forward/_backward(...)   the operators themselves
//   torch_batchnorm::load_state_dict/save_state_dict     state shared with Python

#include "torch_batchnorm/functional.h"
#include "torch_batchnorm/macros.h"
#include "torch_batchnorm/modules.h"
#include "torch_batchnorm/ops.h"
#include "torch_batchnorm/options.h"
#include "torch_batchnorm/state_dict.h"
