// C++ half of the state example: loads the state that `python_state.py save` wrote from
// Python into the same network built with torch_batchnorm::BatchNorm2d, and checks that
// it gives Python's output.
//
//   load_python_state net_state.pt reference.pt

#include <torch/serialize.h>
#include <torch/torch.h>
#include <torch_batchnorm/torch_batchnorm.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "net.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " net_state.pt reference.pt\n";
    return 2;
  }
  torch::nn::Sequential net = make_net(3, 3);
  torch_batchnorm::load_state_dict(*net, argv[1]);
  net->eval();

  const auto* bn = net->ptr(1)->as<torch_batchnorm::BatchNorm2dImpl>();
  std::cout << "loaded " << argv[1] << ": layer 1 has seen "
            << bn->num_batches_tracked.item<int64_t>()
            << " batches, running_mean[:3] = " << bn->running_mean.slice(0, 0, 3) << "\n";

  // reference.pt holds {"input": x, "output": net(x)} from Python.
  std::ifstream file(argv[2], std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  const auto reference = torch::pickle_load(bytes).toGenericDict();
  const torch::Tensor input = reference.at("input").toTensor();
  const torch::Tensor expected = reference.at("output").toTensor();

  torch::NoGradGuard no_grad;
  const torch::Tensor output = net->forward(input);
  const double max_diff = (output - expected).abs().max().item<double>();
  std::cout << "max |C++ - Python| = " << max_diff << "\n";
  if (!torch::allclose(output, expected, /*rtol=*/1e-5, /*atol=*/1e-5)) {
    std::cerr << "the C++ output differs from Python's\n";
    return 1;
  }
  return 0;
}
