#pragma once

// Scalar math shared by the CPU and CUDA kernels, so both backends compute the
// statistics, the inverse standard deviation and the running-stat update the same way.

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TBN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TBN_HOST_DEVICE inline
#endif

namespace torch_batchnorm {
namespace math {

// Running mean and sum of squared deviations (M2) of `count` values. Merging two of
// these is exact algebra (Chan et al.), so partial results from threads, warps, blocks
// or ranks can be combined in any fixed order without the cancellation that
// E[x^2] - E[x]^2 suffers for large means.
template <typename T>
struct Welford {
  T mean = T(0);
  T m2 = T(0);
  int64_t count = 0;
};

// x - x is 0 for a finite x, NaN for an infinity or a NaN.
template <typename T>
TBN_HOST_DEVICE bool is_finite(T x) {
  return x - x == T(0);
}

// The mean of the union of two disjoint sets of values with means a and b, given the share
// of b, b_frac: a + (b - a) * b_frac, except where a is not finite: then a + b, what the
// sum of the values gives (inf + finite = inf, inf + -inf = NaN) and torch's sum-based
// mean with it. The difference would make NaN of a's infinity (inf - inf), and a channel
// with an infinity would get a NaN mean and running mean where torch's are infinite. A
// finite a needs no such care: an infinite b gives b's infinity either way (b_frac is 0
// only for an empty b, whose mean is 0). Nor does M2: an infinity makes it NaN, as
// torch's variance.
template <typename T>
TBN_HOST_DEVICE T merged_mean(T a, T b, T b_frac) {
  return is_finite(a) ? a + (b - a) * b_frac : a + b;
}

// The M2 term of a merge of two disjoint sets of values, delta^2 * n_a * n_b / (n_a + n_b),
// from the means' difference and weight = n_a * n_b / (n_a + n_b): 0 where a side is empty
// (weight 0). There delta is the other side's mean, whose square alone may overflow (a
// mean beyond 1.8e19 in float, 1.3e154 in double) where M2 does not, and inf * 0 would
// make M2 NaN. Branch-free (both sides computed, one kept), so that the loops over
// channels that take it still vectorise.
template <typename T>
TBN_HOST_DEVICE T merge_m2_term(T delta, T weight) {
  return weight != T(0) ? delta * delta * weight : T(0);
}

// Adds one value.
template <typename T>
TBN_HOST_DEVICE void welford_step(Welford<T>& w, T x) {
  w.count += 1;
  const T delta = x - w.mean;
  w.mean = is_finite(w.mean) ? w.mean + delta / static_cast<T>(w.count) : w.mean + x;
  w.m2 += delta * (x - w.mean);
}

// Combines the statistics of two disjoint sets of values, given the share of b in the
// union, b_frac = b.count / (a.count + b.count). Statistics of several channels over the
// same values (a vector of channels-last channels) share one division this way.
template <typename T>
TBN_HOST_DEVICE Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b, T b_frac) {
  const T delta = b.mean - a.mean;
  Welford<T> out;
  out.mean = merged_mean(a.mean, b.mean, b_frac);
  out.m2 = a.m2 + b.m2 + merge_m2_term(delta, static_cast<T>(a.count) * b_frac);
  out.count = a.count + b.count;
  return out;
}

// Combines the statistics of two disjoint sets of values. An empty side leaves the other
// as it is (as ATen's WelfordOps::combine): no division, which on a GPU takes its slow path
// for a zero share.
template <typename T>
TBN_HOST_DEVICE Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  if (b.count == 0) {
    return a;
  }
  if (a.count == 0) {
    return b;
  }
  return welford_merge(a, b, static_cast<T>(b.count) / static_cast<T>(a.count + b.count));
}

// The shift of a two-pass reduction from its first pass's mean: that mean where finite,
// else 0. An infinity among the values makes their sum, and that mean, infinite; shifted
// by it, every deviation would be NaN (inf - inf) and so would the mean. Shifted by 0,
// the sums carry the infinity as a plain sum does: the mean is infinite (NaN with both
// infinities, or a NaN, among the values) and M2 is NaN, as torch's.
template <typename T>
TBN_HOST_DEVICE T shift_from_mean(T mean) {
  return is_finite(mean) ? mean : T(0);
}

// Statistics of `count` values given their mean and their sum of deviations `dsum`
// and squared deviations `d2sum` from a nearby `shift`. Lets vectorised code sum
// (x - shift) and (x - shift)^2 over a cached chunk and still return the exact M2:
// M2 = d2sum - dsum^2 / count.
template <typename T>
TBN_HOST_DEVICE Welford<T> welford_from_shifted_sums(T shift, T dsum, T d2sum, int64_t count) {
  Welford<T> out;
  if (count == 0) {
    return out;
  }
  const T n = static_cast<T>(count);
  const T correction = dsum / n;
  out.mean = shift + correction;
  out.m2 = d2sum - dsum * correction;
  if (out.m2 < T(0)) {
    out.m2 = T(0);  // rounding only: M2 is a sum of squares
  }
  out.count = count;
  return out;
}

