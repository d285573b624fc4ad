#pragma once

// Moving module state between Python and C++. Python writes it with
//     torch.save(dict(model.state_dict()), path)
// and C++ reads it into a module built with the same structure and names, and the other
// way round. The files are torch.save's zip format, read with torch::pickle_load;
// dict(...) is needed because LibTorch's unpickler cannot rebuild the
// collections.OrderedDict that state_dict() returns (pytorch/pytorch#100741).

#include <torch/nn/module.h>

#include <string>

#include "torch_batchnorm/macros.h"

namespace torch_batchnorm {

/// Copies the tensors of a file written by Python's torch.save(dict(model.state_dict()),
/// path) into the parameters and buffers of `module` that have the same names, like
/// Python's load_state_dict: values are converted to each target's dtype and device,
/// shapes must match, and with `strict` every key must match; throws c10::Error, before
/// any tensor is modified, otherwise.
TBN_API void load_state_dict(torch::nn::Module& module,
                             const std::string& path,
                             bool strict = true);

/// Writes the parameters and buffers of `module` in torch.save's format as a dict of tensors,
/// which Python reads with model.load_state_dict(torch.load(path)).
TBN_API void save_state_dict(const torch::nn::Module& module, const std::string& path);

}  // namespace torch_batchnorm
