// The C++ modules against torch::nn::BatchNorm1d/2d/3d: outputs, gradients and buffers
// over several training steps and in evaluation, names, errors, options, pretty_print,
// clone, and state moved through files.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "test_utils.h"
#include "torch_batchnorm/torch_batchnorm.h"

namespace {

using tbn_test::all_close;
using tbn_test::identical;
using tbn_test::throws_c10_error;

// Variations from torch's module tests (torch/testing/_internal/common_modules.py).
std::vector<std::pair<std::string, torch_batchnorm::BatchNormOptions>> option_variants(int64_t c) {
  using Options = torch_batchnorm::BatchNormOptions;
  return {
      {"default", Options(c)},
      {"momentum=None", Options(c).momentum(std::nullopt)},
      {"affine=false eps=1e-3 momentum=0.3", Options(c).affine(false).eps(1e-3).momentum(0.3)},
      {"track_running_stats=false", Options(c).track_running_stats(false)},
      {"momentum=0.8", Options(c).momentum(0.8)},
  };
}

template <typename Ours, typename Theirs>
struct Pair {
  Ours ours;
  Theirs theirs;
};

// Buffers and parameters of both, by name: the same names hold the same values (b's
// converted to a's dtype, for a float64 reference).
template <typename A, typename B>
void expect_same_state(const A& a, const B& b, const std::string& what) {
  const auto like = tbn_test::as_dtype_of;
  const auto pa = a->named_parameters();
  const auto pb = b->named_parameters();
  ASSERT_EQ(pa.keys(), pb.keys()) << what;
  for (const auto& item : pa) {
    const at::Tensor& mine = item.value();
    const at::Tensor& theirs = pb[item.key()];
    EXPECT_TRUE(all_close(mine, like(theirs, mine))) << what << ": " << item.key();
    if (mine.grad().defined() || theirs.grad().defined()) {
      EXPECT_TRUE(all_close(mine.grad(), like(theirs.grad(), mine)))
          << what << ": grad of " << item.key();
    }
  }
  const auto ba = a->named_buffers();
  const auto bb = b->named_buffers();
  ASSERT_EQ(ba.keys(), bb.keys()) << what;
  for (const auto& item : ba) {
    EXPECT_TRUE(all_close(item.value(), like(bb[item.key()], item.value())))
        << what << ": " << item.key();
  }
}

// Copies a's parameters and buffers into b's, converting dtypes.
template <typename A, typename B>
void copy_state(const A& a, B& b) {
  torch::NoGradGuard no_grad;
  const auto pa = a->named_parameters();
  for (auto& item : b->named_parameters()) {
    item.value().copy_(pa[item.key()]);
  }
  const auto ba = a->named_buffers();
  for (auto& item : b->named_buffers()) {
    item.value().copy_(ba[item.key()]);
  }
}

struct InputSpec {
  std::vector<int64_t> shape;
  bool channels_last;
};

at::Tensor make_input(const InputSpec& spec, at::ScalarType dtype, at::Device device) {
  at::Tensor x = torch::randn(spec.shape, torch::kDouble).mul_(1.5).add_(0.3).to(device, dtype);
  if (spec.channels_last) {
    x = x.contiguous(x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                  : at::MemoryFormat::ChannelsLast);
  }
  return x;
}

struct Dtypes {
  at::ScalarType input;
  at::ScalarType module;
};

// Three training steps, evaluation, then training again: each step compares outputs,
// input gradients, parameter gradients and buffers with torch's module. For half/bfloat16
// modules the reference is torch's module in float64 (see needs_float64_reference),
// started from our state at every step so that only the step itself is compared.
template <typename Ours, typename Theirs>
void expect_module_parity(const std::vector<InputSpec>& inputs, at::Device device) {
  const std::vector<Dtypes> dtypes = {{at::kFloat, at::kFloat},
                                      {at::kDouble, at::kDouble},
                                      {at::kBFloat16, at::kBFloat16},
                                      {at::kBFloat16, at::kFloat}};
  for (const InputSpec& spec : inputs) {
    for (const auto& [label, options] : option_variants(spec.shape[1])) {
      for (const Dtypes d : dtypes) {
        std::ostringstream trace;
        trace << at::IntArrayRef(spec.shape) << (spec.channels_last ? " channels_last " : " ")
              << label << " input " << d.input << " module " << d.module;
        SCOPED_TRACE(trace.str());
        const bool float64_ref =
            d.input == d.module && (d.input == at::kBFloat16 || d.input == at::kHalf);
        Ours ours(options);
        Theirs theirs(options);
        ours->to(device, d.module);
        theirs->to(device, float64_ref ? at::kDouble : d.module);
        const auto like = tbn_test::as_dtype_of;
        for (int step = 0; step < 5; ++step) {
          const bool training = step != 3;
          ours->train(training);
          theirs->train(training);
          if (float64_ref) {
            copy_state(ours, theirs);
          }
          const at::Tensor x = make_input(spec, d.input, device);
          const at::Tensor xa = x.clone().requires_grad_();
          const at::Tensor xb = (float64_ref ? x.to(at::kDouble) : x.clone()).requires_grad_();
          ours->zero_grad();
          theirs->zero_grad();
          const at::Tensor out = ours(xa);
          const at::Tensor expected = theirs(xb);
          const std::string what = "step " + std::to_string(step);
          EXPECT_TRUE(all_close(out, like(expected, out))) << what;
          EXPECT_EQ(out.suggest_memory_format(), x.suggest_memory_format()) << what;
          const at::Tensor grad_out = torch::randn_like(out, at::MemoryFormat::Preserve);
          out.backward(grad_out);
          expected.backward(like(grad_out, expected));
          EXPECT_TRUE(all_close(xa.grad(), like(xb.grad(), xa))) << what << ": grad input";
          expect_same_state(ours, theirs, what);
        }
      }
    }
  }
}

class ModuleParity : public tbn_test::DeviceTest {};
TBN_INSTANTIATE_DEVICE_TESTS(ModuleParity);

TEST_P(ModuleParity, BatchNorm1d) {
  torch::manual_seed(0);
  expect_module_parity<torch_batchnorm::BatchNorm1d, torch::nn::BatchNorm1d>(
      {{{4, 10}, false}, {{4, 5, 3}, false}}, device());
}

TEST_P(ModuleParity, BatchNorm2d) {
  torch::manual_seed(1);
  expect_module_parity<torch_batchnorm::BatchNorm2d, torch::nn::BatchNorm2d>(
      {{{2, 3, 6, 6}, false}, {{2, 3, 6, 6}, true}, {{4, 9, 1, 1}, true}}, device());
}

TEST_P(ModuleParity, BatchNorm3d) {
  torch::manual_seed(2);
  expect_module_parity<torch_batchnorm::BatchNorm3d, torch::nn::BatchNorm3d>(
      {{{2, 3, 4, 4, 4}, false}, {{2, 3, 4, 4, 4}, true}}, device());
}

// A small conv net trained with SGD: the same losses, parameters and buffers as the net
// built with torch::nn::BatchNorm2d, step by step and then in evaluation.
TEST_P(ModuleParity, TrainsLikeTorchInAConvNet) {
  torch::manual_seed(3);
  const auto make = [](auto bn1, auto bn2) {
    return torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 6, 3).padding(1)),
                                 bn1,
                                 torch::nn::ReLU(),
                                 torch::nn::Conv2d(torch::nn::Conv2dOptions(6, 4, 3).stride(2)),
                                 bn2,
                                 torch::nn::Flatten(),
                                 torch::nn::Linear(4 * 3 * 3, 2));
  };
  auto ours = make(torch_batchnorm::BatchNorm2d(6), torch_batchnorm::BatchNorm2d(4));
  auto theirs = make(torch::nn::BatchNorm2d(6), torch::nn::BatchNorm2d(4));
  {
    torch::NoGradGuard no_grad;
    const auto src = ours->named_parameters();
    for (auto& item : theirs->named_parameters()) {
      item.value().copy_(src[item.key()]);
    }
  }
  ours->to(device());
  theirs->to(device());
  torch::optim::SGD opt_ours(ours->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD opt_theirs(theirs->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  const auto opts = torch::TensorOptions().device(device());
  for (int step = 0; step < 5; ++step) {
    const at::Tensor x =
        torch::randn({8, 3, 7, 7}, opts).contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor target = torch::randint(0, 2, {8}, opts.dtype(torch::kLong));
    opt_ours.zero_grad();
    opt_theirs.zero_grad();
    const at::Tensor loss_ours = torch::nn::functional::cross_entropy(ours->forward(x), target);
    const at::Tensor loss_theirs = torch::nn::functional::cross_entropy(theirs->forward(x), target);
    EXPECT_TRUE(all_close(loss_ours, loss_theirs)) << "step " << step;
    loss_ours.backward();
    loss_theirs.backward();
    expect_same_state(ours, theirs, "step " + std::to_string(step));
    opt_ours.step();
    opt_theirs.step();
  }
  ours->eval();
  theirs->eval();
  const at::Tensor x = torch::randn({4, 3, 7, 7}, opts);
  EXPECT_TRUE(all_close(ours->forward(x), theirs->forward(x), {1e-5, 1e-5}));
}

// Parameters and buffers carry torch's names, so state moves between the two by name.
TEST(Module, NamesMatchTorch) {
  for (const auto& [label, options] : option_variants(3)) {
    SCOPED_TRACE(label);
    torch_batchnorm::BatchNorm2d ours(options);
    torch::nn::BatchNorm2d theirs(options);
    EXPECT_EQ(ours->named_parameters().keys(), theirs->named_parameters().keys());
    EXPECT_EQ(ours->named_buffers().keys(), theirs->named_buffers().keys());
    for (const auto& p : ours->parameters()) {
      EXPECT_TRUE(p.requires_grad());
    }
    EXPECT_EQ(ours->weight.defined(), options.affine());
    EXPECT_EQ(ours->num_batches_tracked.defined(), options.track_running_stats());
    if (options.track_running_stats()) {
      EXPECT_EQ(ours->num_batches_tracked.scalar_type(), torch::kLong);
      EXPECT_EQ(ours->num_batches_tracked.dim(), 0);
    }
  }
  EXPECT_EQ(torch_batchnorm::BatchNorm1d(4)->named_buffers().keys(),
            (std::vector<std::string>{"running_mean", "running_var", "num_batches_tracked"}));
}

// Wrong input dims are rejected before anything runs, with torch's words.
TEST(Module, InputDimErrors) {
  torch_batchnorm::BatchNorm1d bn1(3);
  torch_batchnorm::BatchNorm2d bn2(3);
  torch_batchnorm::BatchNorm3d bn3(3);
  EXPECT_TRUE(throws_c10_error([&] { bn1(torch::randn({2, 3, 4, 4})); },
                               "expected 2D or 3D input (got 4D input)"));
  EXPECT_TRUE(
      throws_c10_error([&] { bn1(torch::randn({3})); }, "expected 2D or 3D input (got 1D input)"));
  EXPECT_TRUE(
      throws_c10_error([&] { bn2(torch::randn({2, 3, 4})); }, "expected 4D input (got 3D input)"));
  EXPECT_TRUE(throws_c10_error([&] { bn2(torch::randn({2, 3, 4, 4, 4})); },
                               "expected 4D input (got 5D input)"));
  EXPECT_TRUE(throws_c10_error([&] { bn3(torch::randn({2, 3, 4, 4})); },
                               "expected 5D input (got 4D input)"));
  EXPECT_THROW(bn2(torch::randn({2, 3, 4})), c10::ValueError);
  for (const auto& buffers : {bn1->named_buffers(), bn2->named_buffers(), bn3->named_buffers()}) {
    EXPECT_EQ(buffers["num_batches_tracked"].item<int64_t>(), 0);
    EXPECT_TRUE(identical(buffers["running_mean"], torch::zeros({3})));
    EXPECT_TRUE(identical(buffers["running_var"], torch::ones({3})));
  }
}

// A wrong channel count or a batch of one throws c10::Error, and unlike
// torch::nn::BatchNorm2d (which counts the batch before the call fails) every buffer,
// num_batches_tracked included, stays as it was.
TEST(Module, RejectedInputChangesNoBuffer) {
  torch::manual_seed(4);
  torch_batchnorm::BatchNorm2d bn(torch_batchnorm::BatchNorm2dOptions(4).momentum(std::nullopt));
  bn(torch::randn({2, 4, 5, 5}));
  const auto before = bn->named_buffers();
  std::vector<at::Tensor> saved;
  for (const auto& b : before) {
    saved.push_back(b.value().clone());
  }
  EXPECT_TRUE(throws_c10_error([&] { bn(torch::randn({2, 3, 5, 5})); },
                               "running_mean should contain 3 elements not 4"));
  EXPECT_TRUE(throws_c10_error([&] { bn(torch::randn({1, 4, 1, 1})); },
                               "Expected more than 1 value per channel when training, got input "
                               "size torch.Size([1, 4, 1, 1])"));
  EXPECT_TRUE(
      throws_c10_error([&] { bn(torch::randn({2, 4, 5, 5}, torch::kDouble)); }, "same datatype"));
  size_t i = 0;
  for (const auto& b : bn->named_buffers()) {
    EXPECT_TRUE(identical(b.value(), saved[i++])) << b.key();
  }
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
  // In evaluation a batch of one is fine, as in torch.
  bn->eval();
  EXPECT_NO_THROW(bn(torch::randn({1, 4, 1, 1})));
}

// A module made in inference mode has an inference tensor for its count, which refuses an
// in-place update outside inference mode: torch's error, before any buffer changes.
TEST(Module, MadeInInferenceModeTrainedOutside) {
  torch_batchnorm::BatchNorm2d bn = [] {
    c10::InferenceMode inference;
    return torch_batchnorm::BatchNorm2d(3);
  }();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(throws_c10_error([&] { bn(torch::randn({4, 3, 2, 2})); },
                               "Inplace update to inference tensor outside InferenceMode"));
  EXPECT_TRUE(identical(bn->running_mean, torch::zeros({3})));
  EXPECT_TRUE(identical(bn->running_var, torch::ones({3})));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 0);
}

