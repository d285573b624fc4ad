// The CUDA kernels' per-thread code (csrc/ops/cuda/batch_norm_thread.h) run on the CPU:
// every thread of every block of the launch shapes the host picks, one after another. The
// merges the kernels do across threads and blocks (warp shuffles, shared memory, the last
// block of a channel) are done in the same order, so the results differ from the GPU's
// only where the device compiler fuses a multiply and an add. Training forward and
// backward and evaluation must give what the CPU kernels give, for every dtype, vector
// width and layout, and for an input with a large mean. No GPU needed.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
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

// The elementwise pass: every thread of every block, with channel c's map map_of(c).
template <int VEC, typename scalar_t, typename MapOf>
void emulate_elementwise(const Layout& l,
                         int64_t wave,
                         const ChannelArgs<scalar_t>& ch,
                         MapOf map_of,
                         const scalar_t* dy,
                         const scalar_t* x,
                         scalar_t* out) {
  with_reads_dy(ch, [&](auto reads_dy) {
    constexpr bool kReadsDy = decltype(reads_dy)::value;
    if (l.rows) {
      const RowGeom g = row_geom(l, VEC, wave);
      for (int64_t b = 0; b < g.groups * g.splits; ++b) {
        const int64_t s = b / g.groups;
        for (int t = 0; t < kThreads; ++t) {
          const int64_t cv = (b % g.groups) * g.tx + t % g.tx;
          if (cv < g.vecs) {
            ChannelMap<at::opmath_type<scalar_t>> map[VEC];
            for (int k = 0; k < VEC; ++k) {
              map[k] = map_of(cv * VEC + k);
            }
            elementwise_rows<VEC, kReadsDy>(
                g, cv, g.begin(s), g.begin(s + 1), t / g.tx, map, ch, dy, x, out);
          }
        }
      }
    } else {
      const PlaneGeom g = plane_geom(l, VEC, wave);
      for (int64_t b = 0; b < g.channels * g.splits; ++b) {
        const int64_t c = b / g.splits;
        const int64_t s = b % g.splits;
        for (int tid = 0; tid < kThreads; ++tid) {
          elementwise_planes<VEC, kReadsDy>(
              g, c, g.begin(s), g.begin(s + 1), tid, map_of(c), ch, dy, x, out);
        }
      }
    }
  });
}

// The merges below follow batch_norm_launch_impl.cuh's block_reduce_all, block_reduce_rows and
// the merge of partial results by a merging block (the last to arrive, or each block of a
// cooperative launch, all in the same order), step for step: a change there comes here too.
constexpr int kWarps = kThreads / 32;

// The warp shuffles of the kernels: for each m from `first` down to `last`, lane i merges
// its value with lane i ^ m's (its own first), all lanes at once.
template <typename Op>
void butterfly(std::vector<typename Op::Acc>& lanes, int first, int last) {
  for (int m = first; m >= last; m >>= 1) {
    const auto before = lanes;
    for (size_t i = 0; i < lanes.size(); ++i) {
      lanes[i] = Op::merge(before[i], before[i ^ m]);
    }
  }
}

// block_reduce_all: each warp's butterfly, then the warps' results in warp 0's.
template <typename Op>
typename Op::Acc block_reduce_all(const std::vector<typename Op::Acc>& v) {
  std::vector<typename Op::Acc> warps(32, Op::identity());
  for (int w = 0; w < kWarps; ++w) {
    std::vector<typename Op::Acc> lanes(v.begin() + w * 32, v.begin() + (w + 1) * 32);
    butterfly<Op>(lanes, 16, 1);
    warps[w] = lanes[0];
  }
  butterfly<Op>(warps, kWarps / 2, 1);
  return warps[0];
}

// block_reduce_rows: v[t][k] is slot k of thread t; returns the result of column x, slot
// k at [x * VEC + k].
template <typename Op, int VEC>
std::vector<typename Op::Acc> block_reduce_rows(
    const std::vector<std::array<typename Op::Acc, VEC>>& v, int tx) {
  std::vector<typename Op::Acc> smem(kWarps * tx * VEC);
  for (int k = 0; k < VEC; ++k) {
    for (int w = 0; w < kWarps; ++w) {
      std::vector<typename Op::Acc> lanes(32);
      for (int lane = 0; lane < 32; ++lane) {
        lanes[lane] = v[w * 32 + lane][k];
      }
      butterfly<Op>(lanes, 16, tx);
      for (int lane = 0; lane < tx; ++lane) {
        smem[(w * tx + lane) * VEC + k] = lanes[lane];
      }
    }
  }
  std::vector<typename Op::Acc> out(tx * VEC);
  for (int t = 0; t < tx * VEC; ++t) {
    out[t] = smem[t];
    for (int w = 1; w < kWarps; ++w) {
      out[t] = Op::merge(out[t], smem[w * tx * VEC + t]);
    }
  }
  return out;
}

