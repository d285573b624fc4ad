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
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
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

// Outputs of a pass whose tensors (inputs read and output written, `tensors` of the
// output's size) add up to at least this many bytes are written with streaming stores:
// such a pass leaves little of them in cache for the next op anyway, and a streamed line
// is not read from memory before it is overwritten, which saves a third of an
// elementwise pass's traffic. (Measured on the benchmark machine, 1 thread, output /
// torch time, ours with and without streaming: channels-last [32, 128, 28, 28] float32
// training forward+backward 0.92-1.01x -> 1.41-1.48x; at [32, 256, 14, 14] (x and y
// 12.8 MB, no streaming in the forward; dy, x and dx 19.2 MB) 0.95-0.97x -> 1.02-1.08x,
// where an evaluation that streamed would drop from 1.02x to 0.95x, as its output stays
// in cache.)
constexpr int64_t kStreamBytes = int64_t{16} << 20;
// ... as long as NCHW runs are long: the cache lines a run shares with its neighbours are
// written with ordinary stores, and streaming many short runs costs more than it saves.
constexpr int64_t kStreamRunBytes = 1024;
// Runs half as long still pay off where the output alone is that large: NCHW float32
// [32, 1024, 14, 14] (784-byte runs, 25.7 MB), ours before / after, in one process:
// evaluation 3581 / 2481 us (1 thread), 1821 / 1293 us (2 threads); training forward
// 4228 / 3332 us; forward+backward 12129 / 10582 us (1 thread), 5367 / 5005 us (2
// threads). With a 12.8 MB output ([32, 512, 14, 14]) the same runs streamed measured
// from 5% faster to 33% slower, as that output stays in cache between calls.
constexpr int64_t kStreamShortRunBytes = 512;
// Evaluation (a pass with the running statistics) streams only passes larger than the
// cache: its output is dead once the next layer has read it, so an output that stays in
// cache need never reach memory at all. On the benchmark machine a copy whose source and
// destination add up to 32 MiB runs from cache (27 GB/s, 1 thread), 48 MiB at 19 GB/s,
// 64 MiB or more at memory speed (12.6 GB/s). The size is measured, not read from the
// CPU: this VM reports a 480 MiB L3, shared with other tenants. (Evaluation, torch / ours
// time with this threshold and with kStreamBytes, rounds in random order, 1 thread:
// float32 [4096, 1024] (33.5 MB) 1.00x / 0.81x, channels-last [32, 128, 28, 28] and
// [32, 2048, 7, 7] (25.7 MB) 1.02x / 0.82x and 1.00x / 0.80x, bfloat16 channels-last
// [32, 1024, 14, 14] 1.18x / 0.94x; 2 threads, float32 0.98-1.12x / 1.00-1.08x, bfloat16
// 0.97-1.15x / 0.82-1.18x. Passes of 51.4 MB, which keep streaming, measured from 6%
// slower to 36% faster streamed than not over three runs, with the cache that other
// tenants of the machine left.)
constexpr int64_t kStreamEvalBytes = int64_t{40} << 20;

// Whether `out`, written by a pass that moves `tensors` tensors of its size, takes
// streaming stores; `min_bytes` is kStreamBytes or kStreamEvalBytes.
bool streams(const at::Tensor& out, const Layout& l, int64_t tensors, int64_t min_bytes) {
  const auto out_bytes = static_cast<int64_t>(out.nbytes());
  const int64_t run_bytes = l.inner * static_cast<int64_t>(out.element_size());
  return out_bytes * tensors >= min_bytes &&
      (l.rows || run_bytes >= kStreamRunBytes ||
       (run_bytes >= kStreamShortRunBytes && out_bytes >= kStreamBytes));
}

// Per-call buffers of a few values per channel: on the stack for the channel counts of
// small inputs, whose arithmetic costs less than a heap allocation.
template <typename T>
using Buffer = c10::SmallVector<T, 2048 / sizeof(T)>;

// A Buffer of n values left unset, for callers that write each before they read it: the
// per-channel coefficients of a pass, zeroed, took 7-11% of a backward with many channels
// and few rows.
template <typename T>
Buffer<T> unset_buffer(int64_t n) {
  Buffer<T> out;
  out.resize_for_overwrite(static_cast<size_t>(n));
  return out;
}