// momentum = nullopt: the running statistics are the plain average over the batches seen.
TEST(Module, CumulativeAverageWithoutMomentum) {
  torch::manual_seed(5);
  torch_batchnorm::BatchNorm1d bn(torch_batchnorm::BatchNorm1dOptions(3).momentum(std::nullopt));
  at::Tensor mean_sum = torch::zeros({3}, torch::kDouble);
  at::Tensor var_sum = torch::zeros({3}, torch::kDouble);
  const int steps = 6;
  for (int s = 0; s < steps; ++s) {
    const at::Tensor x = torch::randn({16, 3}, torch::kDouble).mul_(s + 1).add_(s);
    bn(x.to(torch::kFloat));
    mean_sum += x.to(torch::kFloat).to(torch::kDouble).mean(0);
    var_sum += x.to(torch::kFloat).to(torch::kDouble).var(0, /*unbiased=*/true);
  }
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), steps);
  EXPECT_TRUE(all_close(bn->running_mean, (mean_sum / steps).to(torch::kFloat), {1e-5, 1e-5}));
  // The first batch's momentum is 1, so the initial running_var of 1 drops out.
  EXPECT_TRUE(all_close(bn->running_var, (var_sum / steps).to(torch::kFloat), {1e-5, 1e-5}));
}

