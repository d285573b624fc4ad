// The CUDA kernels' per-thread code (csrc/ops/cuda/batch_norm_thread.h) run on the CPU:
// every thread of every block of the launch shapes the host picks, one after another. The
// merges the kernels do across threads and blocks (warp shuffles, shared memory, the last
// block of a channel) are done here in thread and slice order instead. Training forward
// and backward and evaluation must give what the CPU kernels give, for every dtype, vector
// width and layout. No GPU needed.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/batch_norm_layout.h"
#include "ops/cuda/batch_norm_thread.h"
#include "test_utils.h"
#include "torch_batchnorm/ops.h"

namespace torch_batchnorm {
namespace cuda {
namespace {

using tbn_test::all_close;
using tbn_test::Tolerance;

// How closely the CUDA kernels agree with the CPU kernels (tests/python/test_cuda.py holds
// the same table): both accumulate in the same type, in different orders, so statistics
// agree to a few units in the last place of that type, outputs to one unit of a reduced
// dtype, and gradients, which sum products, a little less closely.
struct Agreement {
  Tolerance out;
  Tolerance stats;
  Tolerance grad;
};

Agreement agreement(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return {{1e-10, 1e-10}, {1e-12, 1e-12}, {1e-9, 1e-10}};
    case at::kFloat:
      return {{1e-5, 1e-5}, {1e-5, 1e-6}, {1e-4, 1e-5}};
    case at::kHalf:
      return {{1e-3, 1e-3}, {1e-5, 1e-6}, {2e-3, 2e-3}};
    default:
      return {{8e-3, 8e-3}, {1e-5, 1e-6}, {1.6e-2, 1.6e-2}};
  }
}

// Waves of 1 (every channel in one block, the fused kernel), of an H100 (several blocks
// per channel or group) and without limit.
constexpr int64_t kWaves[] = {1, 396, int64_t{1} << 20};

// The elementwise kernel: every thread of every block.
template <int VEC, typename scalar_t>
void emulate_elementwise(const Layout& l,
                         int64_t wave,
                         const ChannelArgs<scalar_t>& ch,
                         const scalar_t* dy,
                         const scalar_t* x,
                         scalar_t* out) {
  if (l.rows) {
    const RowGeom g = row_geom(l, VEC, wave);
    for (int64_t b = 0; b < g.groups * g.splits; ++b) {
      const int64_t s = b / g.groups;
      for (int t = 0; t < kThreads; ++t) {
        const int64_t cv = (b % g.groups) * g.tx + t % g.tx;
        if (cv < g.vecs) {
          elementwise_rows<VEC>(g, cv, g.begin(s), g.begin(s + 1), t / g.tx, ch, dy, x, out);
        }
      }
    }
  } else {
    const PlaneGeom g = plane_geom(l, VEC, wave);
    for (int64_t b = 0; b < g.channels * g.splits; ++b) {
      const int64_t c = b / g.splits;
      const int64_t s = b % g.splits;
      for (int tid = 0; tid < kThreads; ++tid) {
        elementwise_planes<VEC>(g, c, g.begin(s), g.begin(s + 1), tid, ch, dy, x, out);
      }
    }
  }
}

// The reduction kernel of Op: each channel's result merged over threads and slices, then
// finalized; then the elementwise pass into `out`, if given.
template <typename Op, int VEC, typename scalar_t>
void emulate_reduce(const Layout& l,
                    int64_t wave,
                    const ReduceArgs<scalar_t>& args,
                    scalar_t* out) {
  using Acc = typename Op::Acc;
  std::vector<Acc> total(l.channels, Op::identity());
  if (l.rows) {
    const RowGeom g = row_geom(l, VEC, wave);
    for (int64_t b = 0; b < g.groups * g.splits; ++b) {
      const int64_t s = b / g.groups;
      for (int t = 0; t < kThreads; ++t) {
        const int64_t cv = (b % g.groups) * g.tx + t % g.tx;
        if (cv < g.vecs) {
          Acc acc[VEC];
          thread_reduce_rows<Op, VEC>(g, cv, g.begin(s), g.begin(s + 1), t / g.tx, args, acc);
          for (int k = 0; k < VEC; ++k) {
            total[cv * VEC + k] = Op::merge(total[cv * VEC + k], acc[k]);
          }
        }
      }
    }
  } else {
    const PlaneGeom g = plane_geom(l, VEC, wave);
    for (int64_t b = 0; b < g.channels * g.splits; ++b) {
      const int64_t c = b / g.splits;
      const int64_t s = b % g.splits;
      for (int tid = 0; tid < kThreads; ++tid) {
        total[c] = Op::merge(
            total[c], thread_reduce_planes<Op, VEC>(g, c, g.begin(s), g.begin(s + 1), tid, args));
      }
    }
  }
  for (int64_t c = 0; c < l.channels; ++c) {
    Op::finalize(total[c], c, args.fin, args.ch);
  }
  if (out != nullptr) {
    emulate_elementwise<VEC>(l, wave, args.ch, args.dy, args.x, out);
  }
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// batch_norm_forward and batch_norm_backward as the CUDA ops set up their launches.
template <typename scalar_t, int VEC>
struct Emulated {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t wave;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& input,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& bias,
                                                         const at::Tensor& running_mean,
                                                         const at::Tensor& running_var,
                                                         bool training,
                                                         double momentum,
                                                         double eps) const {
    Layout l{};
    const at::Tensor x = kernel_layout(input, l);
    at::Tensor out = at::empty_like(x);
    const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    ChannelTensors ch;
    ch.weight = weight;
    ch.bias = bias;
    if (!training) {
      ch.mean = running_mean;
      ch.spread = running_var;
      emulate_elementwise<VEC>(
          l,
          wave,
          channel_args<scalar_t>(Pass::kNormalizeEval, ch, l.per_channel(), eps),
          static_cast<const scalar_t*>(nullptr),
          data_of<scalar_t>(x),
          out.mutable_data_ptr<scalar_t>());
      return {out, at::Tensor(), at::Tensor()};
    }
    FinalizeTensors fin;
    fin.save_mean = at::empty({l.channels}, acc);
    fin.save_invstd = at::empty({l.channels}, acc);
    fin.running_mean = running_mean;
    fin.running_var = running_var;
    fin.momentum = momentum;
    ch.mean = fin.save_mean;
    ch.spread = fin.save_invstd;
    ReduceArgs<scalar_t> args{};
    args.x = data_of<scalar_t>(x);
    args.fin = finalize_args<scalar_t>(fin);
    args.ch = channel_args<scalar_t>(Pass::kNormalizeTraining, ch, l.per_channel(), eps);
    emulate_reduce<StatsOp<scalar_t>, VEC>(l, wave, args, out.mutable_data_ptr<scalar_t>());
    return {out, fin.save_mean, fin.save_invstd};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out,
                                                          const at::Tensor& input,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& mean,
                                                          const at::Tensor& spread,
                                                          bool training,
                                                          double eps) const {
    Layout l{};
    const at::Tensor x = kernel_layout(input, l);
    const at::Tensor dy = same_layout(grad_out, l);
    at::Tensor grad_input = at::empty_like(x);
    const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    ChannelTensors ch;
    ch.mean = mean;
    ch.spread = spread;
    ch.weight = weight;
    FinalizeTensors fin;
    fin.grad_weight = at::empty({l.channels}, weight.options());
    fin.grad_bias = at::empty({l.channels}, weight.options());
    if (training) {
      fin.sum_dy = ch.sum_dy = at::empty({l.channels}, acc);
      fin.sum_dy_xmu = ch.sum_dy_xmu = at::empty({l.channels}, acc);
    }
    ReduceArgs<scalar_t> args{};
    args.x = data_of<scalar_t>(x);
    args.dy = data_of<scalar_t>(dy);
    args.fin = finalize_args<scalar_t>(fin);
    args.ch = channel_args<scalar_t>(
        training ? Pass::kGradTraining : Pass::kGradEval, ch, l.per_channel(), eps);
    emulate_reduce<GradOp<scalar_t>, VEC>(l, wave, args, grad_input.mutable_data_ptr<scalar_t>());
    return {grad_input, fin.grad_weight, fin.grad_bias};
  }
};

// Per-channel tensor `t` ([C]) shaped to broadcast against x.
at::Tensor per_channel(const at::Tensor& t, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return t.to(at::kDouble).view(shape);
}

// What the gradients sum, in magnitude: per channel |dy| (bias) and |dy * x_hat| (weight),
// and for each grad-input element its terms through those sums. Sums whose terms cancel
// differ between summation orders by a fraction of these, not of the result.
struct GradScales {
  at::Tensor input;
  at::Tensor weight;
  at::Tensor bias;
};

GradScales grad_scales(const at::Tensor& x,
                       const at::Tensor& dy,
                       const at::Tensor& weight,
                       const at::Tensor& mean,
                       const at::Tensor& invstd,
                       bool training) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) {
    dims.push_back(d);
  }
  const double n = static_cast<double>(x.numel() / x.size(1));
  const at::Tensor g = dy.to(at::kDouble).abs();
  const at::Tensor x_hat = (x.to(at::kDouble) - per_channel(mean, x)) * per_channel(invstd, x);
  GradScales s;
  s.bias = g.sum(dims);
  s.weight = (g * x_hat.abs()).sum(dims);
  at::Tensor terms = g;
  if (training) {
    terms = terms + per_channel(s.bias, x) / n + x_hat.abs() * per_channel(s.weight, x) / n;
  }
  s.input = terms * per_channel(weight.abs() * invstd, x);
  return s;
}