// grad_out walked like the input: as it usually has the input's strides already, that
// case skips same_layout's views.
at::Tensor grad_in_layout(const at::Tensor& grad_out, const at::Tensor& x, const Layout& l) {
  return grad_out.strides() == x.strides() ? grad_out : same_layout(grad_out, l);
}

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

// Channels-last reductions with few pieces of rows also split the channels into blocks,
// so that a short, wide input ([256, 4096], say) still gives the threads work. Each
// channel is summed in the same order whatever the blocks, so they change nothing but the
// work split.
constexpr int64_t kMinTasks = 16;
constexpr int64_t kMinBlockChannels = 64;

int64_t cl_channel_blocks(const Layout& l, int64_t pieces) {
  const int64_t wanted = (kMinTasks + pieces - 1) / pieces;
  return std::max<int64_t>(1, std::min(wanted, l.channels / kMinBlockChannels));
}

// Channels [c0, c1) of block b of `blocks`: multiples of 16 channels (whole vectors).
std::pair<int64_t, int64_t> channel_block(int64_t C, int64_t blocks, int64_t b) {
  const int64_t size = ((C + blocks - 1) / blocks + 15) / 16 * 16;
  const int64_t c0 = std::min(C, b * size);
  return {c0, std::min(C, c0 + size)};
}

// Calls f(offset, spans, len) on the cache-sized groups of runs n0..n1-1 of channel c
// (NCHW; runs are `inner` long, C * inner apart): several short runs per group, or
// pieces of one long run. `f` by reference: this runs once per channel, and a lambda
// passed by value went to the stack as 8-byte stores read back as 16-byte loads, two
// store-forwarding stalls a channel (NCHW [8, 256, 7, 7]: 11% of a backward).
template <typename F>
void for_each_group(const Layout& l, int64_t c, int64_t n0, int64_t n1, const F& f) {
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

// Runs f(c0, c1) over blocks of channels in parallel (NCHW), for the passes that reduce a
// block and then write its elementwise output. A block holds up to kFusedBlockBytes of the
// tensors the reduction reads (`value_bytes` per value of a channel), which stay in cache
// for the elementwise pass; that pass then writes the block's runs of each batch entry as
// one stretch of memory. (Channel by channel, each short run written is a cache miss of
// its own, which the hardware prefetcher does not see coming.) At least kMinTasks blocks,
// and four per thread, where there are channels enough. (Blocks change the order of the
// work, never that of a sum: every channel is reduced alone.)
constexpr int64_t kFusedBlockBytes = int64_t{256} << 10;

template <typename F>
void for_each_channel_block(const Layout& l, int64_t value_bytes, F f) {
  const int64_t C = l.channels;
  const int64_t per_channel = std::max<int64_t>(1, l.per_channel() * value_bytes);
  const int64_t min_blocks = std::max<int64_t>(kMinTasks, 4 * at::get_num_threads());
  const int64_t size =
      std::clamp<int64_t>(kFusedBlockBytes / per_channel, 1, (C + min_blocks - 1) / min_blocks);
  const int64_t blocks = (C + size - 1) / size;
  at::parallel_for(0, blocks, grain_for(l.per_channel() * size), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      f(b * size, std::min(C, (b + 1) * size));
    }
  });
}

// Runs f(row0, rows) over all rows, in parallel (channels-last).
template <typename F>
void for_each_rows(const Layout& l, F f) {
  at::parallel_for(0, l.outer, grain_for(l.channels), [&](int64_t begin, int64_t end) {
    f(begin, end - begin);
  });
}