// train()/eval() select batch or running statistics exactly as torch's _BatchNorm.forward.
TEST(Module, TrainEvalSwitchesStatistics) {
  torch::manual_seed(6);
  torch_batchnorm::BatchNorm2d bn(3);
  for (int s = 0; s < 3; ++s) {
    bn(torch::randn({4, 3, 5, 5}).mul_(2).add_(1));
  }
  {
    torch::NoGradGuard no_grad;
    bn->weight.uniform_(0.5, 1.5);
    bn->bias.uniform_(-1, 1);
  }
  bn->eval();
  const at::Tensor x = torch::randn({2, 3, 5, 5});
  const at::Tensor mean = bn->running_mean.clone();
  const at::Tensor var = bn->running_var.clone();
  const at::Tensor out = bn(x);
  const auto per_channel = [](const at::Tensor& t) { return t.view({1, -1, 1, 1}); };
  const at::Tensor expected =
      (x - per_channel(mean)) / per_channel((var + 1e-5).sqrt()) * per_channel(bn->weight) +
      per_channel(bn->bias);
  EXPECT_TRUE(all_close(out, expected));
  EXPECT_TRUE(identical(bn->running_mean, mean));
  EXPECT_TRUE(identical(bn->running_var, var));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 3);

  // Without running statistics, evaluation normalises with the batch's own.
  torch_batchnorm::BatchNorm2d untracked(
      torch_batchnorm::BatchNorm2dOptions(3).track_running_stats(false));
  untracked->eval();
  const at::Tensor batch_mean = x.mean({0, 2, 3}, true);
  const at::Tensor batch_var = x.var({0, 2, 3}, /*unbiased=*/false, /*keepdim=*/true);
  EXPECT_TRUE(all_close(untracked(x), (x - batch_mean) / (batch_var + 1e-5).sqrt()));
}

