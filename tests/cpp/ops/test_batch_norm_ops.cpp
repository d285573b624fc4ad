// The functional form and the operators from C++, against at::batch_norm and
// at::native_batch_norm: forward, backward through autograd, running statistics, the
// dtype and layout matrix, and the errors.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <array>
#include <optional>
#include <sstream>
#include <vector>

#include "test_utils.h"
#include "torch_batchnorm/functional.h"

namespace {

using tbn_test::all_close;
using tbn_test::identical;
using tbn_test::throws_c10_error;

at::MemoryFormat channels_last_for(int64_t dim) {
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Random input of `shape` in `dtype`, laid out channels-last when asked.
at::Tensor make_input(at::IntArrayRef shape,
                      at::ScalarType dtype,
                      bool channels_last,
                      at::Device device) {
  at::Tensor x = at::randn(shape, at::kDouble).mul_(2).add_(0.5).to(device, dtype);
  return channels_last ? x.contiguous(channels_last_for(x.dim())) : x;
}

struct Layout {
  std::vector<int64_t> shape;
  bool channels_last;
};

// torch's test matrix: 2D (channels-last in disguise), 3D, 4D and 5D, size-1 spatial
// and channel dims, contiguous and channels-last.
const std::vector<Layout>& layouts() {
  static const std::vector<Layout> all = {
      {{4, 10}, false},
      {{4, 5, 3}, false},
      {{2, 3, 6, 6}, false},
      {{2, 3, 6, 6}, true},
      {{3, 2, 3, 4}, false},
      {{3, 2, 3, 4}, true},
      {{4, 9, 1, 1}, true},
      {{4, 1, 9, 9}, true},
      {{2, 3, 4, 4, 4}, false},
      {{2, 3, 4, 4, 4}, true},
  };
  return all;
}

struct Dtypes {
  at::ScalarType input;
  at::ScalarType params;
};

// Same dtype throughout, and "mixed": reduced-precision input with float parameters.
const std::vector<Dtypes>& dtype_pairs() {
  static const std::vector<Dtypes> all = {
      {at::kFloat, at::kFloat},
      {at::kDouble, at::kDouble},
      {at::kBFloat16, at::kBFloat16},
      {at::kBFloat16, at::kFloat},
      {at::kHalf, at::kHalf},
      {at::kHalf, at::kFloat},
  };
  return all;
}

struct Args {
  at::Tensor input;
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor running_mean;
  at::Tensor running_var;
};

Args make_args(const Layout& layout, Dtypes dtypes, bool affine, bool running, at::Device device) {
  Args a;
  const int64_t c = layout.shape[1];
  const auto popts = at::TensorOptions().dtype(dtypes.params).device(device);
  a.input = make_input(layout.shape, dtypes.input, layout.channels_last, device);
  if (affine) {
    a.weight = at::rand({c}, at::kDouble).add_(0.5).to(popts);
    a.bias = at::randn({c}, at::kDouble).to(popts);
  }
  if (running) {
    a.running_mean = at::randn({c}, at::kDouble).mul_(0.1).to(popts);
    a.running_var = at::rand({c}, at::kDouble).add_(0.5).to(popts);
  }
  return a;
}

// A deep copy with its own autograd leaves.
Args clone_args(const Args& a) {
  const auto leaf = [](const at::Tensor& t) {
    return t.defined() ? t.detach().clone(at::MemoryFormat::Preserve).requires_grad_() : t;
  };
  const auto copy = [](const at::Tensor& t) { return t.defined() ? t.clone() : t; };
  return {leaf(a.input), leaf(a.weight), leaf(a.bias), copy(a.running_mean), copy(a.running_var)};
}

std::string describe(const Layout& l, Dtypes d, bool affine, bool running, bool training) {
  std::ostringstream ss;
  ss << "shape " << at::IntArrayRef(l.shape) << (l.channels_last ? " channels_last" : "")
     << " input " << d.input << " params " << d.params << " affine " << affine << " running "
     << running << (training ? " training" : " eval");
  return ss.str();
}

// Args in float64, for the reference of calls where torch rounds its statistics.
Args to_double(const Args& a) {
  const auto d = [](const at::Tensor& t) { return t.defined() ? t.to(at::kDouble) : t; };
  return {d(a.input), d(a.weight), d(a.bias), d(a.running_mean), d(a.running_var)};
}

// Ours and torch's on `x` with the parameters and running statistics of `a`.
at::Tensor run_ours(
    const Args& a, const at::Tensor& x, bool training, double momentum, double eps) {
  return torch_batchnorm::batch_norm(
      x, a.weight, a.bias, a.running_mean, a.running_var, training, momentum, eps);
}

at::Tensor run_torch(
    const Args& a, const at::Tensor& x, bool training, double momentum, double eps) {
  return at::batch_norm(x,
                        a.weight,
                        a.bias,
                        a.running_mean,
                        a.running_var,
                        training,
                        momentum,
                        eps,
                        /*cudnn_enabled=*/false);
}

// One call of ours and of at::batch_norm on copies of the same arguments, then backward
// with the same grad_out: outputs, output layout, running statistics and gradients agree.
void expect_parity(const Args& args, bool training, double momentum, double eps) {
  const bool float64_ref = tbn_test::needs_float64_reference(
      args.input, {args.weight, args.bias, args.running_mean, args.running_var});
  Args ours = clone_args(args);
  Args ref = clone_args(float64_ref ? to_double(args) : args);
  const at::Tensor out = run_ours(ours, ours.input, training, momentum, eps);
  const at::Tensor expected = run_torch(ref, ref.input, training, momentum, eps);
  const auto like = tbn_test::as_dtype_of;
  EXPECT_TRUE(all_close(out, like(expected, out))) << "output";
  EXPECT_EQ(out.suggest_memory_format(), args.input.suggest_memory_format()) << "layout";
  EXPECT_TRUE(all_close(ours.running_mean, like(ref.running_mean, ours.running_mean)))
      << "running_mean";
  EXPECT_TRUE(all_close(ours.running_var, like(ref.running_var, ours.running_var)))
      << "running_var";

  const at::Tensor grad_out = at::randn_like(out, at::MemoryFormat::Preserve);
  out.backward(grad_out);
  expected.backward(like(grad_out, expected));
  EXPECT_TRUE(all_close(ours.input.grad(), like(ref.input.grad(), ours.input))) << "grad input";
  if (args.weight.defined()) {
    EXPECT_TRUE(all_close(ours.weight.grad(), like(ref.weight.grad(), ours.weight)))
        << "grad weight";
    EXPECT_TRUE(all_close(ours.bias.grad(), like(ref.bias.grad(), ours.bias))) << "grad bias";
  }
}

class FunctionalParity : public tbn_test::DeviceTest {};
TBN_INSTANTIATE_DEVICE_TESTS(FunctionalParity);

TEST_P(FunctionalParity, ForwardBackwardMatrix) {
  at::manual_seed(0);
  for (const Layout& layout : layouts()) {
    for (const Dtypes dtypes : dtype_pairs()) {
      for (const bool training : {true, false}) {
        for (const bool affine : {true, false}) {
          // Training may go without running statistics; evaluation needs them.
          for (const bool running :
               training ? std::vector<bool>{true, false} : std::vector<bool>{true}) {
            SCOPED_TRACE(describe(layout, dtypes, affine, running, training));
            expect_parity(
                make_args(layout, dtypes, affine, running, device()), training, 0.1, 1e-5);
          }
        }
      }
    }
  }
}

// The running statistics over several steps, with torch's odd momentum values and eps,
// then an evaluation step that reads them.
TEST_P(FunctionalParity, RunningStatsOverSteps) {
  at::manual_seed(1);
  for (const Layout& layout : {Layout{{8, 6}, false}, Layout{{4, 6, 5, 5}, true}}) {
    for (const Dtypes dtypes :
         {Dtypes{at::kFloat, at::kFloat}, Dtypes{at::kBFloat16, at::kFloat}}) {
      for (const double momentum : {0.1, 0.0, 0.5, 1.0, -1.2}) {
        for (const double eps : {1e-5, 0.5}) {
          SCOPED_TRACE(describe(layout, dtypes, true, true, true) + " momentum " +
                       std::to_string(momentum) + " eps " + std::to_string(eps));
          Args ours = make_args(layout, dtypes, true, true, device());
          Args ref = clone_args(ours);
          for (int step = 0; step < 4; ++step) {
            const bool training = step < 3;
            const at::Tensor x =
                make_input(layout.shape, dtypes.input, layout.channels_last, device());
            const at::Tensor out = run_ours(ours, x, training, momentum, eps);
            const at::Tensor expected = run_torch(ref, x, training, momentum, eps);
            EXPECT_TRUE(all_close(out, expected)) << "step " << step;
            EXPECT_TRUE(all_close(ours.running_mean, ref.running_mean)) << "step " << step;
            EXPECT_TRUE(all_close(ours.running_var, ref.running_var)) << "step " << step;
          }
        }
      }
    }
  }
}

TEST_P(FunctionalParity, ZeroBatchAndNonContiguousInput) {
  at::manual_seed(2);
  // A zero-element batch: empty output, running statistics as torch leaves them.
  for (const bool training : {true, false}) {
    SCOPED_TRACE(training);
    Args args = make_args({{0, 5, 9}, false}, {at::kFloat, at::kFloat}, true, true, device());
    expect_parity(args, training, 0.1, 1e-5);
  }
  // Views that are neither contiguous nor channels-last.
  const at::Tensor base = at::randn({6, 4, 5, 3}, at::TensorOptions().device(device()));
  for (const at::Tensor& view :
       {base.transpose(2, 3), base.slice(0, 0, 6, 2), base.permute({0, 1, 3, 2}).slice(2, 1)}) {
    Args args = make_args({{6, 4}, false}, {at::kFloat, at::kFloat}, true, true, device());
    args.input = view;
    expect_parity(args, true, 0.1, 1e-5);
    expect_parity(args, false, 0.1, 1e-5);
  }
}

// Gradients only for what requires grad, and the running-statistics versions bumped as
// at::batch_norm bumps them, so stale saved copies are caught by autograd.
TEST_P(FunctionalParity, PartialGradientsAndVersionCounters) {
  at::manual_seed(3);
  Args args = make_args({{4, 3, 5}, false}, {at::kFloat, at::kFloat}, true, true, device());
  Args ours = clone_args(args);
  Args ref = clone_args(args);
  ours.input.requires_grad_(false);
  ref.input.requires_grad_(false);
  const auto v_mean = ours.running_mean._version();
  const at::Tensor out = run_ours(ours, ours.input, true, 0.1, 1e-5);
  EXPECT_GT(ours.running_mean._version(), v_mean);
  const at::Tensor expected = run_torch(ref, ref.input, true, 0.1, 1e-5);
  const auto grads = torch::autograd::grad({out.sum()}, {ours.weight, ours.bias});
  const auto ref_grads = torch::autograd::grad({expected.sum()}, {ref.weight, ref.bias});
  EXPECT_TRUE(all_close(grads[0], ref_grads[0]));
  EXPECT_TRUE(all_close(grads[1], ref_grads[1]));
  EXPECT_FALSE(ours.input.grad().defined());

  // A bias without a weight, with and without running statistics: the bias still gets
  // its gradient (autograd numbers only the tensors that are present).
  for (const bool running : {true, false}) {
    SCOPED_TRACE(running);
    Args a = clone_args(args);
    a.weight = at::Tensor();
    if (!running) {
      a.running_mean = at::Tensor();
      a.running_var = at::Tensor();
    }
    Args r = clone_args(a);
    const at::Tensor o = run_ours(a, a.input, true, 0.1, 1e-5);
    const at::Tensor e = run_torch(r, r.input, true, 0.1, 1e-5);
    const at::Tensor g = at::randn_like(e);
    o.backward(g);
    e.backward(g);
    EXPECT_TRUE(all_close(a.bias.grad(), r.bias.grad()));
    EXPECT_TRUE(all_close(a.input.grad(), r.input.grad()));
  }
}

// Second derivatives (a graph of the backward, differentiated again) as at::batch_norm's:
// in training through the batch statistics, in evaluation through the running ones.
TEST_P(FunctionalParity, SecondDerivatives) {
  at::manual_seed(6);
  const Args args =
      make_args({{4, 3, 5}, false}, {at::kDouble, at::kDouble}, true, true, device());
  for (const bool training : {true, false}) {
    SCOPED_TRACE(training);
    const auto second = [&](const Args& a, const at::Tensor& out) {
      const at::Tensor grad_input = torch::autograd::grad(
          {out.pow(3).sum()}, {a.input}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
      return torch::autograd::grad({grad_input.pow(2).sum()}, {a.input, a.weight});
    };
    const Args ours = clone_args(args);
    const Args ref = clone_args(args);
    const auto actual = second(ours, run_ours(ours, ours.input, training, 0.1, 1e-5));
    const auto expected = second(ref, run_torch(ref, ref.input, training, 0.1, 1e-5));
    EXPECT_TRUE(all_close(actual[0], expected[0])) << "input";
    EXPECT_TRUE(all_close(actual[1], expected[1])) << "weight";
  }
}

// at::batch_norm's forward takes a weight and bias of any shape holding C values (its
// CPU backward then fails on them): outputs and gradients as with the same values flat,
// the gradients in the parameters' own shapes.
TEST_P(FunctionalParity, ParametersOfAnyShape) {
  at::manual_seed(8);
  const Args args = make_args({{4, 3, 5, 2}, false}, {at::kFloat, at::kFloat}, true, true,
                              device());
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{1, 3}, {1, 3, 1, 1}}) {
    for (const bool training : {true, false}) {
      SCOPED_TRACE(::testing::Message() << at::IntArrayRef(shape) << " training " << training);
      Args shaped = args;
      shaped.weight = args.weight.reshape(shape);
      shaped.bias = args.bias.reshape(shape);
      Args ours = clone_args(shaped);
      Args ref = clone_args(args);
      const at::Tensor out = run_ours(ours, ours.input, training, 0.1, 1e-5);
      const at::Tensor expected = run_torch(ref, ref.input, training, 0.1, 1e-5);
      EXPECT_TRUE(all_close(out, expected)) << "output";
      EXPECT_TRUE(all_close(ours.running_mean, ref.running_mean)) << "running_mean";
      EXPECT_TRUE(all_close(ours.running_var, ref.running_var)) << "running_var";
      const at::Tensor grad_out = at::randn_like(out);
      out.backward(grad_out);
      expected.backward(grad_out);
      EXPECT_TRUE(all_close(ours.input.grad(), ref.input.grad())) << "grad input";
      EXPECT_TRUE(all_close(ours.weight.grad(), ref.weight.grad().reshape(shape)))
          << "grad weight";
      EXPECT_TRUE(all_close(ours.bias.grad(), ref.bias.grad().reshape(shape))) << "grad bias";
    }
  }
}

// Under NoGradGuard and InferenceMode the call skips autograd and gives the same values.
TEST_P(FunctionalParity, NoGradAndInferenceMode) {
  at::manual_seed(4);
  const Args args = make_args({{4, 3, 6, 6}, true}, {at::kFloat, at::kFloat}, true, true, device());
  const at::Tensor expected = run_torch(clone_args(args), args.input, true, 0.1, 1e-5);
  {
    torch::NoGradGuard no_grad;
    const at::Tensor out = run_ours(clone_args(args), args.input, true, 0.1, 1e-5);
    EXPECT_FALSE(out.requires_grad());
    EXPECT_TRUE(all_close(out, expected));
  }
  {
    c10::InferenceMode guard;
    // Inference tensors throughout, as a program running under InferenceMode has.
    Args a = args;
    a.running_mean = args.running_mean.clone();
    a.running_var = args.running_var.clone();
    EXPECT_TRUE(all_close(run_ours(a, args.input.clone(), true, 0.1, 1e-5), expected));
  }
}

// torch::nn::functional-style overload: same values as the positional form.
TEST_P(FunctionalParity, FuncOptionsOverload) {
  at::manual_seed(5);
  const Args args =
      make_args({{4, 3, 6, 6}, false}, {at::kFloat, at::kFloat}, true, true, device());
  Args a = clone_args(args);
  Args b = clone_args(args);
  namespace F = torch_batchnorm::functional;
  const at::Tensor out = F::batch_norm(
      a.input,
      a.running_mean,
      a.running_var,
      F::BatchNormFuncOptions().weight(a.weight).bias(a.bias).training(true).momentum(0.3).eps(
          1e-3));
  EXPECT_TRUE(identical(out, run_ours(b, b.input, true, 0.3, 1e-3)));
  EXPECT_TRUE(identical(a.running_mean, b.running_mean));
  // The defaults are torch's: evaluation mode, so the running statistics normalise.
  const Args stats_only{a.input, {}, {}, a.running_mean, a.running_var};
  EXPECT_TRUE(all_close(F::batch_norm(a.input, a.running_mean, a.running_var),
                        run_torch(stats_only, a.input, false, 0.1, 1e-5)));
}

// The operators themselves: save_mean/save_invstd as at::native_batch_norm returns them
// (opmath dtype, [C] in training, empty in evaluation) and the backward operator's three
// gradients against at::native_batch_norm_backward.
TEST_P(FunctionalParity, OperatorsMatchNativeBatchNorm) {
  at::manual_seed(6);
  for (const Dtypes dtypes : {Dtypes{at::kFloat, at::kFloat},
                              Dtypes{at::kDouble, at::kDouble},
                              Dtypes{at::kBFloat16, at::kFloat}}) {
    for (const bool training : {true, false}) {
      const Layout layout{{4, 3, 5, 5}, true};
      SCOPED_TRACE(describe(layout, dtypes, true, true, training));
      const Args args = make_args(layout, dtypes, true, true, device());
      const at::Tensor rm = args.running_mean.clone();
      const at::Tensor rv = args.running_var.clone();
      const auto [out, save_mean, save_invstd] = torch_batchnorm::batch_norm_forward(
          args.input, args.weight, args.bias, rm, rv, training, 0.1, 1e-5);
      const at::Tensor ref_rm = args.running_mean.clone();
      const at::Tensor ref_rv = args.running_var.clone();
      const auto [ref_out, ref_mean, ref_invstd] = at::native_batch_norm(
          args.input, args.weight, args.bias, ref_rm, ref_rv, training, 0.1, 1e-5);
      EXPECT_TRUE(all_close(out, ref_out));
      EXPECT_EQ(save_mean.scalar_type(), at::toOpMathType(dtypes.input));
      EXPECT_EQ(save_mean.sizes(),
                at::IntArrayRef(training ? std::vector<int64_t>{3} : std::vector<int64_t>{0}));
      if (training) {
        EXPECT_TRUE(all_close(save_mean, ref_mean));
        EXPECT_TRUE(all_close(save_invstd, ref_invstd));
      }
      EXPECT_TRUE(all_close(rm, ref_rm));
      EXPECT_TRUE(all_close(rv, ref_rv));

      const at::Tensor grad_out = at::randn_like(ref_out);
      const auto backward = [&](std::array<bool, 3> mask) {
        return torch_batchnorm::batch_norm_backward(grad_out,
                                                    args.input,
                                                    args.weight,
                                                    rm,
                                                    rv,
                                                    save_mean,
                                                    save_invstd,
                                                    training,
                                                    1e-5,
                                                    mask);
      };
      const auto [gi, gw, gb] = backward({true, true, true});
      const auto [rgi, rgw, rgb] = at::native_batch_norm_backward(grad_out,
                                                                  args.input,
                                                                  args.weight,
                                                                  ref_rm,
                                                                  ref_rv,
                                                                  ref_mean,
                                                                  ref_invstd,
                                                                  training,
                                                                  1e-5,
                                                                  {true, true, true});
      EXPECT_TRUE(all_close(gi, rgi));
      EXPECT_TRUE(all_close(gw, rgw));
      EXPECT_TRUE(all_close(gb, rgb));
      // Masked-off gradients come back empty.
      const auto [only_gi, no_gw, no_gb] = backward({true, false, false});
      EXPECT_TRUE(all_close(only_gi, rgi));
      EXPECT_FALSE(no_gw.defined() && no_gw.numel() > 0);
      EXPECT_FALSE(no_gb.defined() && no_gb.numel() > 0);
    }
  }
}

// Every rejected call throws c10::Error (the subclass torch's Python layer maps to the
// same exception type) with torch's message, and leaves the running statistics untouched.
TEST_P(FunctionalParity, ErrorsThrowC10ErrorAndChangeNothing) {
  const auto opts = at::TensorOptions().device(device());
  const at::Tensor x = at::randn({4, 4, 3}, opts);
  const at::Tensor w = at::ones({4}, opts);
  const at::Tensor b = at::zeros({4}, opts);
  const at::Tensor rm = at::randn({4}, opts);
  const at::Tensor rv = at::rand({4}, opts).add_(1);
  const at::Tensor rm_before = rm.clone();
  const at::Tensor rv_before = rv.clone();
  const at::Tensor short_stat = at::zeros({3}, opts);

  struct BadCall {
    std::function<at::Tensor()> call;
    std::string message;
  };
  const std::vector<BadCall> cases = {
      {[&] { return torch_batchnorm::batch_norm(x, w, b, short_stat, rv, true, 0.1, 1e-5); },
       "running_mean should contain 4 elements not 3"},
      {[&] { return torch_batchnorm::batch_norm(x, w, b, rm, short_stat, true, 0.1, 1e-5); },
       "running_var should contain 4 elements not 3"},
      {[&] { return torch_batchnorm::batch_norm(x, short_stat, b, rm, rv, true, 0.1, 1e-5); },
       "weight should contain 4 elements not 3"},
      {[&] { return torch_batchnorm::batch_norm(x, w, short_stat, rm, rv, false, 0.1, 1e-5); },
       "bias should contain 4 elements not 3"},
      {[&] { return torch_batchnorm::batch_norm(x, w, b, {}, {}, false, 0.1, 1e-5); },
       "running_mean must be defined in evaluation mode"},
      {[&] { return torch_batchnorm::batch_norm(x, w, b, rm, {}, true, 0.1, 1e-5); },
       "running_mean and running_var must either both be None or neither be None"},
      {[&] {
         return torch_batchnorm::batch_norm(
             x.slice(0, 0, 1).slice(2, 0, 1), w, b, rm, rv, true, 0.1, 1e-5);
       },
       "Expected more than 1 value per channel when training, got input size "
       "torch.Size([1, 4, 1])"},
      {[&] { return torch_batchnorm::batch_norm(x, w, b, rm, rv, true, 0.1, 0.0); },
       "batch_norm eps must be positive during training, but got 0.0"},
      {[&] { return torch_batchnorm::batch_norm(x[0][0], w, b, rm, rv, true, 0.1, 1e-5); },
       "Dimension out of range"},
      {[&] {
         return torch_batchnorm::batch_norm(x.to(at::kLong), {}, {}, {}, {}, true, 0.1, 1e-5);
       },
       "\"batch_norm\" not implemented for 'Long'"},
      {[&] {
         return torch_batchnorm::batch_norm(x.to(at::kDouble), w, b, rm, rv, true, 0.1, 1e-5);
       },
       "all inputs must share same datatype"},
  };
  for (const BadCall& c : cases) {
    SCOPED_TRACE(c.message);
    EXPECT_TRUE(throws_c10_error([&] { c.call(); }, c.message));
    EXPECT_TRUE(identical(rm, rm_before));
    EXPECT_TRUE(identical(rv, rv_before));
  }
  // The exception classes torch uses, so Python sees ValueError/IndexError as with torch.
  EXPECT_THROW(
      torch_batchnorm::batch_norm(x.slice(0, 0, 1).slice(2, 0, 1), w, b, rm, rv, true, 0.1, 1e-5),
      c10::ValueError);
  EXPECT_THROW(torch_batchnorm::batch_norm(x[0][0], w, b, rm, rv, true, 0.1, 1e-5),
               c10::IndexError);
}

}  // namespace