// The reduction kernel of Op, merging in the kernels' order (warp shuffles, then warps,
// then, with several blocks per channel or group, the partial results in a merging block,
// which hold what the blocks' results hold); then the elementwise pass into `out`, if
// given.
template <typename Op, int VEC, typename scalar_t>
void emulate_reduce(const Layout& l,
                    int64_t wave,
                    const ReduceArgs<scalar_t>& args,
                    scalar_t* out) {
  using Acc = typename Op::Acc;
  std::vector<Acc> total(l.channels, Op::identity());
  std::vector<at::opmath_type<scalar_t>> centre(l.channels);
  if (l.rows) {
    const RowGeom g = reduction_row_geom(l, VEC, VEC * static_cast<int>(sizeof(scalar_t)), wave);
    for (int64_t group = 0; group < g.groups; ++group) {
      // partial[s][x * VEC + k]: block s's result for column x, slot k.
      std::vector<std::vector<Acc>> partial(g.splits);
      std::vector<std::array<Acc, VEC>> v(kThreads);
      for (int64_t s = 0; s < g.splits; ++s) {
        for (int t = 0; t < kThreads; ++t) {
          const int64_t cv = group * g.tx + t % g.tx;
          const bool active = cv < g.vecs;
          at::opmath_type<scalar_t> centres[VEC] = {};
          for (int k = 0; active && k < VEC; ++k) {
            centres[k] = row_centre<Op, VEC>(g, cv * VEC + k, args);
          }
          Acc acc[VEC];
          thread_reduce_rows<Op, VEC>(g,
                                      active ? cv : 0,
                                      g.begin(s),
                                      active ? g.begin(s + 1) : g.begin(s),
                                      t / g.tx,
                                      args,
                                      centres,
                                      acc);
          std::copy(acc, acc + VEC, v[t].begin());
        }
        partial[s] = block_reduce_rows<Op, VEC>(v, g.tx);
      }
      std::vector<Acc> result = partial[0];
      if (g.splits > 1) {
        for (int t = 0; t < kThreads; ++t) {
          const int x = t % g.tx;
          v[t].fill(Op::identity());
          if (group * g.tx + x < g.vecs) {
            for (int64_t p = t / g.tx; p < g.splits; p += g.ty) {
              for (int k = 0; k < VEC; ++k) {
                v[t][k] = Op::merge(v[t][k], partial[p][x * VEC + k]);
              }
            }
          }
        }
        result = block_reduce_rows<Op, VEC>(v, g.tx);
      }
      for (int t = 0; t < g.tx * VEC; ++t) {
        const int64_t cv = group * g.tx + t / VEC;
        if (cv < g.vecs) {
          total[cv * VEC + t % VEC] = result[t];
          centre[cv * VEC + t % VEC] = row_centre<Op, VEC>(g, cv * VEC + t % VEC, args);
        }
      }
    }
  } else {
    const PlaneGeom g = plane_geom(l, VEC, wave);
    std::vector<Acc> v(kThreads);
    for (int64_t c = 0; c < g.channels; ++c) {
      centre[c] = plane_centre<Op, VEC>(g, c, args);
      std::vector<Acc> partial(g.splits);
      for (int64_t s = 0; s < g.splits; ++s) {
        for (int tid = 0; tid < kThreads; ++tid) {
          v[tid] =
              thread_reduce_planes<Op, VEC>(g, c, g.begin(s), g.begin(s + 1), tid, args, centre[c]);
        }
        partial[s] = block_reduce_all<Op>(v);
      }
      total[c] = partial[0];
      if (g.splits > 1) {
        for (int tid = 0; tid < kThreads; ++tid) {
          v[tid] = Op::identity();
          for (int64_t t = tid; t < g.splits; t += kThreads) {
            v[tid] = Op::merge(v[tid], partial[t]);
          }
        }
        total[c] = block_reduce_all<Op>(v);
      }
    }
  }
  for (int64_t c = 0; c < l.channels; ++c) {
    Op::finalize(total[c], c, centre[c], args.fin, args.ch);
  }
  if (out != nullptr) {
    // A block that holds a channel's total derives its map from it (Op::map); the
    // elementwise kernel reads it back from the finalized outputs (ChannelArgs::map). The
    // two must agree bit for bit: which one a channel gets depends on the launch.
    using Map = ChannelMap<at::opmath_type<scalar_t>>;
    std::vector<Map> maps(l.channels);
    for (int64_t c = 0; c < l.channels; ++c) {
      maps[c] = Op::map(total[c], c, centre[c], args.fin, args.ch);
      const Map read_back = args.ch.map(c);
      EXPECT_EQ(std::memcmp(&maps[c], &read_back, sizeof(Map)), 0) << "map of channel " << c;
    }
    emulate_elementwise<VEC>(
        l, wave, args.ch, [&](int64_t c) { return maps[c]; }, args.dy, args.x, out);
  }
}

