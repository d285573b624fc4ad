// CPU kernels of batch_norm_forward and batch_norm_backward.
//
// The input is walked in one of two layouts: contiguous [N, C, inner] ("NCHW"), or
// channels-last [rows, C] (channels_last, channels_last_3d and every 2D [N, C] input).
// Each op is at most one reduction and one elementwise pass:
//   forward:  statistics, then y = (x - mean) * scale + shift
//   backward: sums of dy and dy * (x - mean), then dx = a * dy + b * (x - mean) + c
// The statistics read memory once: each cache-sized group of values is summed for a
// shift, then the shifted sums are taken while it is still in cache. In NCHW, a channel
// small enough to stay in cache is normalised right after its own reduction, so the
// elementwise pass reads it from cache too.
// Reductions are split into a fixed set of pieces whose partial results are merged in a
// fixed order, so the result is bitwise independent of the thread count.
// The inner loops (batch_norm_loops.h) are vectorised for the machine's instruction set.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/batch_norm_check.h"
#include "ops/batch_norm_layout.h"
#include "ops/batch_norm_math.h"
#include "ops/cpu/batch_norm_loops.h"

namespace torch_batchnorm {
namespace cpu {
namespace {

using math::Welford;

// Upper bound on the pieces of a reduction: a fixed number, never the thread count, so
// the order of summation does not change with torch.set_num_threads.
constexpr int64_t kMaxPieces = 64;
// Channels-last reductions give each piece at least this many rows, which keeps the
// partial results (two doubles per channel and piece) small next to the input.
constexpr int64_t kMinRowsPerPiece = 256;
// Below this many elements per parallel task, starting threads costs more than it saves.
constexpr int64_t kGrainElems = 32768;

int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

// ---------------------------------------------------------------------------------
// Work splitting

// Pieces each NCHW channel's reduction is split into: more than one only when there are
// too few channels to keep the threads busy, and each piece worth a task of its own.
int64_t nchw_pieces(const Layout& l) {
  const int64_t by_channels = std::max<int64_t>(1, kMaxPieces / l.channels);
  const int64_t by_size = std::max<int64_t>(1, l.per_channel() / kGrainElems);
  return std::min({l.outer, by_channels, by_size});
}

// Pieces a channels-last reduction is split into (each a range of rows).
int64_t cl_pieces(const Layout& l) {
  const int64_t by_size = l.outer * l.channels / kGrainElems;
  return std::clamp<int64_t>(std::min(l.outer / kMinRowsPerPiece, by_size), 1, kMaxPieces);
}

// Calls f(offset, spans, len) on the cache-sized groups of runs n0..n1-1 of channel c
// (NCHW; runs are `inner` long, C * inner apart): several short runs per group, or
// pieces of one long run.
template <typename F>
void for_each_group(const Layout& l, int64_t c, int64_t n0, int64_t n1, F f) {
  if (l.inner >= kGroupElems) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t base = (n * l.channels + c) * l.inner;
      for (int64_t off = 0; off < l.inner; off += kGroupElems) {
        f(base + off, 1, std::min(kGroupElems, l.inner - off));
      }
    }
    return;
  }
  const int64_t per_group = kGroupElems / l.inner;
  for (int64_t n = n0; n < n1; n += per_group) {
    f((n * l.channels + c) * l.inner, std::min(per_group, n1 - n), l.inner);
  }
}

// Runs f(run0, runs) over the runs of `inner` values of all channels (NCHW; run r is
// channel r % C), in memory order, in parallel.
template <typename F>
void for_each_runs(const Layout& l, F f) {
  at::parallel_for(0, l.outer * l.channels, grain_for(l.inner), [&](int64_t begin, int64_t end) {
    f(begin, end - begin);
  });
}

// Runs f(row0, rows) over all rows, in parallel (channels-last).
template <typename F>
void for_each_rows(const Layout& l, F f) {
  at::parallel_for(0, l.outer, grain_for(l.channels), [&](int64_t begin, int64_t end) {
    f(begin, end - begin);
  });
}

// Merges per-channel statistics of `n_b` more values into those of `*n_a` values, for
// every channel at once (every channel has the same count).
void merge_channel_stats(
    double* mean, double* m2, int64_t* n_a, const double* mean_b, const double* m2_b,
    int64_t n_b, int64_t C) {
  const int64_t n = *n_a + n_b;
  if (n == 0) {
    return;
  }
  const double frac = static_cast<double>(n_b) / static_cast<double>(n);
  const double weight = static_cast<double>(*n_a) * frac;
  for (int64_t c = 0; c < C; ++c) {
    const double delta = mean_b[c] - mean[c];
    mean[c] += delta * frac;
    m2[c] += m2_b[c] + delta * delta * weight;
  }
  *n_a = n;
}

// ---------------------------------------------------------------------------------
// Per-channel parameters

template <typename param_t, typename acc_t>
void load_channels(const std::optional<at::Tensor>& t, int64_t C, acc_t fallback, acc_t* out) {
  if (t.has_value() && t->defined()) {
    const auto a = t->accessor<param_t, 1>();
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<acc_t>(a[c]);
    }
  } else {
    std::fill(out, out + C, fallback);
  }
}

