// CPU kernels of batch_norm_forward and batch_norm_backward.
//
// The input is walked in one of two layouts: contiguous [N, C, inner] ("NCHW"), or
// channels-last [rows, C] (channels_last, channels_last_3d and every 2D [N, C] input).
// Each op is at most one reduction and one elementwise pass:
//   forward:  statistics (reads x once from memory), then y = (x - mean) * scale + shift
//   backward: sums of dy and dy * (x - mean), then dx = a * dy + b * (x - mean) + c
// Reductions are split into a fixed set of pieces whose partial results are merged in a
// fixed order, so the result is bitwise independent of the thread count.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/batch_norm_check.h"
#include "ops/batch_norm_math.h"

namespace torch_batchnorm {
namespace cpu {
namespace {

using math::Welford;

// Elements of one channel that a vectorised two-pass chunk reads while they stay in L1.
constexpr int64_t kChunk = 2048;
// Elements of a channels-last block (rows x C) whose statistics are taken in two passes
// while the block stays in L2.
constexpr int64_t kBlockElems = 16384;
// Upper bound on the pieces of a reduction: a fixed number, never the thread count, so
// the order of summation does not change with torch.set_num_threads.
constexpr int64_t kMaxPieces = 64;
// Below this many elements per parallel task, starting threads costs more than it saves.
constexpr int64_t kGrainElems = 32768;

// The input viewed as the kernels walk it.
struct Layout {
  int64_t outer;  // N for NCHW, N * prod(spatial) rows for channels-last
  int64_t channels;
  int64_t inner;  // prod(spatial) for NCHW, 1 for channels-last
  bool channels_last;

  int64_t per_channel() const {
    return outer * inner;
  }
};

bool is_channels_last(const at::Tensor& t) {
  // The channels of one position are adjacent: a contiguous 2D [N, C] tensor, or a
  // channels_last / channels_last_3d one that is not also contiguous. The result takes
  // the layout walked, and this is torch's rule for it (batch_norm_cpu): not a 3D
  // [N, C, L] tensor with C innermost, whose result torch makes contiguous (and code
  // calls .view() on it).
  if (t.dim() == 2) {
    return t.is_contiguous();
  }
  return !t.is_contiguous() && (t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
                                t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// Returns `t` in a layout the kernels walk, copying only when it is neither
// contiguous nor channels-last.
at::Tensor kernel_layout(const at::Tensor& t, Layout& layout) {
  at::Tensor x = t;
  if (!is_channels_last(x) && !x.is_contiguous()) {
    x = x.contiguous(x.suggest_memory_format());
    if (!is_channels_last(x)) {
      x = x.contiguous();
    }
  }
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    spatial *= x.size(d);
  }
  layout.channels = x.size(1);
  layout.channels_last = is_channels_last(x);
  layout.outer = layout.channels_last ? x.size(0) * spatial : x.size(0);
  layout.inner = layout.channels_last ? 1 : spatial;
  return x;
}

// Brings a second tensor of the input's shape (grad_out) into the input's layout.
at::Tensor same_layout(const at::Tensor& t, const Layout& layout) {
  if (layout.channels_last) {
    return t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.contiguous();
}

int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

// ---------------------------------------------------------------------------------
// Reduction driver

// Partial result of the backward reduction: sum(dy) and sum(dy * (x - mean)).
struct GradSums {
  double dy = 0;
  double dy_xmu = 0;
};

inline Welford<double> combine(const Welford<double>& a, const Welford<double>& b) {
  return math::welford_merge(a, b);
}
inline GradSums combine(const GradSums& a, const GradSums& b) {
  return {a.dy + b.dy, a.dy_xmu + b.dy_xmu};
}

// Reduces every channel to one Acc.
//   span_fn(c, offset, len) -> Acc: a contiguous run of channel c (NCHW)
//   block_fn(row0, rows, acc, scratch): folds rows into acc[C] (channels-last), with
//   `scratch` holding 3 * C acc_t values of its own.
template <typename Acc, typename acc_t, typename SpanFn, typename BlockFn>
std::vector<Acc> reduce_per_channel(const Layout& l, SpanFn span_fn, BlockFn block_fn) {
  const int64_t C = l.channels;
  std::vector<Acc> result(C);
  if (C == 0 || l.per_channel() == 0) {
    return result;
  }
  if (!l.channels_last) {
    const int64_t pieces = std::min(l.outer, std::max<int64_t>(1, kMaxPieces / C));
    std::vector<Acc> partial(C * pieces);
    const int64_t rows_per_piece = (l.outer + pieces - 1) / pieces;
    at::parallel_for(0, C * pieces, grain_for(rows_per_piece * l.inner), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / pieces;
        const int64_t p = task % pieces;
        const int64_t n0 = l.outer * p / pieces;
        const int64_t n1 = l.outer * (p + 1) / pieces;
        Acc acc{};
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t base = (n * C + c) * l.inner;
          for (int64_t off = 0; off < l.inner; off += kChunk) {
            acc = combine(acc, span_fn(c, base + off, std::min(kChunk, l.inner - off)));
          }
        }
        partial[task] = acc;
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t p = 0; p < pieces; ++p) {
        result[c] = combine(result[c], partial[c * pieces + p]);
      }
    }
    return result;
  }

  const int64_t rows = l.outer;
  const int64_t block_rows = std::max<int64_t>(1, kBlockElems / C);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int64_t pieces = std::min(blocks, kMaxPieces);
  std::vector<Acc> partial(C * pieces);
  at::parallel_for(0, pieces, grain_for(blocks / pieces * block_rows * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(3 * C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = blocks * p / pieces;
      const int64_t b1 = blocks * (p + 1) / pieces;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row0 = b * block_rows;
        block_fn(row0, std::min(block_rows, rows - row0), &partial[p * C], scratch.data());
      }
    }
  });
  for (int64_t p = 0; p < pieces; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      result[c] = combine(result[c], partial[p * C + c]);
    }
  }
  return result;
}

// Runs span_fn(c, offset, len) over every contiguous run of one channel (NCHW) or
// row_fn(offset) over every row of C channels (channels-last), in parallel.
template <typename SpanFn, typename RowFn>
void for_each_channel_span(const Layout& l, SpanFn span_fn, RowFn row_fn) {
  if (l.channels == 0 || l.per_channel() == 0) {
    return;
  }
  if (!l.channels_last) {
    const int64_t C = l.channels;
    at::parallel_for(0, l.outer * C, grain_for(l.inner), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        span_fn(r % C, r * l.inner, l.inner);
      }
    });
    return;
  }
  at::parallel_for(0, l.outer, grain_for(l.channels), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row_fn(r * l.channels);
    }
  });
}