// batch_norm_forward and batch_norm_backward as the CUDA ops set up their launches.
template <typename scalar_t, int VEC>
struct Emulated {
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
    const auto acc = x.options().dtype(at::toOpMathType(x.scalar_type()));
    ChannelTensors ch;
    ch.weight = weight;
    ch.bias = bias;
    if (!training) {
      ch.mean = running_mean;
      ch.spread = running_var;
      const auto args = channel_args<scalar_t>(Pass::kNormalizeEval, ch, l.per_channel(), eps);
      emulate_elementwise<VEC>(
          l,
          wave,
          args,
          [&](int64_t c) { return args.map(c); },
          static_cast<const scalar_t*>(nullptr),
          ptr_of<const scalar_t>(x),
          out.mutable_data_ptr<scalar_t>());
      return {out, at::Tensor(), at::Tensor()};
    }
    FinalizeTensors fin;
    fin.save_mean = at::empty({l.channels}, acc);
    fin.save_invstd = at::empty({l.channels}, acc);
    fin.running_mean = running_mean;
    fin.running_var = running_var;
    fin.momentum = momentum;
    fin.residual = at::empty({l.channels}, acc);
    ch.mean = fin.save_mean;
    ch.spread = fin.save_invstd;
    ch.residual = fin.residual;
    ReduceArgs<scalar_t> args{};
    args.x = ptr_of<const scalar_t>(x);
    args.fin = finalize_args<scalar_t>(fin);
    args.ch = channel_args<scalar_t>(Pass::kNormalizeTraining, ch, l.per_channel(), eps);
    emulate_reduce<StatsOp<scalar_t>, VEC>(l, wave, args, out.mutable_data_ptr<scalar_t>());
    return {out, fin.save_mean, fin.save_invstd};
  }

  // batch_norm_stats: mean and M2 per channel.
  std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input) const {
    Layout l{};
    const at::Tensor x = kernel_layout(input, l);
    FinalizeTensors fin;
    fin.save_mean = at::empty({l.channels}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    fin.m2 = at::empty_like(fin.save_mean);
    ReduceArgs<scalar_t> args{};
    args.x = ptr_of<const scalar_t>(x);
    args.fin = finalize_args<scalar_t>(fin);
    args.ch =
        channel_args<scalar_t>(Pass::kNormalizeTraining, ChannelTensors(), l.per_channel(), 0.0);
    emulate_reduce<StatsOp<scalar_t>, VEC>(l, wave, args, static_cast<scalar_t*>(nullptr));
    return {fin.save_mean, fin.m2};
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
    const auto acc = x.options().dtype(at::toOpMathType(x.scalar_type()));
    ChannelTensors ch;
    ch.mean = mean;
    ch.spread = spread;
    ch.weight = weight;
    FinalizeTensors fin;
    fin.grad_weight = at::empty({l.channels}, weight.options());
    fin.grad_bias = at::empty({l.channels}, weight.options());
    fin.centre_sums = training;
    if (training) {
      fin.sum_dy = ch.sum_dy = at::empty({l.channels}, acc);
      fin.sum_dy_xmu = ch.sum_dy_xmu = at::empty({l.channels}, acc);
      fin.residual = ch.residual = at::empty({l.channels}, acc);
    }
    ReduceArgs<scalar_t> args{};
    args.x = ptr_of<const scalar_t>(x);
    args.dy = ptr_of<const scalar_t>(dy);
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
// vectors and, for the 8-byte and 1-element widths, runs that do not. [256, 256] is a
// reduction whose groups narrow to 4 vectors of 16 bytes (reduction_row_geom). Channels alternate
// between means +mean and -mean, so a channel that took another's values would show.
std::vector<at::Tensor> inputs(at::ScalarType dtype, double mean, double std = 1.0) {
  const auto make = [&](at::IntArrayRef shape, bool channels_last) {
    at::Tensor x = at::randn(shape, at::kDouble).mul_(std);
    const at::Tensor sign = 1 - 2 * (at::arange(shape[1], at::kDouble).remainder(2));
    x.add_(per_channel(sign * mean, x));
    x = x.to(dtype);
    return channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
  };
  return {make({3, 5, 4, 8}, false),
          make({4, 3, 64, 64}, false),
          make({2, 3, 14, 14}, false),
          make({6, 16, 3, 5}, true),
          make({8, 16, 32, 32}, true),
          make({37, 24}, false),
          make({256, 256}, false),
          make({2, 12, 7, 7}, true),
          make({20000, 4}, false),
          make({4, 4, 8, 16, 16}, false)};
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
      // The statistics op (SyncBatchNorm's first step).
      const auto [mean, m2] = gpu.stats(x);
      const auto [mean_cpu, m2_cpu] =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("torch_batchnorm::batch_norm_stats", "")
              .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>()
              .call(x);
      EXPECT_TRUE(all_close(mean, mean_cpu, tol.stats)) << "batch_norm_stats mean";
      EXPECT_TRUE(all_close(m2, m2_cpu, tol.stats)) << "batch_norm_stats M2";
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

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Inputs of mean 1e4 and standard deviation `std`, where E[x^2] - E[x]^2 loses every
// digit of the variance and float32 sums of the values lose digits of the mean: statistics
// within float32's precision of those of the same values in float64, outputs within two
// units of the inputs' last place (tests/python/test_stability.py asks the same of the
// kernels of every device, at std 1). At std 1e-2 the values are ten units of their last
// place apart, and M2 needs their deviations exact.
template <int VEC>
void expect_stable_statistics(double std) {
  constexpr double kMean = 1e4;
  const double ulp = std::numeric_limits<float>::epsilon() * 8192;  // spacing at 1e4
  at::manual_seed(0);
  for (const at::Tensor& x : inputs(at::kFloat, kMean, std)) {
    if (!fits(x, VEC)) {
      continue;
    }
    const int64_t C = x.size(1);
    SCOPED_TRACE(testing::Message()
                 << "[" << x.sizes() << "] " << (x.is_contiguous() ? "contiguous" : "channels-last")
                 << ", vector of " << VEC);
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) {
      dims.push_back(d);
    }
    const at::Tensor x64 = x.to(at::kDouble);
    const at::Tensor mean = x64.mean(dims);
    const at::Tensor var = (x64 - per_channel(mean, x)).square().mean(dims);
    const at::Tensor invstd = (var + 1e-5).rsqrt();
    const int64_t n = x.numel() / C;
    for (int64_t wave : kWaves) {
      SCOPED_TRACE(testing::Message() << "wave " << wave);
      at::Tensor rm = at::full({C}, kMean - 1, at::kFloat);
      at::Tensor rv = at::ones({C}, at::kFloat);
      const auto [y, save_mean, save_invstd] = Emulated<float, VEC>{wave}.forward(
          x, at::Tensor(), at::Tensor(), rm, rv, true, 0.1, 1e-5);
      EXPECT_LE(max_abs_diff(save_mean, mean), ulp);
      const auto [stats_mean, m2] = Emulated<float, VEC>{wave}.stats(x);
      EXPECT_LE(max_abs_diff(stats_mean, mean), ulp);
      EXPECT_TRUE(all_close(m2.to(at::kDouble), var * n, {1e-5, 0}));
      EXPECT_TRUE(all_close(save_invstd.to(at::kDouble), invstd, {1e-5, 0}));
      EXPECT_TRUE(all_close(rv.to(at::kDouble), 0.9 + 0.1 * var * n / (n - 1), {1e-5, 0}));
      const at::Tensor y_exact = (x64 - per_channel(mean, x)) * per_channel(invstd, x);
      EXPECT_LE(max_abs_diff(y, y_exact), 2 * ulp * invstd.max().item<double>());
    }
  }
}

TEST(CudaThread, StableStatistics) {
  for (double std : {1.0, 1e-2}) {
    expect_stable_statistics<4>(std);
    expect_stable_statistics<1>(std);
  }
}

// Two values per channel whose float32 mean is half a unit in the last place from the
// exact one (tests/python/test_stability.py, test_close_values_against_float64): 0.066
// apart, the input gradient keeps 0.9% of its terms; 0.004 apart, invstd (267) carries the
// mean's rounding into the output. Taken about save_mean, dx was 8e-4 of its size off and
// y 5e-5; about the batch mean (the residual of the statistics and of the sums), both are
// within float32 tolerance of float64, in every layout.
TEST(CudaThread, CloseValuesAgainstFloat64) {
  const double eps = 1e-5;
  for (const auto& values :
       std::vector<std::vector<float>>{{-2.2512032985687256f, -2.1849365234375f},
                                       {-2.2512032985687256f, -2.2472033500671387f}}) {
    const at::Tensor v = at::tensor(values);
    const at::Tensor g = at::tensor(std::vector<float>{2.057591199874878f, -0.03542188182473183f});
    for (const at::Tensor& x : {v.view({1, 1, 2}),
                                v.view({2, 1}),
                                v.view({1, 1, 1, 2}).contiguous(at::MemoryFormat::ChannelsLast)}) {
      const at::Tensor dy = g.view(x.sizes()).contiguous(x.suggest_memory_format());
      SCOPED_TRACE(testing::Message()
                   << "[" << x.sizes() << "], values " << values[0] << ", " << values[1]);
      const at::Tensor weight = at::tensor(std::vector<float>{1.5f});
      const at::Tensor bias = at::tensor(std::vector<float>{0.25f});
      const at::Tensor x64 = x.to(at::kDouble);
      const at::Tensor dy64 = dy.to(at::kDouble);
      const at::Tensor mean = x64.mean();
      const at::Tensor invstd = ((x64 - mean).square().mean() + eps).rsqrt();
      const at::Tensor x_hat = (x64 - mean) * invstd;
      const at::Tensor y64 = x_hat * 1.5 + 0.25;
      const at::Tensor dx64 = 1.5 * invstd * (dy64 - dy64.mean() - x_hat * (dy64 * x_hat).mean());
      for (int64_t wave : kWaves) {
        SCOPED_TRACE(testing::Message() << "wave " << wave);
        const Emulated<float, 1> gpu{wave};
        const auto [y, save_mean, save_invstd] =
            gpu.forward(x, weight, bias, at::Tensor(), at::Tensor(), true, 0.1, eps);
        EXPECT_TRUE(all_close(y, y64.to(at::kFloat))) << "output";
        const auto [dx, dw, db] = gpu.backward(dy, x, weight, save_mean, save_invstd, true, eps);
        EXPECT_TRUE(all_close(dx, dx64.to(at::kFloat))) << "grad input";
      }
    }
  }
}

// The first value of channel c in memory, wherever the layout puts it.
at::Tensor first_value(const at::Tensor& x, int64_t c) {
  at::Tensor t = x.select(1, c);
  while (t.dim() > 0) {
    t = t.select(0, 0);
  }
  return t;
}

// The centre of the statistics (StatsOp::centre) from a channel's first three values.
TEST(CudaThread, CentreOfStatistics) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const auto centre = [](std::vector<float> values) {
    ReduceArgs<float> args{};
    args.x = values.data();
    const int64_t n = static_cast<int64_t>(values.size());
    return StatsOp<float>::centre(args, 0, ChannelValues{0, 1, 1, n});
  };
  EXPECT_EQ(centre({1e4f, 1e4f + 1, 1e4f - 2}), 1e4f);       // far from zero: the median
  EXPECT_EQ(centre({-1e6f, 1e4f + 1, 1e4f - 2}), 1e4f - 2);  // one outlier is passed over
  EXPECT_EQ(centre({1e4f, 1e4f + 1, inf}), 1e4f + 1);
  EXPECT_EQ(centre({0.3f, -1.2f, 0.8f}), 0.0f);  // around zero: no centre
  EXPECT_EQ(centre({1e4f, 0.3f, -1.2f}), 0.0f);  // an outlier in data around zero
  EXPECT_EQ(centre({nan, 1e4f, 1.0f}), 0.0f);
  EXPECT_EQ(centre({inf, inf, 1e4f}), 0.0f);      // a median that is not finite
  EXPECT_EQ(centre({1e4f, 1e4f + 1}), 1e4f + 1);  // two values that agree
  EXPECT_EQ(centre({1e4f, 0.3f}), 0.0f);          // two that do not
  EXPECT_EQ(centre({1e4f}), 1e4f);                // one value
  EXPECT_EQ(centre({inf}), 0.0f);
  // Value i of channel 2 of three runs of three: 2 + (i / 1) * 3.
  std::vector<float> runs{5, 5, 1e4f, 7, 7, 1e4f + 1, 9, 9, 1e4f - 1};
  ReduceArgs<float> args{};
  args.x = runs.data();
  EXPECT_EQ(StatsOp<float>::centre(args, 2, ChannelValues{2, 1, 3, 3}), 1e4f);
}

// A training forward of float32 x without weight or bias, with 16-byte vectors at every
// wave: outputs, statistics and running statistics agree with the CPU kernels'.
void expect_forward_matches_cpu(const at::Tensor& x) {
  const Agreement tol = agreement(at::kFloat);
  const int64_t C = x.size(1);
  for (int64_t wave : kWaves) {
    SCOPED_TRACE(testing::Message() << "wave " << wave);
    at::Tensor rm = at::zeros({C});
    at::Tensor rv = at::ones({C});
    at::Tensor rm_cpu = rm.clone();
    at::Tensor rv_cpu = rv.clone();
    const auto [y, save_mean, save_invstd] =
        Emulated<float, 4>{wave}.forward(x, at::Tensor(), at::Tensor(), rm, rv, true, 0.1, 1e-5);
    const auto [y_cpu, save_mean_cpu, save_invstd_cpu] =
        batch_norm_forward(x, std::nullopt, std::nullopt, rm_cpu, rv_cpu, true, 0.1, 1e-5);
    EXPECT_TRUE(all_close(y, y_cpu, tol.out)) << "output";
    EXPECT_TRUE(all_close(save_mean, save_mean_cpu, tol.stats)) << "saved mean";
    EXPECT_TRUE(all_close(save_invstd, save_invstd_cpu, tol.stats)) << "saved invstd";
    EXPECT_TRUE(all_close(rm, rm_cpu, tol.stats)) << "running mean";
    EXPECT_TRUE(all_close(rv, rv_cpu, tol.stats)) << "running var";
  }
}

// Each channel's first value replaced by an outlier, an infinity or a NaN in data around
// zero: the outlier does not become the centre, so statistics and outputs still agree with
// the CPU kernels' (non-finite where theirs are).
TEST(CudaThread, FirstValueOutliers) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::manual_seed(0);
  for (double value : {1e4, -1e6, inf, nan}) {
    for (const at::Tensor& input : inputs(at::kFloat, 0.0)) {
      const at::Tensor x = input.clone();
      const int64_t C = x.size(1);
      for (int64_t c = 0; c < C; ++c) {
        first_value(x, c).fill_(value);
      }
      SCOPED_TRACE(testing::Message() << "[" << x.sizes() << "], first values " << value);
      expect_forward_matches_cpu(x);
    }
  }
}