// Runs f(p, r0, r1, c0, c1, scratch) in parallel over the tasks of a channels-last
// reduction: piece p of `pieces` (rows [r0, r1)) times channel block [c0, c1) of
// `blocks`, with `scratch_size` acc_t of scratch per thread.
template <typename acc_t, typename F>
void for_each_cl_task(const Layout& l, int64_t pieces, int64_t blocks, int64_t scratch_size, F f) {
  const int64_t rows = l.outer;
  const int64_t task_elems = rows / pieces * (l.channels / blocks);
  at::parallel_for(0, pieces * blocks, grain_for(task_elems), [&](int64_t begin, int64_t end) {
    // Uninitialised: each task zeroes what it uses.
    const auto scratch = std::make_unique_for_overwrite<acc_t[]>(scratch_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / blocks;
      const auto [c0, c1] = channel_block(l.channels, blocks, task % blocks);
      f(p, rows * p / pieces, rows * (p + 1) / pieces, c0, c1, scratch.get());
    }
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
    mean[c] = math::merged_mean(mean[c], mean_b[c], frac);
    m2[c] += m2_b[c] + math::merge_m2_term(delta, weight);
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

// ---------------------------------------------------------------------------------
// Reductions

// Mean and M2 of channel c over the runs of batch entries [n0, n1) (planes layout).
template <typename scalar_t>
Welford<double> channel_piece_stats(
    const Loops<scalar_t>& loop, const scalar_t* x, const Layout& l, int64_t c, int64_t n0,
    int64_t n1) {
  Welford<double> acc;
  for_each_group(l, c, n0, n1, [&](int64_t off, int64_t spans, int64_t len) {
    acc = math::welford_merge(acc, loop.group_stats(x + off, spans, len, l.channels * l.inner));
  });
  return acc;
}

// K per-channel arrays of C doubles, one after another: the layout in which the
// channels-last reductions leave their results (rows_stats, rows_grad_sums), so that the
// per-channel finish reads them where they lie. Zero on construction, or, for a reduction
// that writes every value, left unset (Unset) with room for `pieces` sets of K arrays (its
// per-piece partial results, merged into the first set).
template <int K>
class ChannelArrays {
 public:
  struct Unset {};

  explicit ChannelArrays(int64_t C) : C_(C), values_(K * C, 0.0) {}
  ChannelArrays(int64_t C, int64_t pieces, Unset) : C_(C) {
    values_.resize_for_overwrite(static_cast<size_t>(K * C * pieces));
  }

  // The K arrays of piece p, array k at [k * C, (k + 1) * C).
  double* piece(int64_t p) {
    return values_.data() + K * C_ * p;
  }

 protected:
  const double* array(int k) const {
    return values_.data() + k * C_;
  }
  double at(int k, int64_t c) const {
    return values_[k * C_ + c];
  }
  double& at(int k, int64_t c) {
    return values_[k * C_ + c];
  }

 private:
  int64_t C_;
  Buffer<double> values_;
};

// Mean and M2 of every channel (arrays 0 and 1), over `count` values each: every channel
// has as many.
class ChannelStats : public ChannelArrays<2> {
 public:
  using ChannelArrays::ChannelArrays;

  double mean(int64_t c) const {
    return at(0, c);
  }
  double m2(int64_t c) const {
    return at(1, c);
  }
  void set(int64_t c, const Welford<double>& w) {
    at(0, c) = w.mean;
    at(1, c) = w.m2;
    count = w.count;
  }

  int64_t count = 0;
};

// Mean, M2 and count of every channel.
template <typename scalar_t>
ChannelStats channel_stats(const scalar_t* x, const Layout& l) {
  using acc_t = at::opmath_type<scalar_t>;
  const Loops<scalar_t>& loop = loops<scalar_t>();
  const int64_t C = l.channels;
  if (C == 0 || l.per_channel() == 0) {
    return ChannelStats(C);
  }
  if (l.rows) {
    const int64_t rows = l.outer;
    const int64_t pieces = cl_pieces(l);
    const int64_t block = rows_per_block(C);
    const int64_t blocks = cl_channel_blocks(l, pieces);
    ChannelStats result(C, pieces, ChannelStats::Unset{});  // each piece written by its tasks
    for_each_cl_task<acc_t>(
        l, pieces, blocks, 3 * C,
        [&](int64_t p, int64_t r0, int64_t r1, int64_t c0, int64_t c1, acc_t* scratch) {
          double* mean = result.piece(p);
          loop.rows_stats(
              x + r0 * C + c0, r1 - r0, c1 - c0, C, block, mean + c0, mean + C + c0, scratch);
        });
    // The pieces merged into the first, in order.
    double* mean = result.piece(0);
    double* m2 = mean + C;
    int64_t n = rows / pieces;
    for (int64_t p = 1; p < pieces; ++p) {
      const double* piece = result.piece(p);
      const int64_t piece_rows = rows * (p + 1) / pieces - rows * p / pieces;
      merge_channel_stats(mean, m2, &n, piece, piece + C, piece_rows, C);
    }
    result.count = n;
    return result;
  }
  const int64_t pieces = nchw_pieces(l);
  Buffer<Welford<double>> partial(C * pieces);
  at::parallel_for(0, C * pieces, grain_for(l.per_channel() / pieces), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / pieces;
      const int64_t p = task % pieces;
      partial[task] =
          channel_piece_stats(loop, x, l, c, l.outer * p / pieces, l.outer * (p + 1) / pieces);
    }
  });
  ChannelStats result(C);
  for (int64_t c = 0; c < C; ++c) {
    Welford<double> total;
    for (int64_t p = 0; p < pieces; ++p) {
      total = math::welford_merge(total, partial[c * pieces + p]);
    }
    result.set(c, total);
  }
  return result;
}

// The sums (GradSums) of every channel: sum(dy), sum(dy * (x - mean)) and sum(x - mean) in
// arrays 0, 1 and 2.
class ChannelGradSums : public ChannelArrays<3> {
 public:
  using ChannelArrays::ChannelArrays;

  GradSums operator[](int64_t c) const {
    return {at(0, c), at(1, c), at(2, c)};
  }
  const double* dy() const {
    return array(0);
  }
  const double* dy_xmu() const {
    return array(1);
  }
  const double* xmu() const {
    return array(2);
  }
  void set(int64_t c, const GradSums& v) {
    at(0, c) = v.dy;
    at(1, c) = v.dy_xmu;
    at(2, c) = v.xmu;
  }
};

// The sums (GradSums) about `mean` of channel c over batch entries [n0, n1) (planes).
template <typename scalar_t>
GradSums channel_piece_grad_sums(
    const Loops<scalar_t>& loop, const scalar_t* dy, const scalar_t* x, const Layout& l,
    int64_t c, int64_t n0, int64_t n1, at::opmath_type<scalar_t> mean) {
  GradSums acc;
  for_each_group(l, c, n0, n1, [&](int64_t off, int64_t spans, int64_t len) {
    acc += loop.group_grad_sums(dy + off, x + off, spans, len, l.channels * l.inner, mean);
  });
  return acc;
}

// The sums (GradSums) of every channel about its mean.
template <typename scalar_t>
ChannelGradSums channel_grad_sums(
    const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* mean, const Layout& l) {
  using acc_t = at::opmath_type<scalar_t>;
  const Loops<scalar_t>& loop = loops<scalar_t>();
  const int64_t C = l.channels;
  if (C == 0 || l.per_channel() == 0) {
    return ChannelGradSums(C);
  }
  if (l.rows) {
    const int64_t pieces = cl_pieces(l);
    const int64_t block = rows_per_block(C);
    const int64_t blocks = cl_channel_blocks(l, pieces);
    ChannelGradSums result(C, pieces, ChannelGradSums::Unset{});  // as in channel_stats
    for_each_cl_task<acc_t>(
        l, pieces, blocks, 3 * C,
        [&](int64_t p, int64_t r0, int64_t r1, int64_t c0, int64_t c1, acc_t* scratch) {
          double* sums = result.piece(p);
          loop.rows_grad_sums(
              dy + r0 * C + c0, x + r0 * C + c0, r1 - r0, c1 - c0, C, block, mean + c0,
              sums + c0, sums + C + c0, sums + 2 * C + c0, scratch);
        });
    // The pieces added to the first, in order.
    double* first = result.piece(0);
    for (int64_t p = 1; p < pieces; ++p) {
      const double* sums = result.piece(p);
      for (int64_t i = 0; i < 3 * C; ++i) {
        first[i] += sums[i];
      }
    }
    return result;
  }
  const int64_t pieces = nchw_pieces(l);
  Buffer<GradSums> partial(C * pieces);
  at::parallel_for(0, C * pieces, grain_for(l.per_channel() / pieces), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / pieces;
      const int64_t p = task % pieces;
      partial[task] = channel_piece_grad_sums(
          loop, dy, x, l, c, l.outer * p / pieces, l.outer * (p + 1) / pieces, mean[c]);
    }
  });
  ChannelGradSums result(C);
  for (int64_t c = 0; c < C; ++c) {
    GradSums total;
    for (int64_t p = 0; p < pieces; ++p) {
      total += partial[c * pieces + p];
    }
    result.set(c, total);
  }
  return result;
}

