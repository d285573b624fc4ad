#pragma once

// What one thread of the CUDA kernels (batch_norm_launch_impl.cuh) computes: its loads, the
// per-channel maps of the elementwise pass, and its share of a reduction with the merge
// and finalization of partial results. Host-and-device code, so that tests run it on the
// CPU (tests/cpp/ops/cuda). The warp shuffles are in batch_norm_launch_impl.cuh.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

#include "ops/batch_norm_math.h"
#include "ops/cuda/batch_norm_geometry.h"

namespace torch_batchnorm {
namespace cuda {

// A value another block wrote: on the device loaded from L2, past this SM's L1.
template <typename T>
TBN_HOST_DEVICE T load_from_l2(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// Elements of one 16-byte load.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads the first n of kUnroll vectors; the rest are zero (never used, but defined).
template <int VEC, typename scalar_t>
TBN_HOST_DEVICE void load_packs(const scalar_t* __restrict__ base,
                                const int64_t (&offs)[kUnroll],
                                int n,
                                Pack<scalar_t, VEC> (&out)[kUnroll]) {
  const auto* packs = reinterpret_cast<const Pack<scalar_t, VEC>*>(base);
  TBN_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    if (u < n) {
      out[u] = packs[offs[u]];
    } else {
      TBN_UNROLL
      for (int k = 0; k < VEC; ++k) {
        out[u].v[k] = scalar_t(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Per-channel tensors. Parameters and running statistics are either in the input dtype
// or, for float16/bfloat16 input, in float ("mixed type"); saved statistics and sums are
// always in the accumulation type. Which one is a runtime property of the tensor, so one
// kernel serves both and the dtype check stays in the validation routine.

template <typename scalar_t>
struct ChannelRef {
  using acc_t = at::opmath_type<scalar_t>;
  void* ptr;
  bool is_acc;  // elements are acc_t; otherwise scalar_t

  TBN_HOST_DEVICE acc_t load(int64_t c, acc_t fallback) const {
    if (ptr == nullptr) {
      return fallback;
    }
    return is_acc ? static_cast<const acc_t*>(ptr)[c]
                  : static_cast<acc_t>(static_cast<const scalar_t*>(ptr)[c]);
  }
  TBN_HOST_DEVICE void store(int64_t c, acc_t value) const {
    if (is_acc) {
      static_cast<acc_t*>(ptr)[c] = value;
    } else {
      static_cast<scalar_t*>(ptr)[c] = static_cast<scalar_t>(value);
    }
  }
};

// ---------------------------------------------------------------------------------
// Elementwise pass: out = a * dy + (b * (x - m) + c), in the order the CPU kernel uses.

enum class Pass : int {
  kNormalizeTraining,  // y = (x - mean) * (invstd * w) + bias
  kNormalizeEval,      // y = x * scale + shift, running statistics folded into scale/shift
  kGradTraining,       // dx through the batch statistics
  kGradEval,           // dx = w * invstd * dy: reads dy only
};

template <typename acc_t>
struct ChannelMap {
  acc_t a, b, c, m;
};

template <typename scalar_t>
struct ChannelArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Pass pass;
  ChannelRef<scalar_t> mean;    // save_mean (training) or running_mean (evaluation)
  ChannelRef<scalar_t> spread;  // save_invstd (training) or running_var (evaluation)
  ChannelRef<scalar_t> weight;
  ChannelRef<scalar_t> bias;
  // sum(dy) and sum(dy * (x - mean - residual)) over the `count` values of each channel;
  // read by kGradTraining.
  const acc_t* sum_dy;
  const acc_t* sum_dy_xmu;
  // Training: mu - mean, what rounding the batch mean mu to save_mean dropped (null: 0).
  // Both passes take x about mu (batch_norm_math.h, grad_input_coeffs and
  // centre_grad_sums), as the CPU kernels do.
  const acc_t* residual;
  int64_t count;  // values per channel
  double eps;

  TBN_HOST_DEVICE bool training() const {
    return pass == Pass::kNormalizeTraining || pass == Pass::kGradTraining;
  }
  TBN_HOST_DEVICE bool reads_dy() const {
    return pass == Pass::kGradTraining || pass == Pass::kGradEval;
  }
  TBN_HOST_DEVICE bool reads_x() const {
    return pass != Pass::kGradEval;
  }
  TBN_HOST_DEVICE acc_t residual_of(int64_t c) const {
    return residual != nullptr ? residual[c] : acc_t(0);
  }
  TBN_HOST_DEVICE acc_t invstd(int64_t c) const {
    return training() ? spread.load(c, acc_t(0))
                      : math::running_invstd(spread.load(c, acc_t(1)), eps);
  }

  TBN_HOST_DEVICE ChannelMap<acc_t> map(int64_t c) const {
    switch (pass) {
      case Pass::kNormalizeTraining:
        return normalize_training(c, mean.load(c, acc_t(0)), invstd(c), residual_of(c));
      case Pass::kNormalizeEval: {
        const acc_t scale = invstd(c) * weight.load(c, acc_t(1));
        return {acc_t(0), scale, bias.load(c, acc_t(0)) - mean.load(c, acc_t(0)) * scale, acc_t(0)};
      }
      case Pass::kGradTraining:
        return grad_training(c, sum_dy[c], sum_dy_xmu[c], residual_of(c));
      default: {
        const auto k = math::grad_input_coeffs<acc_t>(
            weight.load(c, acc_t(1)), invstd(c), acc_t(0), acc_t(0), count, false);
        return {k.a, k.b, k.c, acc_t(0)};
      }
    }
  }

  // The training maps from the channel's statistics or sums, given rather than read back
  // from the reduction's outputs (see StatsOp::map and GradOp::map).
  TBN_HOST_DEVICE ChannelMap<acc_t> normalize_training(int64_t c,
                                                       acc_t batch_mean,
                                                       acc_t batch_invstd,
                                                       acc_t batch_residual) const {
    // Centre first: (x - mean) is exact for inputs near the mean. The shift puts back the
    // residual: y = (x - mean) * scale + (bias - residual * scale).
    const acc_t scale = batch_invstd * weight.load(c, acc_t(1));
    return {acc_t(0), scale, bias.load(c, acc_t(0)) - batch_residual * scale, batch_mean};
  }
  TBN_HOST_DEVICE ChannelMap<acc_t> grad_training(int64_t c,
                                                  acc_t channel_sum_dy,
                                                  acc_t channel_sum_dy_xmu,
                                                  acc_t sums_residual) const {
    const auto k = math::grad_input_coeffs<acc_t>(weight.load(c, acc_t(1)),
                                                  invstd(c),
                                                  channel_sum_dy,
                                                  channel_sum_dy_xmu,
                                                  count,
                                                  true,
                                                  sums_residual);
    return {k.a, k.b, k.c, mean.load(c, acc_t(0))};
  }
};

// Calls f(std::bool_constant<ch.reads_dy()>): the elementwise code for ch's pass.
template <typename scalar_t, typename F>
void with_reads_dy(const ChannelArgs<scalar_t>& ch, F&& f) {
  if (ch.reads_dy()) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename acc_t>
TBN_HOST_DEVICE acc_t
apply_map(const ChannelMap<acc_t>& k, acc_t dy, acc_t x, bool reads_dy, bool reads_x) {
  if (!reads_x) {
    return k.a * dy;
  }
  const acc_t v = k.b * (x - k.m) + k.c;
  return reads_dy ? k.a * dy + v : v;
}

// Writes out = map(dy, x) for one tile of kUnroll vectors, n of them in range. Whether the
// pass reads dy is a compile-time kReadsDy (see with_reads_dy), so that a normalizing pass
// holds no registers for the dy tile it never loads.
template <int VEC, bool kReadsDy, typename scalar_t, typename MapOf>
TBN_HOST_DEVICE void elementwise_tile(const ChannelArgs<scalar_t>& ch,
                                      const scalar_t* __restrict__ dy,
                                      const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ out,
                                      const int64_t (&offs)[kUnroll],
                                      int n,
                                      MapOf map_of) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool rx = ch.reads_x();
  Pack<scalar_t, VEC> xs[kUnroll];
  Pack<scalar_t, VEC> gs[kUnroll];
  load_packs<VEC>(x, offs, rx ? n : 0, xs);
  if constexpr (kReadsDy) {
    load_packs<VEC>(dy, offs, n, gs);
  }
  auto* dst = reinterpret_cast<Pack<scalar_t, VEC>*>(out);
  TBN_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    if (u < n) {
      Pack<scalar_t, VEC> o;
      TBN_UNROLL
      for (int k = 0; k < VEC; ++k) {
        const acc_t g = kReadsDy ? static_cast<acc_t>(gs[u].v[k]) : acc_t(0);
        o.v[k] = static_cast<scalar_t>(
            apply_map<acc_t>(map_of(k), g, static_cast<acc_t>(xs[u].v[k]), kReadsDy, rx));
      }
      dst[offs[u]] = o;
    }
  }
}

// The pass over a block's share of channel c (planes) or of channel vector cv (rows), given
// the channel's map (rows: one per channel of the vector).
template <int VEC, bool kReadsDy, typename scalar_t>
TBN_HOST_DEVICE void elementwise_planes(const PlaneGeom& g,
                                        int64_t c,
                                        int64_t v0,
                                        int64_t v1,
                                        int tid,
                                        const ChannelMap<at::opmath_type<scalar_t>>& map,
                                        const ChannelArgs<scalar_t>& ch,
                                        const scalar_t* dy,
                                        const scalar_t* x,
                                        scalar_t* out) {
  for_each_plane_tile<true>(g, c, v0, v1, tid, [&](const int64_t (&offs)[kUnroll], int n) {
    elementwise_tile<VEC, kReadsDy>(ch, dy, x, out, offs, n, [&](int) { return map; });
  });
}

template <int VEC, bool kReadsDy, typename scalar_t>
TBN_HOST_DEVICE void elementwise_rows(const RowGeom& g,
                                      int64_t cv,
                                      int64_t r0,
                                      int64_t r1,
                                      int y,
                                      const ChannelMap<at::opmath_type<scalar_t>> (&map)[VEC],
                                      const ChannelArgs<scalar_t>& ch,
                                      const scalar_t* dy,
                                      const scalar_t* x,
                                      scalar_t* out) {
  for_each_row_tile<true>(g, cv, r0, r1, y, [&](const int64_t (&offs)[kUnroll], int n) {
    elementwise_tile<VEC, kReadsDy>(ch, dy, x, out, offs, n, [&](int k) { return map[k]; });
  });
}

// ---------------------------------------------------------------------------------
// Reductions. An Op says what a thread accumulates from a tile, how two partial results
// merge, and what the final result of a channel writes.

// Where the values of a channel lie: value i at first + (i / run) * stride + i % run, for
// i < count (planes: runs of HW values, C * HW apart; rows: runs of one, C apart).
struct ChannelValues {
  int64_t first;
  int64_t run;
  int64_t stride;
  int64_t count;

  TBN_HOST_DEVICE int64_t at(int64_t i) const {
    return first + (i / run) * stride + i % run;
  }
};

template <typename T>
TBN_HOST_DEVICE T magnitude(T v) {
  return v < T(0) ? -v : v;
}

// Outputs written once a channel's reduction is complete; a null pointer is an output
// not asked for.
template <typename scalar_t>
struct FinalizeArgs {
  using acc_t = at::opmath_type<scalar_t>;
  // statistics
  acc_t* save_mean;
  acc_t* save_invstd;
  acc_t* m2;
  ChannelRef<scalar_t> running_mean;
  ChannelRef<scalar_t> running_var;
  double momentum;
  // backward sums
  ChannelRef<scalar_t> grad_weight;
  ChannelRef<scalar_t> grad_bias;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  // Gradient: take sum(dy * (x - mean)) about the batch mean mu rather than about the given
  // mean (batch_norm_backward in training, where the mean is save_mean), as the CPU kernels
  // do; the split op batch_norm_backward_reduce keeps torch's sums about the given mean.
  bool centre_sums;
  // mu - mean per channel (ChannelArgs::residual), from the statistics or the sums.
  acc_t* residual;
};

template <typename scalar_t>
struct StatsOp {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = math::Welford<acc_t>;
  static constexpr bool kReadsDy = false;

  TBN_HOST_DEVICE static Acc identity() {
    return Acc{};
  }
  TBN_HOST_DEVICE static Acc merge(const Acc& a, const Acc& b) {
    return math::welford_merge(a, b);
  }

  // Statistics are gathered as deviations from a centre, so that the means that threads,
  // blocks and merges hold stay small next to values far from zero (a mean of 1e4 with a
  // spread of 1, say), whose own float32 sums and merged means would round away the
  // spread's digits. The centre is the median of the channel's first three values where
  // another of them agrees with it to a sixteenth of its size (values far from zero next
  // to their spread), else 0 (values around zero, where centring gains nothing, and which
  // are then reduced exactly as without it). One outlier among the three never becomes
  // the centre; two equal ones would (a centre far from the mean costs the accuracy that
  // centring buys). A channel of one or two values repeats its last one to make three,
  // and then all three must agree. Every block of a channel computes the same centre.
  template <typename Args>
  TBN_HOST_DEVICE static acc_t centre(const Args& args, int64_t, const ChannelValues& v) {
    if (v.count == 0) {
      return acc_t(0);
    }
    const acc_t a = static_cast<acc_t>(args.x[v.at(0)]);
    const acc_t b = v.count > 1 ? static_cast<acc_t>(args.x[v.at(1)]) : a;
    const acc_t d = v.count > 2 ? static_cast<acc_t>(args.x[v.at(2)]) : b;
    const acc_t m = a < b ? (b < d ? b : (a < d ? d : a)) : (a < d ? a : (b < d ? d : b));
    const acc_t near = magnitude(m) / acc_t(16);
    // Comparisons with a NaN are false; m - m is NaN unless m is finite.
    const int agree =
        (magnitude(a - m) <= near) + (magnitude(b - m) <= near) + (magnitude(d - m) <= near);
    return m - m == acc_t(0) && agree >= (v.count < 3 ? 3 : 2) ? m : acc_t(0);
  }

  // Folds a tile into K slots: slot k takes x(i * S + k) for i < n, as deviations from
  // centre[k]. Each slot gets the exact two-pass mean and M2 of its n values (they are in
  // registers), then one Welford merge; all slots have seen the same number of values, so
  // they share the reciprocal and the merge fraction, and no division is paid per element.
  template <int K, int LEN, int S, typename InX, typename InDy>
  TBN_HOST_DEVICE static void accumulate(
      Acc (&acc)[K], const InX& x, const InDy&, int n, const acc_t (&centre)[K]) {
    if (n == 0) {
      return;
    }
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
    const acc_t frac = static_cast<acc_t>(n) / static_cast<acc_t>(acc[0].count + n);
    TBN_UNROLL
    for (int k = 0; k < K; ++k) {
      acc_t sum = 0;
      TBN_UNROLL
      for (int i = 0; i < LEN; ++i) {
        if (i < n) {
          sum += x(i * S + k) - centre[k];
        }
      }
      Acc tile;
      tile.mean = sum * inv_n;
      tile.m2 = 0;
      tile.count = n;
      // Deviations from the centre are exact for values near it.
      TBN_UNROLL
      for (int i = 0; i < LEN; ++i) {
        if (i < n) {
          const acc_t t = (x(i * S + k) - centre[k]) - tile.mean;
          tile.m2 += t * t;
        }
      }
      acc[k] = math::welford_merge(acc[k], tile, frac);
    }
  }

  // A partial result is kPartials values, each in an array of `stride` (see ReduceArgs).
  static constexpr int kPartials = 2;
  TBN_HOST_DEVICE static void store_partial(const Acc& a, acc_t* p, int64_t stride, int64_t i) {
    p[i] = a.mean;
    p[stride + i] = a.m2;
  }
  TBN_HOST_DEVICE static Acc load_partial(const acc_t* p,
                                          int64_t stride,
                                          int64_t i,
                                          int64_t count) {
    Acc a;
    a.mean = load_from_l2(p + i);
    a.m2 = load_from_l2(p + stride + i);
    a.count = count;
    return a;
  }

  // A channel's batch statistics from its complete reduction `a`, which holds the mean as a
  // deviation from `centre`.
  struct Batch {
    acc_t mean;      // rounded to acc_t: save_mean
    acc_t residual;  // mu - mean, what that rounding dropped
    acc_t invstd;
  };
  TBN_HOST_DEVICE static Batch batch(const Acc& a, acc_t centre, double eps) {
    // An empty batch gives mean 0, M2 0 and invstd 0.
    const acc_t mean = centre + a.mean;
    // Exact where it matters (values close together far from zero, whose mean lies within
    // a factor of two of the centre, so that centre - mean is exact).
    return {mean, (centre - mean) + a.mean, math::batch_invstd_from_m2(a.m2, a.count, eps)};
  }

  // Writes the outputs of channel c. Also finalizes statistics gathered elsewhere
  // (batch_norm_forward_with_stats), with centre 0.
  TBN_HOST_DEVICE static void finalize(const Acc& a,
                                       int64_t c,
                                       acc_t centre,
                                       const FinalizeArgs<scalar_t>& f,
                                       const ChannelArgs<scalar_t>& ch) {
    const Batch b = batch(a, centre, ch.eps);
    if (f.save_mean != nullptr) {
      f.save_mean[c] = b.mean;
    }
    if (f.residual != nullptr) {
      f.residual[c] = b.residual;
    }
    if (f.m2 != nullptr) {
      f.m2[c] = a.m2;
    }
    if (f.save_invstd != nullptr) {
      f.save_invstd[c] = b.invstd;
    }
    // An empty batch leaves the running statistics.
    if (f.running_mean.ptr != nullptr && a.count > 0) {
      f.running_mean.store(c, math::running_update(f.running_mean.load(c, 0), b.mean, f.momentum));
      f.running_var.store(
          c,
          math::running_update(
              f.running_var.load(c, 0), math::unbiased_var(a.m2, a.count), f.momentum));
    }
  }

  // The normalizing map of channel c: what ch.map(c) gives once finalize has written the
  // saved statistics, without reading them back, so that a block that did not finalize
  // the channel has it too.
  TBN_HOST_DEVICE static ChannelMap<acc_t> map(const Acc& a,
                                               int64_t c,
                                               acc_t centre,
                                               const FinalizeArgs<scalar_t>&,
                                               const ChannelArgs<scalar_t>& ch) {
    const Batch b = batch(a, centre, ch.eps);
    return ch.normalize_training(c, b.mean, b.invstd, b.residual);
  }
};

// sum(dy), sum(dy * (x - mean)) and sum(x - mean) (for math::centre_grad_sums).
template <typename acc_t>
struct GradSums {
  acc_t dy;
  acc_t dy_xmu;
  acc_t xmu;
};

template <typename scalar_t>
struct GradOp {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = GradSums<acc_t>;
  static constexpr bool kReadsDy = true;

  TBN_HOST_DEVICE static Acc identity() {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  TBN_HOST_DEVICE static Acc merge(const Acc& a, const Acc& b) {
    return {a.dy + b.dy, a.dy_xmu + b.dy_xmu, a.xmu + b.xmu};
  }

  // The sums are taken about the channel's saved mean (evaluation: its running mean).
  template <typename Args>
  TBN_HOST_DEVICE static acc_t centre(const Args& args, int64_t c, const ChannelValues&) {
    return args.ch.mean.load(c, acc_t(0));
  }

  template <int K, int LEN, int S, typename InX, typename InDy>
  TBN_HOST_DEVICE static void accumulate(
      Acc (&acc)[K], const InX& x, const InDy& dy, int n, const acc_t (&mean)[K]) {
    TBN_UNROLL
    for (int k = 0; k < K; ++k) {
      acc_t s = 0;
      acc_t sx = 0;
      acc_t xm = 0;
      TBN_UNROLL
      for (int i = 0; i < LEN; ++i) {
        if (i < n) {
          const acc_t g = dy(i * S + k);
          const acc_t d = x(i * S + k) - mean[k];
          s += g;
          sx += g * d;
          xm += d;
        }
      }
      acc[k].dy += s;
      acc[k].dy_xmu += sx;
      acc[k].xmu += xm;
    }
  }

  static constexpr int kPartials = 3;
  TBN_HOST_DEVICE static void store_partial(const Acc& a, acc_t* p, int64_t stride, int64_t i) {
    p[i] = a.dy;
    p[stride + i] = a.dy_xmu;
    p[2 * stride + i] = a.xmu;
  }
  TBN_HOST_DEVICE static Acc load_partial(const acc_t* p, int64_t stride, int64_t i, int64_t) {
    return {load_from_l2(p + i), load_from_l2(p + stride + i), load_from_l2(p + 2 * stride + i)};
  }

  // sum(dy * (x - mu)) and mu - mean, or the sums as taken (see FinalizeArgs::centre_sums).
  TBN_HOST_DEVICE static math::CentredGradSums<acc_t> centred(const Acc& a,
                                                              const FinalizeArgs<scalar_t>& f,
                                                              const ChannelArgs<scalar_t>& ch) {
    return f.centre_sums ? math::centre_grad_sums(a.dy, a.dy_xmu, a.xmu, ch.count)
                         : math::CentredGradSums<acc_t>{a.dy_xmu, acc_t(0)};
  }

  TBN_HOST_DEVICE static void finalize(const Acc& a,
                                       int64_t c,
                                       acc_t,
                                       const FinalizeArgs<scalar_t>& f,
                                       const ChannelArgs<scalar_t>& ch) {
    const auto sums = centred(a, f, ch);
    if (f.grad_weight.ptr != nullptr) {
      f.grad_weight.store(c, sums.sum_dy_xmu * ch.invstd(c));
    }
    if (f.grad_bias.ptr != nullptr) {
      f.grad_bias.store(c, a.dy);
    }
    if (f.sum_dy != nullptr) {
      f.sum_dy[c] = a.dy;
      f.sum_dy_xmu[c] = sums.sum_dy_xmu;
    }
    if (f.residual != nullptr) {
      f.residual[c] = sums.residual;
    }
  }

  // The grad-input map of channel c, as StatsOp::map: what ch.map(c) gives once finalize
  // has written the sums. (Evaluation's map reads no sums.)
  TBN_HOST_DEVICE static ChannelMap<acc_t> map(const Acc& a,
                                               int64_t c,
                                               acc_t,
                                               const FinalizeArgs<scalar_t>& f,
                                               const ChannelArgs<scalar_t>& ch) {
    if (ch.pass != Pass::kGradTraining) {
      return ch.map(c);
    }
    const auto sums = centred(a, f, ch);
    return ch.grad_training(c, a.dy, sums.sum_dy_xmu, sums.residual);
  }
};

template <typename scalar_t>
struct ReduceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* dy;  // backward only
  // Non-null: run the elementwise pass in this kernel (one block per channel, or a
  // cooperative launch), with ch's map of each channel derived from its total (Op::map):
  // ch then reads what fin writes (save_mean, save_invstd, the sums, the residual).
  scalar_t* out;
  acc_t* partial;   // [Op::kPartials, splits, C] when splits > 1
  int* semaphores;  // one per channel (planes) or per group (rows), zeroed
  FinalizeArgs<scalar_t> fin;
  ChannelArgs<scalar_t> ch;
};

// Reads element i of a tile of kUnroll packs as acc_t.
template <typename scalar_t, int VEC>
struct TileView {
  const Pack<scalar_t, VEC>* packs;
  TBN_HOST_DEVICE at::opmath_type<scalar_t> operator()(int i) const {
    return static_cast<at::opmath_type<scalar_t>>(packs[i / VEC].v[i % VEC]);
  }
};

// Op's centre (StatsOp::centre, GradOp::centre) for channel c of planes and of rows: the
// same for every thread and block of the channel and for its finalization. A block takes
// it once, in one thread per column (rows) or per block (planes), and shares it through
// shared memory with its other threads and with the finalization after the merge.
template <typename Op, int VEC, typename scalar_t>
TBN_HOST_DEVICE at::opmath_type<scalar_t> plane_centre(const PlaneGeom& g,
                                                       int64_t c,
                                                       const ReduceArgs<scalar_t>& args) {
  const int64_t hw = g.plane * VEC;
  return Op::centre(args, c, ChannelValues{c * hw, hw, g.channels * hw, g.per_channel * VEC});
}

template <typename Op, int VEC, typename scalar_t>
TBN_HOST_DEVICE at::opmath_type<scalar_t> row_centre(const RowGeom& g,
                                                     int64_t c,
                                                     const ReduceArgs<scalar_t>& args) {
  return Op::centre(args, c, ChannelValues{c, 1, g.vecs * VEC, g.rows});
}

// A thread's share of a planes reduction: its vectors of channel c in [v0, v1), about the
// channel's centre (plane_centre).
template <typename Op, int VEC, typename scalar_t>
TBN_HOST_DEVICE typename Op::Acc thread_reduce_planes(const PlaneGeom& g,
                                                      int64_t c,
                                                      int64_t v0,
                                                      int64_t v1,
                                                      int tid,
                                                      const ReduceArgs<scalar_t>& args,
                                                      at::opmath_type<scalar_t> channel_centre) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t centre[1] = {channel_centre};
  typename Op::Acc acc[1] = {Op::identity()};
  for_each_plane_tile<false>(g, c, v0, v1, tid, [&](const int64_t (&offs)[kUnroll], int n) {
    Pack<scalar_t, VEC> xs[kUnroll];
    Pack<scalar_t, VEC> gs[kUnroll];
    load_packs<VEC>(args.x, offs, n, xs);
    load_packs<VEC>(args.dy, offs, Op::kReadsDy ? n : 0, gs);
    // One slot: the whole tile belongs to channel c.
    Op::template accumulate<1, kUnroll * VEC, 1>(
        acc, TileView<scalar_t, VEC>{xs}, TileView<scalar_t, VEC>{gs}, n * VEC, centre);
  });
  return acc[0];
}

// A thread's share of a rows reduction: channels cv * VEC + k of rows r0 + y, r0 + y + ty, ...,
// about their centres (row_centre).
template <typename Op, int VEC, typename scalar_t>
TBN_HOST_DEVICE void thread_reduce_rows(const RowGeom& g,
                                        int64_t cv,
                                        int64_t r0,
                                        int64_t r1,
                                        int y,
                                        const ReduceArgs<scalar_t>& args,
                                        const at::opmath_type<scalar_t> (&centre)[VEC],
                                        typename Op::Acc (&acc)[VEC]) {
  TBN_UNROLL
  for (int k = 0; k < VEC; ++k) {
    acc[k] = Op::identity();
  }
  for_each_row_tile<false>(g, cv, r0, r1, y, [&](const int64_t (&offs)[kUnroll], int n) {
    Pack<scalar_t, VEC> xs[kUnroll];
    Pack<scalar_t, VEC> gs[kUnroll];
    load_packs<VEC>(args.x, offs, n, xs);
    load_packs<VEC>(args.dy, offs, Op::kReadsDy ? n : 0, gs);
    // Slot k: channel cv * VEC + k, element k of each of the kUnroll rows.
    Op::template accumulate<VEC, kUnroll, VEC>(
        acc, TileView<scalar_t, VEC>{xs}, TileView<scalar_t, VEC>{gs}, n, centre);
  });
}

// ---------------------------------------------------------------------------------
// Host side: the per-channel arguments of a launch, from tensors.

// An undefined tensor is an absent one.
template <typename scalar_t>
ChannelRef<scalar_t> channel_ref(const at::Tensor& t) {
  if (!t.defined()) {
    return {nullptr, true};
  }
  return {t.data_ptr(),
          t.scalar_type() == at::toOpMathType(c10::CppTypeToScalarType<scalar_t>::value)};
}

// Per-channel inputs of the elementwise pass, dense or undefined; see ChannelArgs.
struct ChannelTensors {
  at::Tensor mean;
  at::Tensor spread;
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor sum_dy;
  at::Tensor sum_dy_xmu;
  at::Tensor residual;
};

// Per-channel outputs of a reduction, dense or undefined (not asked for); see FinalizeArgs.
struct FinalizeTensors {
  at::Tensor save_mean;
  at::Tensor save_invstd;
  at::Tensor m2;
  at::Tensor running_mean;
  at::Tensor running_var;
  double momentum = 0;
  at::Tensor grad_weight;
  at::Tensor grad_bias;
  at::Tensor sum_dy;
  at::Tensor sum_dy_xmu;
  bool centre_sums = false;
  at::Tensor residual;
};

template <typename T>
T* ptr_of(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename scalar_t>
ChannelArgs<scalar_t> channel_args(Pass pass, const ChannelTensors& t, int64_t count, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  ChannelArgs<scalar_t> ch{};
  ch.pass = pass;
  ch.mean = channel_ref<scalar_t>(t.mean);
  ch.spread = channel_ref<scalar_t>(t.spread);
  ch.weight = channel_ref<scalar_t>(t.weight);
  ch.bias = channel_ref<scalar_t>(t.bias);
  ch.sum_dy = ptr_of<const acc_t>(t.sum_dy);
  ch.sum_dy_xmu = ptr_of<const acc_t>(t.sum_dy_xmu);
  ch.residual = ptr_of<const acc_t>(t.residual);
  ch.count = count;
  ch.eps = eps;
  return ch;
}

template <typename scalar_t>
FinalizeArgs<scalar_t> finalize_args(const FinalizeTensors& t) {
  using acc_t = at::opmath_type<scalar_t>;
  FinalizeArgs<scalar_t> f{};
  f.save_mean = ptr_of<acc_t>(t.save_mean);
  f.save_invstd = ptr_of<acc_t>(t.save_invstd);
  f.m2 = ptr_of<acc_t>(t.m2);
  f.running_mean = channel_ref<scalar_t>(t.running_mean);
  f.running_var = channel_ref<scalar_t>(t.running_var);
  f.momentum = t.momentum;
  f.grad_weight = channel_ref<scalar_t>(t.grad_weight);
  f.grad_bias = channel_ref<scalar_t>(t.grad_bias);
  f.sum_dy = ptr_of<acc_t>(t.sum_dy);
  f.sum_dy_xmu = ptr_of<acc_t>(t.sum_dy_xmu);
  f.centre_sums = t.centre_sums;
  f.residual = ptr_of<acc_t>(t.residual);
  return f;
}

}  // namespace cuda
}  // namespace torch_batchnorm