// |actual - expected| <= atol + rtol * scale, elementwise.
::testing::AssertionResult close_to_scale(const at::Tensor& actual,
                                          const at::Tensor& expected,
                                          const at::Tensor& scale,
                                          Tolerance tol) {
  const at::Tensor excess = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs() -
                            (tol.atol + tol.rtol * scale.reshape(actual.sizes()));
  if (excess.numel() > 0 && excess.max().item<double>() > 0) {
    const int64_t i = excess.flatten().argmax().item<int64_t>();
    return ::testing::AssertionFailure()
           << "at flat index " << i << ": got " << actual.flatten()[i].item<double>()
           << ", expected " << expected.flatten()[i].item<double>() << " (scale "
           << scale.flatten()[i].item<double>() << ")";
  }
  return ::testing::AssertionSuccess();
}

// Inputs of the cases: planes (NCHW), rows (channels-last and [N, C]); long enough for
// several blocks per channel at the unlimited wave, with runs that hold whole 16-byte
// vectors and, for the 8-byte and 1-element widths, runs that do not.
std::vector<at::Tensor> inputs(at::ScalarType dtype, double mean) {
  const auto make = [&](at::IntArrayRef shape, bool channels_last) {
    at::Tensor x = at::randn(shape, at::kDouble).add_(mean).to(dtype);
    return channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
  };
  return {make({3, 5, 4, 8}, false),
          make({4, 3, 64, 64}, false),
          make({2, 3, 14, 14}, false),
          make({6, 16, 3, 5}, true),
          make({8, 16, 32, 32}, true),
          make({37, 24}, false),
          make({2, 12, 7, 7}, true)};
}