at::ScalarType param_dtype(const at::Tensor& input, bool mixed) {
  return mixed ? at::kFloat : input.scalar_type();
}

// ---------------------------------------------------------------------------------
// Ops

template <typename scalar_t, typename param_t>
void forward_impl(
    const at::Tensor& x, const Layout& l, at::Tensor& out, at::Tensor& save_mean,
    at::Tensor& save_invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const Loops<scalar_t>& loop = loops<scalar_t>();
  const int64_t C = l.channels;
  const int64_t count = l.per_channel();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* y_data = out.mutable_data_ptr<scalar_t>();

  // Per channel: weight, bias, and y = (x - centre) * scale + shift.
  std::vector<acc_t> buffer(5 * C);
  acc_t* w = buffer.data();
  acc_t* b = w + C;
  acc_t* centre = b + C;
  acc_t* scale = centre + C;
  acc_t* shift = scale + C;
  load_channels<param_t>(weight, C, acc_t(1), w);
  load_channels<param_t>(bias, C, acc_t(0), b);

  // The elementwise pass.
  const auto normalize = [&] {
    if (count == 0) {
      return;
    }
    if (l.rows) {
      for_each_rows(l, [&](int64_t r0, int64_t rows) {
        loop.rows_affine(x_data + r0 * C, y_data + r0 * C, rows, C, centre, scale, shift);
      });
      return;
    }
    for_each_runs(l, [&](int64_t r0, int64_t runs) {
      const int64_t off = r0 * l.inner;
      loop.runs_affine(
          x_data + off, y_data + off, runs, l.inner, r0 % C, C, centre, scale, shift);
    });
  };

  if (!training) {
    // Evaluation folds the running statistics into one multiply-add per element.
    load_channels<param_t>(running_mean, C, acc_t(0), centre);
    load_channels<param_t>(running_var, C, acc_t(1), scale);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = math::running_invstd(scale[c], eps) * w[c];
      shift[c] = b[c] - centre[c] * scale[c];
      centre[c] = 0;
    }
    normalize();
    return;
  }

  const bool update_running = running_mean.has_value() && running_mean->defined() && count > 0;
  acc_t* save_m = save_mean.mutable_data_ptr<acc_t>();
  acc_t* save_i = save_invstd.mutable_data_ptr<acc_t>();
  std::optional<at::TensorAccessor<param_t, 1>> rm;
  std::optional<at::TensorAccessor<param_t, 1>> rv;
  if (update_running) {
    rm.emplace(running_mean->accessor<param_t, 1>());
    rv.emplace(running_var->accessor<param_t, 1>());
  }
  // Everything training derives from one channel's statistics. Centre first, in the
  // elementwise pass: (x - mean) is exact for inputs near the mean, so large-mean inputs
  // keep their precision.
  const auto finish_channel = [&](int64_t c, const Welford<double>& stats) {
    const acc_t mean = static_cast<acc_t>(stats.mean);
    const acc_t invstd = math::batch_invstd_from_m2(static_cast<acc_t>(stats.m2), count, eps);
    if (update_running) {
      (*rm)[c] = static_cast<param_t>(
          math::running_update(static_cast<acc_t>((*rm)[c]), mean, momentum));
      (*rv)[c] = static_cast<param_t>(math::running_update(
          static_cast<acc_t>((*rv)[c]), static_cast<acc_t>(math::unbiased_var(stats.m2, count)),
          momentum));
    }
    save_m[c] = mean;
    save_i[c] = invstd;
    centre[c] = mean;
    scale[c] = invstd * w[c];
    shift[c] = b[c];
  };

  if (count == 0) {
    for (int64_t c = 0; c < C; ++c) {
      finish_channel(c, Welford<double>{});
    }
    return;
  }

  if (l.rows) {
    const int64_t rows = l.outer;
    const int64_t pieces = cl_pieces(l);
    const int64_t block = rows_per_block(C);
    std::vector<double> partial(2 * pieces * C, 0.0);  // per piece: mean[C], m2[C]
    std::vector<int64_t> partial_count(pieces, 0);
    at::parallel_for(0, pieces, grain_for(rows / pieces * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(3 * C);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t r0 = rows * p / pieces;
        const int64_t r1 = rows * (p + 1) / pieces;
        double* mean = partial.data() + 2 * p * C;
        loop.rows_stats(
            x_data + r0 * C, r1 - r0, C, block, mean, mean + C, &partial_count[p], scratch.data());
      }
    });
    std::vector<double> total(2 * C, 0.0);
    int64_t n = 0;
    for (int64_t p = 0; p < pieces; ++p) {
      const double* mean = partial.data() + 2 * p * C;
      merge_channel_stats(total.data(), total.data() + C, &n, mean, mean + C, partial_count[p], C);
    }
    for (int64_t c = 0; c < C; ++c) {
      finish_channel(c, Welford<double>{total[c], total[C + c], n});
    }
    normalize();
    return;
  }

  const int64_t pieces = nchw_pieces(l);
  const int64_t stride = C * l.inner;
  const auto channel_stats = [&](int64_t c, int64_t n0, int64_t n1) {
    Welford<double> acc;
    for_each_group(l, c, n0, n1, [&](int64_t off, int64_t spans, int64_t len) {
      acc = math::welford_merge(acc, loop.group_stats(x_data + off, spans, len, stride));
    });
    return acc;
  };
  if (pieces == 1) {
    // The same statistics as below, each channel normalised right after them, while it is
    // still in cache (L2, or L3 for large channels): memory is read once, not twice.
    at::parallel_for(0, C, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        finish_channel(c, channel_stats(c, 0, l.outer));
        const int64_t off = c * l.inner;
        loop.group_affine(
            x_data + off, y_data + off, l.outer, l.inner, stride, centre[c], scale[c], shift[c]);
      }
    });
    return;
  }
  std::vector<Welford<double>> partial(C * pieces);
  at::parallel_for(0, C * pieces, grain_for(count / pieces), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / pieces;
      const int64_t p = task % pieces;
      partial[task] = channel_stats(c, l.outer * p / pieces, l.outer * (p + 1) / pieces);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Welford<double> acc;
    for (int64_t p = 0; p < pieces; ++p) {
      acc = math::welford_merge(acc, partial[c * pieces + p]);
    }
    finish_channel(c, acc);
  }
  normalize();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps) {
  check_batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps);
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  at::Tensor out = at::empty_like(x);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const int64_t saved = training ? l.channels : 0;
  // Every element is written by the kernel.
  at::Tensor save_mean = at::empty({saved}, input.options().dtype(acc_type));
  at::Tensor save_invstd = at::empty({saved}, input.options().dtype(acc_type));
  const bool mixed = is_mixed_type(input, {&weight, &bias, &running_mean, &running_var});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_forward_cpu", [&] {
    if (mixed) {
      forward_impl<scalar_t, float>(
          x, l, out, save_mean, save_invstd, weight, bias, running_mean, running_var, training,
          momentum, eps);
    } else {
      forward_impl<scalar_t, scalar_t>(
          x, l, out, save_mean, save_invstd, weight, bias, running_mean, running_var, training,
          momentum, eps);
    }
  });
  return {out, save_mean, save_invstd};
}