// Values about 2e19, whose squares overflow float32 and whose M2 does not, with the first
// two of each channel 3e18 to either side, so that the three a centre is taken from
// disagree and the statistics are gathered about 0: a thread's first tile, merged into its
// empty total, still gives its M2 rather than inf * 0 = NaN, and the statistics agree
// with the CPU kernels', which accumulate in double.
TEST(CudaThread, ValuesWhoseSquaresOverflow) {
  at::manual_seed(0);
  for (const at::Tensor& like : {at::empty({8, 4, 10, 10}),
                                 at::empty({8, 8, 6, 6}, at::MemoryFormat::ChannelsLast),
                                 at::empty({300, 8})}) {
    const int64_t C = like.size(1);
    // [C, values] in the order the kernels reduce them, written back into x's layout.
    const at::Tensor values = at::randn({C, like.numel() / C}, at::kDouble).mul_(4e17).add_(2e19);
    values.select(1, 0).sub_(3e18);
    values.select(1, 1).add_(3e18);
    at::Tensor x = at::empty_like(like);
    x.transpose(0, 1).copy_(values.view(x.transpose(0, 1).sizes()));
    SCOPED_TRACE(testing::Message() << "[" << x.sizes() << "]");
    // The CPU kernels' invstd, which the emulation must match, is finite.
    const at::Tensor invstd = std::get<2>(batch_norm_forward(
        x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true, 0.1, 1e-5));
    ASSERT_TRUE(invstd.isfinite().all().item<bool>());
    expect_forward_matches_cpu(x);
  }
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