// ---------------------------------------------------------------------------------
// Statistics

// Mean and M2 of a contiguous run: one pass for a shift (the chunk mean), one for the
// shifted sums, both over data that stays in L1, so memory is read once.
template <typename scalar_t>
Welford<double> span_stats(const scalar_t* x, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) {
    sum += static_cast<acc_t>(x[i]);
  }
  const acc_t shift = sum / static_cast<acc_t>(len);
  acc_t d = 0;
  acc_t d2 = 0;
#pragma omp simd reduction(+ : d, d2)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]) - shift;
    d += v;
    d2 += v * v;
  }
  return math::welford_from_shifted_sums<double>(shift, d, d2, len);
}

// The same for a channels-last block of `rows` x C, per channel.
template <typename scalar_t, typename acc_t>
void block_stats(
    const scalar_t* x, int64_t rows, int64_t C, Welford<double>* acc, acc_t* scratch) {
  acc_t* shift = scratch;
  acc_t* d = scratch + C;
  acc_t* d2 = scratch + 2 * C;
  std::fill(scratch, scratch + 3 * C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      shift[c] += static_cast<acc_t>(row[c]);
    }
  }
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] *= inv_rows;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(row[c]) - shift[c];
      d[c] += v;
      d2[c] += v * v;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    acc[c] = math::welford_merge(
        acc[c], math::welford_from_shifted_sums<double>(shift[c], d[c], d2[c], rows));
  }
}

template <typename scalar_t>
std::vector<Welford<double>> channel_stats(const scalar_t* x, const Layout& l) {
  using acc_t = at::opmath_type<scalar_t>;
  return reduce_per_channel<Welford<double>, acc_t>(
      l,
      [&](int64_t, int64_t off, int64_t len) { return span_stats(x + off, len); },
      [&](int64_t row0, int64_t rows, Welford<double>* acc, acc_t* scratch) {
        block_stats(x + row0 * l.channels, rows, l.channels, acc, scratch);
      });
}

// ---------------------------------------------------------------------------------
// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel.