// ---------------------------------------------------------------------------------
// Ops

// Calls f(std::type_identity<param_t>) with the parameters' type: float for a reduced
// precision input with float parameters (`mixed`), else the input's own type.
template <typename scalar_t, typename F>
void with_param_type(bool mixed, F f) {
  if (mixed) {
    f(std::type_identity<float>{});
  } else {
    f(std::type_identity<scalar_t>{});
  }
}

template <typename scalar_t, typename param_t>
void forward_impl(
    const at::Tensor& x, const Layout& l, at::Tensor& out, at::Tensor& save_mean,
    at::Tensor& save_invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    const ChannelStats* given = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const Loops<scalar_t>& loop = loops<scalar_t>();
  const int64_t C = l.channels;
  if (C == 0) {
    return;  // every output is empty (and the work splitting divides by C)
  }
  const int64_t count = l.per_channel();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* y_data = out.mutable_data_ptr<scalar_t>();
  const bool stream = streams(out, l, /*tensors=*/2, training ? kStreamBytes : kStreamEvalBytes);

  // Per channel: weight, bias, and y = (x - centre) * scale + shift.
  auto buffer = unset_buffer<acc_t>(5 * C);
  acc_t* w = buffer.data();
  acc_t* b = w + C;
  acc_t* centre = b + C;
  acc_t* scale = centre + C;
  acc_t* shift = scale + C;
  load_channels<param_t>(weight, C, acc_t(1), w);
  load_channels<param_t>(bias, C, acc_t(0), b);

  // The elementwise pass. (Evaluation has no centre: it is folded into the shift.)
  const auto normalize = [&] {
    if (count == 0) {
      return;
    }
    const acc_t* centre_or_null = training ? centre : nullptr;
    if (l.rows) {
      for_each_rows(l, [&](int64_t r0, int64_t rows) {
        loop.rows_affine(
            x_data + r0 * C, y_data + r0 * C, rows, C, centre_or_null, scale, shift, stream);
      });
      return;
    }
    for_each_runs(l, [&](int64_t r0, int64_t runs) {
      const int64_t off = r0 * l.inner;
      loop.runs_affine(
          x_data + off, y_data + off, /*spans=*/1, /*stride=*/0, runs, l.inner, r0 % C, C,
          centre_or_null, scale, shift, stream);
    });
  };

  if (!training) {
    // Evaluation folds the running statistics into one multiply-add per element.
    load_channels<param_t>(running_mean, C, acc_t(0), centre);
    load_channels<param_t>(running_var, C, acc_t(1), scale);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = math::running_invstd(scale[c], eps) * w[c];
      shift[c] = b[c] - centre[c] * scale[c];
    }
    normalize();
    return;
  }

  // `given`: statistics of every channel gathered elsewhere (batch_norm_forward_with_stats),
  // whose count includes values this input does not hold.
  const bool update_running =
      running_mean.has_value() && running_mean->defined() && (given != nullptr || count > 0);
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
  // keep their precision. save_mean, the centre, is the mean rounded to acc_t; the shift
  // puts back what that rounding dropped, y = (x - mean) * scale + (b - residual * scale),
  // since with a large scale (a variance near eps) half a unit in the last place of the
  // mean would move y by several units in the fifth digit.
  // Channels [c0, c1) from their statistics stats[c0..c1). One loop over a range, not a
  // call per channel: a layer with many channels and few values each ([32, 4096], say)
  // spends a good part of its time here. (This, with channel_stats merging into its first
  // piece, took float32 [2, 4096] from 65 to 52 us in training forward, 1 thread; the
  // same loop took its backward from 78 to 43 us.) The running statistics are updated in
  // a loop of their own: the branch on them and their accessors' stores, which the
  // compiler must assume may alias the other arrays, cost [2, 4096] 53-61 against 50 us,
  // [32, 4096] 88-93 against 82-86 (cpu-optimisations.md). The main loop vectorises
  // (TBN_INDEPENDENT_ITERATIONS): [2, 4096] 33 -> 25 us, [32, 4096] 65 -> 56.
  const auto finish_channels = [&](int64_t c0, int64_t c1, const ChannelStats& stats) {
    const int64_t n = stats.count;
    if (update_running) {
      for (int64_t c = c0; c < c1; ++c) {
        (*rm)[c] = static_cast<param_t>(math::running_update(
            static_cast<acc_t>((*rm)[c]), static_cast<acc_t>(stats.mean(c)), momentum));
        (*rv)[c] = static_cast<param_t>(math::running_update(
            static_cast<acc_t>((*rv)[c]), static_cast<acc_t>(math::unbiased_var(stats.m2(c), n)),
            momentum));
      }
    }
    TBN_INDEPENDENT_ITERATIONS
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t mean = static_cast<acc_t>(stats.mean(c));
      const acc_t invstd = math::batch_invstd_from_m2(static_cast<acc_t>(stats.m2(c)), n, eps);
      save_m[c] = mean;
      save_i[c] = invstd;
      centre[c] = mean;
      scale[c] = invstd * w[c];
      const double residual = stats.mean(c) - static_cast<double>(mean);
      shift[c] = b[c] - static_cast<acc_t>(residual) * scale[c];
    }
  };

  if (given != nullptr) {
    finish_channels(0, C, *given);
    normalize();
    return;
  }
  if (count == 0) {
    finish_channels(0, C, ChannelStats(C));
    return;
  }

  if (!l.rows && nchw_pieces(l) == 1) {
    // Each block of channels normalised right after its statistics, while it is still in
    // cache (L2): memory is read once, not twice.
    ChannelStats stats(C);
    for_each_channel_block(l, x.element_size(), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        stats.set(c, channel_piece_stats(loop, x_data, l, c, 0, l.outer));
      }
      finish_channels(c0, c1, stats);
      const int64_t off = c0 * l.inner;
      loop.runs_affine(
          x_data + off, y_data + off, l.outer, C * l.inner, c1 - c0, l.inner, c0, C, centre,
          scale, shift, stream);
    });
    return;
  }
  finish_channels(0, C, channel_stats(x_data, l));
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
  at::Tensor out = empty_result(input);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const int64_t saved = training ? l.channels : 0;
  // Every element is written by the kernel.
  at::Tensor save_mean = at::empty({saved}, input.options().dtype(acc_type));
  at::Tensor save_invstd = at::empty({saved}, input.options().dtype(acc_type));
  const bool mixed = is_mixed_type(input, {&weight, &bias, &running_mean, &running_var});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_forward_cpu", [&] {
    with_param_type<scalar_t>(mixed, [&](auto param) {
      forward_impl<scalar_t, typename decltype(param)::type>(
          x, l, out, save_mean, save_invstd, weight, bias, running_mean, running_var, training,
          momentum, eps);
    });
  });
  return {out, save_mean, save_invstd};
}