// A frozen module in training mode computes what torch's module computes in evaluation,
// gradients included, and keeps its buffers; train() does not unfreeze it.
TEST(Module, FrozenNormalisesAsInEvaluation) {
  torch::manual_seed(10);
  for (const auto& [label, options] : option_variants(3)) {
    SCOPED_TRACE(label);
    torch_batchnorm::BatchNorm2d ours(options);
    torch::nn::BatchNorm2d theirs(options);
    ours(torch::randn({4, 3, 5, 5}).mul_(2).add_(1));
    copy_state(ours, theirs);
    ours->freeze();
    ours->train();
    theirs->eval();
    EXPECT_TRUE(ours->is_frozen());
    const std::vector<at::Tensor> buffers = [&] {
      std::vector<at::Tensor> copies;
      for (const auto& b : ours->buffers()) {
        copies.push_back(b.clone());
      }
      return copies;
    }();
    for (int step = 0; step < 2; ++step) {
      const at::Tensor xa = torch::randn({4, 3, 5, 5}).requires_grad_();
      const at::Tensor xb = xa.detach().clone().requires_grad_();
      ours->zero_grad();
      theirs->zero_grad();
      const at::Tensor out = ours(xa);
      const at::Tensor expected = theirs(xb);
      EXPECT_TRUE(all_close(out, expected));
      const at::Tensor grad_out = torch::randn_like(out);
      out.backward(grad_out);
      expected.backward(grad_out);
      EXPECT_TRUE(all_close(xa.grad(), xb.grad()));
      expect_same_state(ours, theirs, "step " + std::to_string(step));
    }
    const auto now = ours->buffers();
    ASSERT_EQ(now.size(), buffers.size());
    for (size_t i = 0; i < now.size(); ++i) {
      EXPECT_TRUE(identical(now[i], buffers[i])) << i;
    }
    // Unfrozen, it trains again.
    ours->freeze(false);
    EXPECT_FALSE(ours->is_frozen());
    if (options.track_running_stats()) {
      ours(torch::randn({4, 3, 5, 5}));
      EXPECT_EQ(ours->num_batches_tracked.item<int64_t>(), 2);
    }
  }
}