template <typename scalar_t, typename acc_t>
std::vector<GradSums> grad_sums(
    const scalar_t* dy, const scalar_t* x, const acc_t* mean, const Layout& l) {
  return reduce_per_channel<GradSums, acc_t>(
      l,
      [&](int64_t c, int64_t off, int64_t len) {
        const acc_t m = mean[c];
        acc_t s = 0;
        acc_t sx = 0;
#pragma omp simd reduction(+ : s, sx)
        for (int64_t i = 0; i < len; ++i) {
          const acc_t g = static_cast<acc_t>(dy[off + i]);
          s += g;
          sx += g * (static_cast<acc_t>(x[off + i]) - m);
        }
        return GradSums{s, sx};
      },
      [&](int64_t row0, int64_t rows, GradSums* acc, acc_t* scratch) {
        const int64_t C = l.channels;
        acc_t* s = scratch;
        acc_t* sx = scratch + C;
        std::fill(scratch, scratch + 2 * C, acc_t(0));
        for (int64_t r = row0; r < row0 + rows; ++r) {
          const scalar_t* g_row = dy + r * C;
          const scalar_t* x_row = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t g = static_cast<acc_t>(g_row[c]);
            s[c] += g;
            sx[c] += g * (static_cast<acc_t>(x_row[c]) - mean[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          acc[c].dy += s[c];
          acc[c].dy_xmu += sx[c];
        }
      });
}

// ---------------------------------------------------------------------------------
// Elementwise passes

// out = (in - center) * scale + shift, per channel.
template <typename scalar_t, typename acc_t>
void channel_affine(
    const scalar_t* in, scalar_t* out, const acc_t* center, const acc_t* scale,
    const acc_t* shift, const Layout& l) {
  for_each_channel_span(
      l,
      [&](int64_t c, int64_t off, int64_t len) {
        const acc_t m = center[c];
        const acc_t s = scale[c];
        const acc_t b = shift[c];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          out[off + i] = static_cast<scalar_t>((static_cast<acc_t>(in[off + i]) - m) * s + b);
        }
      },
      [&](int64_t off) {
#pragma omp simd
        for (int64_t c = 0; c < l.channels; ++c) {
          out[off + c] =
              static_cast<scalar_t>((static_cast<acc_t>(in[off + c]) - center[c]) * scale[c] + shift[c]);
        }
      });
}

// dx = a * dy + b * (x - mean) + c, per channel. Evaluation has b = c = 0 and reads
// only dy.
template <bool kUsesInput, typename scalar_t, typename acc_t>
void grad_input_pass(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const acc_t* mean,
    const math::GradInputCoeffs<acc_t>* k, const Layout& l) {
  for_each_channel_span(
      l,
      [&](int64_t c, int64_t off, int64_t len) {
        const acc_t a = k[c].a;
        const acc_t b = k[c].b;
        const acc_t cc = k[c].c;
        const acc_t m = mean[c];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          acc_t v = a * static_cast<acc_t>(dy[off + i]);
          if constexpr (kUsesInput) {
            v += b * (static_cast<acc_t>(x[off + i]) - m) + cc;
          }
          dx[off + i] = static_cast<scalar_t>(v);
        }
      },
      [&](int64_t off) {
#pragma omp simd
        for (int64_t c = 0; c < l.channels; ++c) {
          acc_t v = k[c].a * static_cast<acc_t>(dy[off + c]);
          if constexpr (kUsesInput) {
            v += k[c].b * (static_cast<acc_t>(x[off + c]) - mean[c]) + k[c].c;
          }
          dx[off + c] = static_cast<scalar_t>(v);
        }
      });
}

// ---------------------------------------------------------------------------------
// Per-channel parameters

template <typename param_t, typename acc_t>
std::vector<acc_t> load_channels(const std::optional<at::Tensor>& t, int64_t C, acc_t fallback) {
  std::vector<acc_t> out(C, fallback);
  if (t.has_value() && t->defined()) {
    const auto a = t->accessor<param_t, 1>();
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<acc_t>(a[c]);
    }
  }
  return out;
}