template <typename scalar_t, typename param_t>
void backward_impl(
    const at::Tensor& dy, const at::Tensor& x, const Layout& l, at::Tensor& grad_input,
    at::Tensor& grad_weight, at::Tensor& grad_bias, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean, const std::optional<at::Tensor>& save_invstd,
    bool training, double eps, std::array<bool, 3> mask,
    const ChannelGradSums* given_sums = nullptr, int64_t given_count = 0) {
  using acc_t = at::opmath_type<scalar_t>;
  const Loops<scalar_t>& loop = loops<scalar_t>();
  const int64_t C = l.channels;
  if (C == 0) {
    return;  // every output is empty (and the work splitting divides by C)
  }
  const int64_t count = l.per_channel();
  // `given_sums`: sums over `given_count` values per channel gathered elsewhere
  // (batch_norm_backward_elemt); this input holds only some of them. They are taken about
  // the mean given (torch's sums, from batch_norm_backward_reduce), without sum(x - mean).
  const int64_t total = given_sums != nullptr ? given_count : count;
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* dx_data = mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  // Training reads dy and x for dx, evaluation dy alone.
  const bool stream =
      mask[0] && streams(grad_input, l, /*tensors=*/training ? 3 : 2, kStreamBytes);
  // grad_weight and grad_bias, written by the per-channel finish in the accumulation type:
  // into the outputs where they are asked for and of that type, else into scratch arrays
  // (not asked for: so that the loop stores without a branch; half weights of a half
  // input: converted after it).
  constexpr bool kAccParams = std::is_same_v<param_t, acc_t>;
  auto scratch = unset_buffer<acc_t>(kAccParams && mask[1] && mask[2] ? 0 : 2 * C);
  acc_t* gw = kAccParams && mask[1] ? grad_weight.mutable_data_ptr<acc_t>() : scratch.data();
  acc_t* gb = kAccParams && mask[2] ? grad_bias.mutable_data_ptr<acc_t>() : scratch.data() + C;

  // Per channel: mean, invstd, weight, and dx = a * dy + b * (x - mean) + k.
  auto buffer = unset_buffer<acc_t>(6 * C);
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

  // Channels [c0, c1) from sums[c0..c1), in one loop of the inner loops', compiled for
  // this CPU's vectors (in the baseline's 16-byte ones, as part of this file, it took a
  // fifth of a float32 [2, 16384] backward).
  const auto finish_channels = [&](int64_t c0, int64_t c1, const ChannelGradSums& sums) {
    loop.grad_coeffs(sums.dy() + c0,
                     sums.dy_xmu() + c0,
                     sums.xmu() + c0,
                     c1 - c0,
                     total,
                     training,
                     invstd + c0,
                     w + c0,
                     gw + c0,
                     gb + c0,
                     a + c0,
                     b + c0,
                     k + c0);
    if constexpr (!kAccParams) {
      if (mask[1]) {
        std::copy(gw + c0, gw + c1, grad_weight.mutable_data_ptr<param_t>() + c0);
      }
      if (mask[2]) {
        std::copy(gb + c0, gb + c1, grad_bias.mutable_data_ptr<param_t>() + c0);
      }
    }
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
        rows_fn(dy_data + off, x_data + off, dx_data + off, rows, C, mean, a, b, k, stream);
      });
      return;
    }
    const auto runs_fn = training ? loop.runs_grad_input : loop.runs_grad_input_eval;
    for_each_runs(l, [&](int64_t r0, int64_t runs) {
      const int64_t off = r0 * l.inner;
      runs_fn(
          dy_data + off, x_data + off, dx_data + off, /*spans=*/1, /*stride=*/0, runs, l.inner,
          r0 % C, C, mean, a, b, k, stream);
    });
  };

  if (given_sums != nullptr) {
    finish_channels(0, C, *given_sums);
    grad_input_pass();
    return;
  }
  if (!need_sums || count == 0) {
    finish_channels(0, C, ChannelGradSums(C));
    grad_input_pass();
    return;
  }

  if (!l.rows && nchw_pieces(l) == 1 && dx_data != nullptr) {
    // Each block of channels' dx written right after its sums, while its dy and x are
    // still in cache.
    const auto runs_fn = training ? loop.runs_grad_input : loop.runs_grad_input_eval;
    ChannelGradSums sums(C);
    for_each_channel_block(l, 2 * x.element_size(), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        sums.set(c, channel_piece_grad_sums(loop, dy_data, x_data, l, c, 0, l.outer, mean[c]));
      }
      finish_channels(c0, c1, sums);
      const int64_t off = c0 * l.inner;
      runs_fn(
          dy_data + off, x_data + off, dx_data + off, l.outer, C * l.inner, c1 - c0, l.inner, c0,
          C, mean, a, b, k, stream);
    });
    return;
  }
  finish_channels(0, C, channel_grad_sums(dy_data, x_data, mean, l));
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
  const at::MemoryFormat grad_format = grad_input_format(input, grad_out);
  Layout l{};
  const at::Tensor x = kernel_layout(input.contiguous(grad_format), l);
  const at::Tensor dy = grad_in_layout(grad_out, x, l);
  const bool mixed = is_mixed_type(input, {&weight, &running_mean, &running_var});
  const auto pdtype = param_dtype(input, mixed);
  const int64_t C = l.channels;
  // Every element of each requested output is written by the kernel.
  at::Tensor grad_input =
      mask[0] ? empty_in_format(input, grad_format) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({mask[1] ? C : 0}, input.options().dtype(pdtype));
  at::Tensor grad_bias = at::empty({mask[2] ? C : 0}, input.options().dtype(pdtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_cpu", [&] {
    with_param_type<scalar_t>(mixed, [&](auto param) {
      backward_impl<scalar_t, typename decltype(param)::type>(
          dy, x, l, grad_input, grad_weight, grad_bias, weight, running_mean, running_var,
          save_mean, save_invstd, training, eps, mask);
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------
// Training split into pieces (SyncBatchNorm)

template <typename acc_t>
Buffer<acc_t> channel_values(const at::Tensor& t) {
  Buffer<acc_t> out(t.numel());
  load_channels<acc_t>(t, t.numel(), acc_t(0), out.data());
  return out;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  check_batch_norm_stats(input);
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const auto options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor mean = at::empty({l.channels}, options);
  at::Tensor m2 = at::empty({l.channels}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stats = channel_stats(x.const_data_ptr<scalar_t>(), l);
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* m2_data = m2.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.channels; ++c) {
      mean_data[c] = static_cast<acc_t>(stats.mean(c));
      m2_data[c] = static_cast<acc_t>(stats.m2(c));
    }
  });
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_with_stats_cpu(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const at::Tensor& mean,
    const at::Tensor& m2,
    int64_t count,
    double momentum,
    double eps) {
  check_batch_norm_forward_with_stats(
      input, weight, bias, running_mean, running_var, mean, m2, count, eps);
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  at::Tensor out = empty_result(input);
  at::Tensor save_mean = at::empty_like(mean, at::MemoryFormat::Contiguous);
  at::Tensor save_invstd = at::empty_like(mean, at::MemoryFormat::Contiguous);
  const bool mixed = is_mixed_type(input, {&weight, &bias, &running_mean, &running_var});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_forward_with_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto means = channel_values<acc_t>(mean);
    const auto m2s = channel_values<acc_t>(m2);
    ChannelStats given(l.channels);
    for (int64_t c = 0; c < l.channels; ++c) {
      given.set(c, Welford<double>{means[c], m2s[c], count});
    }
    with_param_type<scalar_t>(mixed, [&](auto param) {
      forward_impl<scalar_t, typename decltype(param)::type>(
          x, l, out, save_mean, save_invstd, weight, bias, running_mean, running_var,
          /*training=*/true, momentum, eps, &given);
    });
  });
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd) {
  check_batch_norm_backward_reduce(grad_out, input, mean, invstd);
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const at::Tensor dy = grad_in_layout(grad_out, x, l);
  at::Tensor sum_dy = at::empty_like(mean, at::MemoryFormat::Contiguous);
  at::Tensor sum_dy_xmu = at::empty_like(mean, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto means = channel_values<acc_t>(mean);
    const auto sums = channel_grad_sums(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), means.data(), l);
    acc_t* s = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* sx = sum_dy_xmu.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.channels; ++c) {
      const GradSums sc = sums[c];
      s[c] = static_cast<acc_t>(sc.dy);
      sx[c] = static_cast<acc_t>(sc.dy_xmu);
    }
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    int64_t count) {
  check_batch_norm_backward_elemt(
      grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count);
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const at::Tensor dy = grad_in_layout(grad_out, x, l);
  at::Tensor grad_input = empty_result(input);
  at::Tensor unused;
  const bool mixed = is_mixed_type(input, {&weight});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = channel_values<acc_t>(sum_dy);
    const auto sx = channel_values<acc_t>(sum_dy_xmu);
    ChannelGradSums sums(l.channels);
    for (int64_t c = 0; c < l.channels; ++c) {
      sums.set(c, GradSums{s[c], sx[c], 0.0});
    }
    const std::array<bool, 3> mask{true, false, false};
    with_param_type<scalar_t>(mixed, [&](auto param) {
      backward_impl<scalar_t, typename decltype(param)::type>(
          dy, x, l, grad_input, unused, unused, weight, std::nullopt, std::nullopt, mean, invstd,
          /*training=*/true, /*eps=*/0.0, mask, &sums, count);
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(torch_batchnorm, CPU, m) {
  m.impl("batch_norm_forward", &cpu::batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &cpu::batch_norm_backward_cpu);
  m.impl("batch_norm_stats", &cpu::batch_norm_stats_cpu);
  m.impl("batch_norm_forward_with_stats", &cpu::batch_norm_forward_with_stats_cpu);
  m.impl("batch_norm_backward_reduce", &cpu::batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &cpu::batch_norm_backward_elemt_cpu);
}

}  // namespace torch_batchnorm
