// Trains a small conv net with torch_batchnorm::BatchNorm2d on synthetic data and prints
// the falling loss. Exits non-zero when the loss does not fall, so it doubles as a test.
//
//   train_convnet [--save state.pt]
//
// --save writes the trained state in torch.save's format; Python loads it with
// model.load_state_dict(torch.load("state.pt")).

#include <torch/optim.h>
#include <torch/torch.h>
#include <torch_batchnorm/torch_batchnorm.h>

#include <cstring>
#include <iomanip>
#include <iostream>
#include <string>

#include "net.h"

namespace {

// Images whose class is the colour channel with the largest mean brightness, hidden under
// noise: learnable, not trivial.
std::pair<torch::Tensor, torch::Tensor> make_batch(int64_t n, torch::Device device) {
  const torch::Tensor labels = torch::randint(0, 3, {n}, torch::kLong);
  torch::Tensor images = torch::randn({n, 3, 16, 16});
  images += 0.8 * torch::one_hot(labels, 3).to(torch::kFloat).view({n, 3, 1, 1});
  return {images.to(device).contiguous(torch::MemoryFormat::ChannelsLast), labels.to(device)};
}

}  // namespace

int main(int argc, char** argv) {
  std::string save_path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--save") == 0 && i + 1 < argc) {
      save_path = argv[++i];
    } else {
      std::cerr << "usage: " << argv[0] << " [--save state.pt]\n";
      return 2;
    }
  }
  torch::manual_seed(0);
  const torch::Device device = torch::cuda::is_available() && torch_batchnorm::compiled_with_cuda()
                                   ? torch::kCUDA
                                   : torch::kCPU;

  torch::nn::Sequential net = make_net(3, 3);
  net->to(device);
  std::cout << net << "\n";
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));

  const int steps = 40;
  double first = 0;
  double last = 0;
  for (int step = 0; step < steps; ++step) {
    auto [images, labels] = make_batch(32, device);
    optimizer.zero_grad();
    const torch::Tensor loss = torch::nn::functional::cross_entropy(net->forward(images), labels);
    loss.backward();
    optimizer.step();
    // Average over ten steps, so one noisy batch does not decide.
    const double value = loss.item<double>();
    if (step < 10) {
      first += value / 10;
    }
    if (step >= steps - 10) {
      last += value / 10;
    }
    if (step % 10 == 0 || step == steps - 1) {
      std::cout << "step " << std::setw(2) << step << "  loss " << std::fixed
                << std::setprecision(4) << value << "\n";
    }
  }

  // Evaluation uses the running statistics the BatchNorm layers collected.
  net->eval();
  torch::NoGradGuard no_grad;
  auto [images, labels] = make_batch(512, device);
  const double accuracy =
      net->forward(images).argmax(1).eq(labels).to(torch::kDouble).mean().item<double>();
  std::cout << "mean loss, first 10 steps " << first << ", last 10 steps " << last
            << "; eval accuracy " << accuracy << "\n";

  if (!save_path.empty()) {
    torch_batchnorm::save_state_dict(*net, save_path);
    std::cout << "state saved to " << save_path << "\n";
  }
  if (!(last < 0.5 * first)) {
    std::cerr << "the loss did not fall\n";
    return 1;
  }
  return 0;
}