template <typename scalar_t, typename param_t>
void backward_impl(
    const at::Tensor& dy, const at::Tensor& x, const Layout& l, at::Tensor& grad_input,
    at::Tensor& grad_weight, at::Tensor& grad_bias, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean, const std::optional<at::Tensor>& save_invstd,
    bool training, double eps, std::array<bool, 3> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const Loops<scalar_t>& loop = loops<scalar_t>();
  const int64_t C = l.channels;
  const int64_t count = l.per_channel();
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* dx_data = mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  param_t* gw = mask[1] ? grad_weight.mutable_data_ptr<param_t>() : nullptr;
  param_t* gb = mask[2] ? grad_bias.mutable_data_ptr<param_t>() : nullptr;

  // Per channel: mean, invstd, weight, and dx = a * dy + b * (x - mean) + k.
  std::vector<acc_t> buffer(6 * C);
  acc_t* mean = buffer.data();
  acc_t* invstd = mean + C;
  acc_t* w = invstd + C;
  acc_t* a = w + C;
  acc_t* b = a + C;
  acc_t* k = b + C;
  if (training) {
    load_channels<acc_t>(save_mean, C, acc_t(0), mean);
    load_channels<acc_t>(save_invstd, C, acc_t(0), invstd);
  } else {
    load_channels<param_t>(running_mean, C, acc_t(0), mean);
    load_channels<param_t>(running_var, C, acc_t(1), invstd);
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = math::running_invstd(invstd[c], eps);
    }
  }
  load_channels<param_t>(weight, C, acc_t(1), w);

  const auto finish_channel = [&](int64_t c, double sum_dy, double sum_dy_xmu) {
    if (gw != nullptr) {
      gw[c] = static_cast<param_t>(static_cast<acc_t>(sum_dy_xmu) * invstd[c]);
    }
    if (gb != nullptr) {
      gb[c] = static_cast<param_t>(static_cast<acc_t>(sum_dy));
    }
    const auto coeffs = math::grad_input_coeffs<acc_t>(
        w[c], invstd[c], static_cast<acc_t>(sum_dy), static_cast<acc_t>(sum_dy_xmu), count,
        training);
    a[c] = coeffs.a;
    b[c] = coeffs.b;
    k[c] = coeffs.c;
  };
  const bool need_sums = training ? (mask[0] || mask[1] || mask[2]) : (mask[1] || mask[2]);

  // The elementwise pass.
  const auto grad_input_pass = [&] {
    if (dx_data == nullptr || count == 0) {
      return;
    }
    if (l.rows) {
      const auto rows_fn = training ? loop.rows_grad_input : loop.rows_grad_input_eval;
      for_each_rows(l, [&](int64_t r0, int64_t rows) {
        const int64_t off = r0 * C;
        rows_fn(dy_data + off, x_data + off, dx_data + off, rows, C, mean, a, b, k);
      });
      return;
    }
    const auto runs_fn = training ? loop.runs_grad_input : loop.runs_grad_input_eval;
    for_each_runs(l, [&](int64_t r0, int64_t runs) {
      const int64_t off = r0 * l.inner;
      runs_fn(
          dy_data + off, x_data + off, dx_data + off, runs, l.inner, r0 % C, C, mean, a, b, k);
    });
  };

  if (!need_sums || count == 0) {
    for (int64_t c = 0; c < C; ++c) {
      finish_channel(c, 0.0, 0.0);
    }
    grad_input_pass();
    return;
  }

  if (l.rows) {
    const int64_t rows = l.outer;
    const int64_t pieces = cl_pieces(l);
    const int64_t block = rows_per_block(C);
    std::vector<double> partial(2 * pieces * C, 0.0);  // per piece: sum_dy[C], sum_dy_xmu[C]
    at::parallel_for(0, pieces, grain_for(rows / pieces * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(2 * C);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t r0 = rows * p / pieces;
        const int64_t r1 = rows * (p + 1) / pieces;
        double* sums = partial.data() + 2 * p * C;
        loop.rows_grad_sums(
            dy_data + r0 * C, x_data + r0 * C, r1 - r0, C, block, mean, sums, sums + C,
            scratch.data());
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double sum_dy = 0;
      double sum_dy_xmu = 0;
      for (int64_t p = 0; p < pieces; ++p) {
        sum_dy += partial[2 * p * C + c];
        sum_dy_xmu += partial[2 * p * C + C + c];
      }
      finish_channel(c, sum_dy, sum_dy_xmu);
    }
    grad_input_pass();
    return;
  }

  const int64_t pieces = nchw_pieces(l);
  const int64_t stride = C * l.inner;
  const auto channel_sums = [&](int64_t c, int64_t n0, int64_t n1) {
    std::pair<double, double> acc{0.0, 0.0};
    for_each_group(l, c, n0, n1, [&](int64_t off, int64_t spans, int64_t len) {
      const auto s = loop.group_grad_sums(dy_data + off, x_data + off, spans, len, stride, mean[c]);
      acc.first += s.first;
      acc.second += s.second;
    });
    return acc;
  };
  if (pieces == 1 && dx_data != nullptr) {
    // The same sums as below, each channel's dx written right after them, while its dy
    // and x are still in cache.
    const auto group_fn = training ? loop.group_grad_input : loop.group_grad_input_eval;
    at::parallel_for(0, C, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const auto s = channel_sums(c, 0, l.outer);
        finish_channel(c, s.first, s.second);
        const int64_t off = c * l.inner;
        group_fn(
            dy_data + off, x_data + off, dx_data + off, l.outer, l.inner, stride, mean[c], a[c],
            b[c], k[c]);
      }
    });
    return;
  }
  std::vector<std::pair<double, double>> partial(C * pieces);
  at::parallel_for(0, C * pieces, grain_for(count / pieces), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / pieces;
      const int64_t p = task % pieces;
      partial[task] = channel_sums(c, l.outer * p / pieces, l.outer * (p + 1) / pieces);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double sum_dy = 0;
    double sum_dy_xmu = 0;
    for (int64_t p = 0; p < pieces; ++p) {
      sum_dy += partial[c * pieces + p].first;
      sum_dy_xmu += partial[c * pieces + p].second;
    }
    finish_channel(c, sum_dy, sum_dy_xmu);
  }
  grad_input_pass();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    bool training,
    double eps,
    std::array<bool, 3> mask) {
  check_batch_norm_backward(
      grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps);
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const at::Tensor dy = same_layout(grad_out, l);
  const bool mixed = is_mixed_type(input, {&weight, &running_mean, &running_var});
  const auto pdtype = param_dtype(input, mixed);
  const int64_t C = l.channels;
  // Every element of each requested output is written by the kernel.
  at::Tensor grad_input = mask[0] ? at::empty_like(x) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({mask[1] ? C : 0}, input.options().dtype(pdtype));
  at::Tensor grad_bias = at::empty({mask[2] ? C : 0}, input.options().dtype(pdtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_cpu", [&] {
    if (mixed) {
      backward_impl<scalar_t, float>(
          dy, x, l, grad_input, grad_weight, grad_bias, weight, running_mean, running_var,
          save_mean, save_invstd, training, eps, mask);
    } else {
      backward_impl<scalar_t, scalar_t>(
          dy, x, l, grad_input, grad_weight, grad_bias, weight, running_mean, running_var,
          save_mean, save_invstd, training, eps, mask);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(torch_batchnorm, CPU, m) {
  m.impl("batch_norm_forward", &cpu::batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &cpu::batch_norm_backward_cpu);
}

}  // namespace torch_batchnorm