TEST(Module, ResetRunningStatsAndParameters) {
  torch::manual_seed(7);
  torch_batchnorm::BatchNorm3d bn(2);
  bn(torch::randn({2, 2, 3, 3, 3}));
  {
    torch::NoGradGuard no_grad;
    bn->weight.fill_(3);
    bn->bias.fill_(-2);
  }
  bn->reset_running_stats();
  EXPECT_TRUE(identical(bn->running_mean, torch::zeros({2})));
  EXPECT_TRUE(identical(bn->running_var, torch::ones({2})));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 0);
  EXPECT_TRUE(identical(bn->weight, torch::full({2}, 3.0)));
  bn->reset_parameters();
  EXPECT_TRUE(identical(bn->weight, torch::ones({2})));
  EXPECT_TRUE(identical(bn->bias, torch::zeros({2})));
  // Neither touches what the module does not have.
  torch_batchnorm::BatchNorm3d bare(
      torch_batchnorm::BatchNorm3dOptions(2).affine(false).track_running_stats(false));
  EXPECT_NO_THROW(bare->reset_parameters());
}

// pretty_print reads as torch::nn's, under this library's name.
TEST(Module, PrettyPrint) {
  const auto text = [](const torch::nn::Module& m) {
    std::ostringstream ss;
    m.pretty_print(ss);
    return ss.str();
  };
  EXPECT_EQ(text(*torch_batchnorm::BatchNorm2d(3)),
            "torch_batchnorm::BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=true, "
            "track_running_stats=true)");
  EXPECT_EQ(text(*torch_batchnorm::BatchNorm1d(
                torch_batchnorm::BatchNorm1dOptions(5).momentum(std::nullopt).affine(false))),
            "torch_batchnorm::BatchNorm1d(5, eps=1e-05, momentum=None, affine=false, "
            "track_running_stats=true)");
  for (const auto& [label, options] : option_variants(7)) {
    std::string theirs = text(*torch::nn::BatchNorm3d(options));
    theirs.replace(0, std::string("torch::nn::").size(), "torch_batchnorm::");
    EXPECT_EQ(text(*torch_batchnorm::BatchNorm3d(options)), theirs) << label;
  }
  torch_batchnorm::BatchNorm2d frozen(3);
  frozen->freeze();
  EXPECT_EQ(text(*frozen),
            "torch_batchnorm::BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=true, "
            "track_running_stats=true, frozen=true)");
  std::ostringstream ss;
  ss << torch::nn::Sequential(torch_batchnorm::BatchNorm2d(2));
  EXPECT_NE(ss.str().find("(0): torch_batchnorm::BatchNorm2d(2, eps=1e-05"), std::string::npos)
      << ss.str();
}