// A vector width the kernels would pick for x: runs (planes) or rows hold whole vectors.
bool fits(const at::Tensor& x, int vec) {
  Layout l{};
  kernel_layout(x, l);
  return (l.rows ? l.channels : l.inner) % vec == 0;
}

template <typename scalar_t, int VEC>
void expect_matches_cpu(at::ScalarType param_dtype, double mean) {
  const auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
  at::manual_seed(0);
  for (const at::Tensor& x : inputs(dtype, mean)) {
    if (!fits(x, VEC)) {
      continue;
    }
    const int64_t C = x.size(1);
    SCOPED_TRACE(testing::Message() << dtype << " [" << x.sizes() << "] "
                                    << (x.is_contiguous() ? "contiguous" : "channels-last")
                                    << ", vector of " << VEC << ", mean " << mean);
    const at::Tensor weight = at::rand({C}, at::kDouble).add_(0.5).to(param_dtype);
    const at::Tensor bias = at::randn({C}, at::kDouble).to(param_dtype);
    const at::Tensor grad_out = at::randn(x.sizes(), at::kDouble).to(dtype);
    for (int64_t wave : kWaves) {
      SCOPED_TRACE(testing::Message() << "wave " << wave);
      const Emulated<scalar_t, VEC> gpu{wave};
      const Agreement tol = agreement(dtype);
      // Running statistics in a reduced dtype are rounded to it, like outputs.
      const Tolerance running =
          param_dtype == dtype && dtype != at::kFloat && dtype != at::kDouble ? tol.out : tol.stats;
      for (bool training : {true, false}) {
        at::Tensor rm = at::randn({C}, at::kDouble).add_(mean).to(param_dtype);
        at::Tensor rv = at::rand({C}, at::kDouble).add_(0.5).to(param_dtype);
        at::Tensor rm_cpu = rm.clone();
        at::Tensor rv_cpu = rv.clone();
        const auto [y, save_mean, save_invstd] =
            gpu.forward(x, weight, bias, rm, rv, training, 0.1, 1e-5);
        const auto [y_cpu, save_mean_cpu, save_invstd_cpu] =
            batch_norm_forward(x, weight, bias, rm_cpu, rv_cpu, training, 0.1, 1e-5);
        EXPECT_TRUE(all_close(y, y_cpu, tol.out)) << "output, training " << training;
        EXPECT_TRUE(all_close(rm, rm_cpu, running)) << "running mean";
        EXPECT_TRUE(all_close(rv, rv_cpu, running)) << "running var";
        if (training) {
          EXPECT_TRUE(all_close(save_mean, save_mean_cpu, tol.stats)) << "saved mean";
          EXPECT_TRUE(all_close(save_invstd, save_invstd_cpu, tol.stats)) << "saved invstd";
        }
        const at::Tensor mean_used = training ? save_mean_cpu : rm_cpu;
        const at::Tensor spread_used = training ? save_invstd_cpu : rv_cpu;
        const auto [dx, dw, db] =
            gpu.backward(grad_out, x, weight, mean_used, spread_used, training, 1e-5);
        const auto [dx_cpu, dw_cpu, db_cpu] = batch_norm_backward(grad_out,
                                                                  x,
                                                                  weight,
                                                                  rm_cpu,
                                                                  rv_cpu,
                                                                  save_mean_cpu,
                                                                  save_invstd_cpu,
                                                                  training,
                                                                  1e-5,
                                                                  {true, true, true});
        const at::Tensor invstd_used =
            training ? save_invstd_cpu : (rv_cpu.to(at::kDouble) + 1e-5).rsqrt();
        const GradScales scale = grad_scales(x, grad_out, weight, mean_used, invstd_used, training);
        EXPECT_TRUE(close_to_scale(dx, dx_cpu, scale.input, tol.grad))
            << "grad input, training " << training;
        EXPECT_TRUE(close_to_scale(dw, dw_cpu, scale.weight, tol.grad))
            << "grad weight, training " << training;
        EXPECT_TRUE(close_to_scale(db, db_cpu, scale.bias, tol.grad))
            << "grad bias, training " << training;
      }
    }
  }
}

TEST(CudaThread, Float) {
  expect_matches_cpu<float, 4>(at::kFloat, 0.0);
  expect_matches_cpu<float, 1>(at::kFloat, 0.0);
}

TEST(CudaThread, Double) {
  expect_matches_cpu<double, 2>(at::kDouble, 0.0);
  expect_matches_cpu<double, 1>(at::kDouble, 0.0);
}

// Reduced precision with float32 parameters (mixed) and with parameters of its own dtype;
// 16-byte, 8-byte and single-element vectors.
TEST(CudaThread, BFloat16) {
  expect_matches_cpu<c10::BFloat16, 8>(at::kFloat, 0.0);
  expect_matches_cpu<c10::BFloat16, 4>(at::kBFloat16, 0.0);
  expect_matches_cpu<c10::BFloat16, 1>(at::kFloat, 0.0);
}

TEST(CudaThread, Half) {
  expect_matches_cpu<c10::Half, 8>(at::kHalf, 0.0);
  expect_matches_cpu<c10::Half, 4>(at::kFloat, 0.0);
}

}  // namespace
}  // namespace cuda
}  // namespace torch_batchnorm