// 1 / sqrt(var + eps), as torch computes it for batch statistics: a zero variance with
// zero eps gives 0 rather than inf, so a constant channel normalises to zero.
template <typename T>
TBN_HOST_DEVICE T batch_invstd(T var, double eps) {
  if (var == T(0) && eps == 0.0) {
    return T(0);
  }
  return T(1) / std::sqrt(var + static_cast<T>(eps));
}

// invstd of the batch statistics of `count` values with sum of squared deviations m2
// (biased variance m2 / count). An empty batch has no variance: its invstd is 0 rather
// than NaN, so that the weight gradient, a sum over no values times invstd, is 0 as
// torch's is.
template <typename T>
TBN_HOST_DEVICE T batch_invstd_from_m2(T m2, int64_t count, double eps) {
  if (count == 0) {
    return T(0);
  }
  return batch_invstd(m2 / static_cast<T>(count), eps);
}

// 1 / sqrt(running_var + eps), as torch computes it for evaluation.
template <typename T>
TBN_HOST_DEVICE T running_invstd(T running_var, double eps) {
  return T(1) / std::sqrt(running_var + static_cast<T>(eps));
}

// Unbiased variance from M2; count == 1 gives NaN (0/0) as in torch.
template <typename T>
TBN_HOST_DEVICE T unbiased_var(T m2, int64_t count) {
  return m2 / static_cast<T>(count - 1);
}

// running = (1 - momentum) * running + momentum * batch: torch's convention.
template <typename T>
TBN_HOST_DEVICE T running_update(T running, T batch, double momentum) {
  return static_cast<T>(momentum) * batch + (T(1) - static_cast<T>(momentum)) * running;
}

// Per-channel coefficients of the input gradient, dx = a * dy + b * (x - mean) + c.
// Training differentiates through the batch statistics:
//   dx = w * invstd * (dy - sum_dy / n - (x - mu) * invstd^2 * sum_dy_xmu / n)
// with mu the batch mean, which `mean` (save_mean) holds rounded to the accumulation type
// (float32 but for float64 input): mu = mean + residual (see centre_grad_sums), the
// residual folded into c. Evaluation treats the
// statistics as constants: dx = w * invstd * dy. Centering x before the multiply keeps
// large-mean inputs from cancelling.
template <typename T>
struct GradInputCoeffs {
  T a;
  T b;
  T c;
};

template <typename T>
TBN_HOST_DEVICE GradInputCoeffs<T> grad_input_coeffs(
    T weight, T invstd, T sum_dy, T sum_dy_xmu, int64_t count, bool training, T residual = T(0)) {
  GradInputCoeffs<T> k;
  k.a = weight * invstd;
  if (!training) {
    k.b = T(0);
    k.c = T(0);
    return k;
  }
  const T inv_n = T(1) / static_cast<T>(count);
  k.b = -k.a * invstd * invstd * sum_dy_xmu * inv_n;
  k.c = -k.a * sum_dy * inv_n;
  // Not for a zero residual: an infinite b (an infinite dy) times 0 would be NaN. A select,
  // as in centre_grad_sums.
  k.c = residual != T(0) ? k.c - k.b * residual : k.c;
  return k;
}

// The backward's sums taken about the batch mean mu rather than about save_mean, which
// holds mu rounded: residual = sum(x - mean) / n = mu - mean, and
// sum(dy * (x - mu)) = sum_dy_xmu - residual * sum_dy. Where a channel's values lie close
// together next to its mean's size (two values 0.07 apart at -2.2, say), dx cancels, and
// a rounding of mean by half a unit in the last place moved it by 8e-4 of its size, as it
// does torch's float32 results; about mu it moves by 3e-6.
template <typename T>
struct CentredGradSums {
  T sum_dy_xmu;  // sum(dy * (x - mu))
  T residual;    // mu - mean
};

template <typename T>
TBN_HOST_DEVICE CentredGradSums<T> centre_grad_sums(T sum_dy,
                                                    T sum_dy_xmu,
                                                    T sum_xmu,
                                                    int64_t count) {
  // Selects on values of T rather than branches, so that loops over channels vectorise.
  // A multiply by 1 / n, which a loop over channels computes once, rather than a division
  // per channel: the residual is a correction far below mean's last place, and half a unit
  // more of rounding in it changes nothing, where the divisions held up the CPU backward's
  // loop over channels (float32 [2, 16384], cpu-optimisations.md). (A CUDA thread finishes
  // one channel: there it is one division either way.)
  const T n = static_cast<T>(count);
  const T inv_n = T(1) / (n > T(0) ? n : T(1));
  const T residual = n > T(0) ? sum_xmu * inv_n : T(0);
  const T shift = residual * sum_dy;
  // Where the shift is not finite (an infinite dy), the sums about save_mean, whose
  // infinities are torch's (about mu, they would turn into NaN).
  const bool finite = is_finite(shift);
  return {finite ? sum_dy_xmu - shift : sum_dy_xmu, finite ? residual : T(0)};
}

}  // namespace math
}  // namespace torch_batchnorm