// clone() is a deep copy: equal values, own storage, same modes; also inside a container.
TEST(Module, Clone) {
  torch::manual_seed(8);
  torch_batchnorm::BatchNorm2d bn(torch_batchnorm::BatchNorm2dOptions(3).momentum(0.3));
  bn(torch::randn({4, 3, 2, 2}));
  bn->eval();
  bn->freeze();
  auto copy = std::dynamic_pointer_cast<torch_batchnorm::BatchNorm2dImpl>(bn->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_FALSE(copy->is_training());
  EXPECT_TRUE(copy->is_frozen());
  copy->freeze(false);
  EXPECT_EQ(copy->options.momentum(), 0.3);
  for (const auto& item : bn->named_buffers()) {
    const at::Tensor other = copy->named_buffers()[item.key()];
    EXPECT_TRUE(identical(other, item.value())) << item.key();
    EXPECT_NE(other.data_ptr(), item.value().data_ptr()) << item.key();
  }
  EXPECT_NE(copy->weight.data_ptr(), bn->weight.data_ptr());
  // The members point at the registered tensors of the copy, not of the original.
  EXPECT_EQ(copy->running_mean.data_ptr(), copy->named_buffers()["running_mean"].data_ptr());
  copy->train();
  copy->forward(torch::randn({4, 3, 2, 2}));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
  EXPECT_EQ(copy->num_batches_tracked.item<int64_t>(), 2);

  torch::nn::Sequential seq(torch::nn::Conv2d(3, 3, 1), torch_batchnorm::BatchNorm2d(3));
  auto seq_copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(seq->clone());
  ASSERT_NE(seq_copy, nullptr);
  EXPECT_NE(seq_copy->ptr(1)->as<torch_batchnorm::BatchNorm2dImpl>(), nullptr);
  EXPECT_EQ(seq_copy->named_buffers().keys(), seq->named_buffers().keys());
}

// Options are torch's own type: the same object builds either module, and the holder
// takes a bare channel count.
TEST(Module, OptionsAreTorchs) {
  const torch::nn::BatchNorm2dOptions options =
      torch::nn::BatchNorm2dOptions(5).eps(1e-3).affine(false);
  torch_batchnorm::BatchNorm2d bn(options);
  EXPECT_EQ(bn->options.num_features(), 5);
  EXPECT_EQ(bn->options.eps(), 1e-3);
  EXPECT_FALSE(bn->weight.defined());
  torch_batchnorm::BatchNorm2d from_count(5);
  EXPECT_EQ(from_count->options.momentum(), 0.1);
  // Changing eps after construction takes effect, as documented for torch's options.
  torch::manual_seed(9);
  const at::Tensor x = torch::randn({3, 5, 2, 2});
  from_count->options.eps(0.5);
  torch::nn::BatchNorm2d theirs(torch::nn::BatchNorm2dOptions(5).eps(0.5));
  EXPECT_TRUE(all_close(from_count(x), theirs(x)));
}

// A path in the test's temporary directory, removed at scope exit.
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name)
      : path((std::filesystem::temp_directory_path() /
              ("tbn_test_" + std::to_string(::getpid()) + "_" + name))
                 .string()) {}
  ~TempFile() {
    std::remove(path.c_str());
  }
};