template <typename param_t, typename acc_t>
void store_channels(at::Tensor& t, const std::vector<acc_t>& values) {
  auto a = t.accessor<param_t, 1>();
  for (int64_t c = 0; c < static_cast<int64_t>(values.size()); ++c) {
    a[c] = static_cast<param_t>(values[c]);
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
  const int64_t C = l.channels;
  const int64_t count = l.per_channel();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();

  std::vector<acc_t> center(C);
  std::vector<acc_t> invstd(C);
  const bool update_running = training && running_mean.has_value() && running_mean->defined();
  if (training) {
    const auto stats = channel_stats(x_data, l);
    for (int64_t c = 0; c < C; ++c) {
      center[c] = static_cast<acc_t>(stats[c].mean);
      // An empty batch has no variance; invstd 0 rather than NaN keeps the gradients of
      // weight (sums over no elements) zero, as torch's are.
      invstd[c] =
          count == 0 ? acc_t(0) : math::batch_invstd(static_cast<acc_t>(stats[c].m2 / count), eps);
    }
    if (update_running && count > 0) {
      auto rm = load_channels<param_t, acc_t>(running_mean, C, 0);
      auto rv = load_channels<param_t, acc_t>(running_var, C, 0);
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = math::running_update(rm[c], static_cast<acc_t>(stats[c].mean), momentum);
        rv[c] = math::running_update(
            rv[c], static_cast<acc_t>(math::unbiased_var(stats[c].m2, count)), momentum);
      }
      at::Tensor rm_t = *running_mean;
      at::Tensor rv_t = *running_var;
      store_channels<param_t>(rm_t, rm);
      store_channels<param_t>(rv_t, rv);
    }
    store_channels<acc_t>(save_mean, center);
    store_channels<acc_t>(save_invstd, invstd);
  } else {
    const auto rv = load_channels<param_t, acc_t>(running_var, C, 1);
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = math::running_invstd(rv[c], eps);
    }
  }

  const auto w = load_channels<param_t, acc_t>(weight, C, 1);
  const auto b = load_channels<param_t, acc_t>(bias, C, 0);
  std::vector<acc_t> scale(C);
  std::vector<acc_t> shift(C);
  if (training) {
    // Centre first: (x - mean) is exact for inputs near the mean, so large-mean inputs
    // keep their precision.
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = invstd[c] * w[c];
      shift[c] = b[c];
    }
  } else {
    // Evaluation folds the running statistics into one multiply-add per element.
    const auto rm = load_channels<param_t, acc_t>(running_mean, C, 0);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = invstd[c] * w[c];
      shift[c] = b[c] - rm[c] * scale[c];
      center[c] = 0;
    }
  }
  channel_affine(x_data, out.mutable_data_ptr<scalar_t>(), center.data(), scale.data(), shift.data(), l);
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
  at::Tensor save_mean = at::zeros({saved}, input.options().dtype(acc_type));
  at::Tensor save_invstd = at::zeros({saved}, input.options().dtype(acc_type));
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
  const int64_t C = l.channels;
  const int64_t count = l.per_channel();
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();

  std::vector<acc_t> mean;
  std::vector<acc_t> invstd;
  if (training) {
    mean = load_channels<acc_t, acc_t>(save_mean, C, 0);
    invstd = load_channels<acc_t, acc_t>(save_invstd, C, 0);
  } else {
    mean = load_channels<param_t, acc_t>(running_mean, C, 0);
    invstd = load_channels<param_t, acc_t>(running_var, C, 1);
    for (auto& v : invstd) {
      v = math::running_invstd(v, eps);
    }
  }

  std::vector<GradSums> sums(C);
  if (training ? (mask[0] || mask[1] || mask[2]) : (mask[1] || mask[2])) {
    sums = grad_sums(dy_data, x_data, mean.data(), l);
  }
  if (mask[1]) {
    std::vector<acc_t> gw(C);
    for (int64_t c = 0; c < C; ++c) {
      gw[c] = static_cast<acc_t>(sums[c].dy_xmu) * invstd[c];
    }
    store_channels<param_t>(grad_weight, gw);
  }
  if (mask[2]) {
    std::vector<acc_t> gb(C);
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = static_cast<acc_t>(sums[c].dy);
    }
    store_channels<param_t>(grad_bias, gb);
  }
  if (mask[0]) {
    const auto w = load_channels<param_t, acc_t>(weight, C, 1);
    std::vector<math::GradInputCoeffs<acc_t>> k(C);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = math::grad_input_coeffs<acc_t>(
          w[c], invstd[c], static_cast<acc_t>(sums[c].dy), static_cast<acc_t>(sums[c].dy_xmu),
          count, training);
    }
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    if (training) {
      grad_input_pass<true>(dy_data, x_data, dx, mean.data(), k.data(), l);
    } else {
      grad_input_pass<false>(dy_data, x_data, dx, mean.data(), k.data(), l);
    }
  }
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
  at::Tensor grad_input = mask[0] ? at::empty_like(x) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::zeros({mask[1] ? C : 0}, input.options().dtype(pdtype));
  at::Tensor grad_bias = at::zeros({mask[2] ? C : 0}, input.options().dtype(pdtype));

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