// save_state_dict/load_state_dict: a round trip restores every parameter and buffer, a
// module of torch's own BatchNorm2d loads the same file, and a file that does not fit
// throws c10::Error before anything is changed.
TEST(StateDict, RoundTripAndErrors) {
  torch::manual_seed(10);
  const auto make = [](auto bn) {
    return torch::nn::Sequential(torch::nn::Conv2d(2, 3, 1), bn, torch::nn::ReLU());
  };
  auto trained = make(torch_batchnorm::BatchNorm2d(3));
  for (int s = 0; s < 3; ++s) {
    trained->forward(torch::randn({4, 2, 3, 3}));
  }
  const TempFile file("state.pt");
  torch_batchnorm::save_state_dict(*trained, file.path);

  auto fresh = make(torch_batchnorm::BatchNorm2d(3));
  auto torch_fresh = make(torch::nn::BatchNorm2d(3));
  torch_batchnorm::load_state_dict(*fresh, file.path);
  torch_batchnorm::load_state_dict(*torch_fresh, file.path);
  expect_same_state(fresh, trained, "ours");
  expect_same_state(torch_fresh, trained, "torch's");
  EXPECT_EQ(fresh->named_buffers()["1.num_batches_tracked"].item<int64_t>(), 3);

  // A module with one more BatchNorm: missing keys, and nothing copied.
  auto bigger = torch::nn::Sequential(torch::nn::Conv2d(2, 3, 1),
                                      torch_batchnorm::BatchNorm2d(3),
                                      torch::nn::ReLU(),
                                      torch_batchnorm::BatchNorm2d(3));
  const at::Tensor conv_before = bigger->named_parameters()["0.weight"].clone();
  EXPECT_TRUE(throws_c10_error(
      [&] { torch_batchnorm::load_state_dict(*bigger, file.path); },
      "Missing key(s) in state_dict: \"3.weight\", \"3.bias\", \"3.running_mean\", "
      "\"3.running_var\". "));
  EXPECT_TRUE(identical(bigger->named_parameters()["0.weight"], conv_before));
  EXPECT_NO_THROW(torch_batchnorm::load_state_dict(*bigger, file.path, /*strict=*/false));
  // Without affine: unexpected keys.
  auto no_affine =
      make(torch_batchnorm::BatchNorm2d(torch_batchnorm::BatchNorm2dOptions(3).affine(false)));
  EXPECT_TRUE(throws_c10_error([&] { torch_batchnorm::load_state_dict(*no_affine, file.path); },
                               "Unexpected key(s) in state_dict: \"1.weight\", \"1.bias\"."));
  // Other channel count: size mismatch, even when not strict; nothing is copied.
  auto wider = torch::nn::Sequential(
      torch::nn::Conv2d(2, 3, 1), torch_batchnorm::BatchNorm2d(4), torch::nn::ReLU());
  {
    torch::NoGradGuard no_grad;
    wider->named_parameters()["0.weight"].fill_(7);
  }
  EXPECT_TRUE(throws_c10_error(
      [&] { torch_batchnorm::load_state_dict(*wider, file.path, /*strict=*/false); },
      "size mismatch for 1.running_mean: copying a param with shape [3] from checkpoint, the "
      "shape in current model is [4]."));
  EXPECT_TRUE(identical(wider->named_parameters()["0.weight"], torch::full({3, 2, 1, 1}, 7.0)));
  EXPECT_TRUE(throws_c10_error(
      [&] { torch_batchnorm::load_state_dict(*fresh, file.path + ".missing"); }, "cannot open"));
}

// A state without num_batches_tracked (saved before the buffer existed) loads strictly
// and leaves the module's count as it was, as Python's load_state_dict does.
TEST(StateDict, CountMayBeAbsent) {
  torch::manual_seed(11);
  torch::nn::Module old;
  old.register_parameter("weight", torch::rand({3}));
  old.register_parameter("bias", torch::randn({3}));
  old.register_buffer("running_mean", torch::randn({3}));
  old.register_buffer("running_var", torch::rand({3}) + 0.5);
  const TempFile file("old_state.pt");
  torch_batchnorm::save_state_dict(old, file.path);

  torch_batchnorm::BatchNorm2d bn(3);
  bn->num_batches_tracked.fill_(4);
  torch_batchnorm::load_state_dict(*bn, file.path);
  EXPECT_TRUE(identical(bn->running_mean, old.named_buffers()["running_mean"]));
  EXPECT_TRUE(identical(bn->weight, old.named_parameters()["weight"]));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 4);
}

}  // namespace
