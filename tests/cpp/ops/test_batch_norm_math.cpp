// The scalar statistics math shared by the CPU and CUDA kernels, against two-pass
// references computed in long double.

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "ops/batch_norm_math.h"

namespace torch_batchnorm::math {
namespace {

struct Reference {
  long double mean;
  long double m2;
};

// Two passes: the mean first, then squared deviations from it.
template <typename T>
Reference two_pass(const std::vector<T>& x, size_t begin, size_t end) {
  long double sum = 0;
  for (size_t i = begin; i < end; ++i) {
    sum += x[i];
  }
  const long double mean = end > begin ? sum / static_cast<long double>(end - begin) : 0;
  long double m2 = 0;
  for (size_t i = begin; i < end; ++i) {
    m2 += (x[i] - mean) * (x[i] - mean);
  }
  return {mean, m2};
}

template <typename T>
std::vector<T> random_values(size_t n, double offset, double scale, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<T> x(n);
  for (auto& v : x) {
    v = static_cast<T>(offset + scale * dist(gen));
  }
  return x;
}

template <typename T>
Welford<T> steps(const std::vector<T>& x, size_t begin, size_t end) {
  Welford<T> w;
  for (size_t i = begin; i < end; ++i) {
    welford_step(w, x[i]);
  }
  return w;
}

template <typename T>
class WelfordTest : public ::testing::Test {};
using ScalarTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(WelfordTest, ScalarTypes);

// Expected accuracy of n Welford steps or merges in T: relative error of order
// eps * sqrt(n) (rounding as a random walk) times the condition number
// kappa = sqrt(1 + mean^2 / var) of the variance, with a small safety factor.
template <typename T>
void expect_matches(const Welford<T>& w, const Reference& ref, size_t n) {
  const double eps = std::numeric_limits<T>::epsilon();
  const double mean = static_cast<double>(ref.mean);
  const double var = static_cast<double>(ref.m2) / static_cast<double>(n);
  const double rel = 8.0 * eps * std::sqrt(static_cast<double>(n));
  const double kappa = std::sqrt(1.0 + mean * mean / var);
  EXPECT_EQ(w.count, static_cast<int64_t>(n));
  EXPECT_NEAR(w.mean, mean, rel * (std::abs(mean) + std::sqrt(var)));
  EXPECT_NEAR(w.m2, static_cast<double>(ref.m2), rel * kappa * static_cast<double>(ref.m2));
}

// Offsets per type: a large mean next to a small spread is where E[x^2] - E[x]^2 loses
// its digits (relative error ~ kappa^2 * eps) while Welford keeps ~ kappa * eps.
template <typename T>
std::vector<double> offsets() {
  return std::is_same_v<T, double> ? std::vector<double>{0.0, 3.0, 1e4}
                                   : std::vector<double>{0.0, 3.0, 100.0};
}

TYPED_TEST(WelfordTest, StepMatchesTwoPass) {
  using T = TypeParam;
  for (const double offset : offsets<T>()) {
    SCOPED_TRACE(offset);
    const auto x = random_values<T>(4099, offset, 0.5, 1);
    expect_matches(steps(x, 0, x.size()), two_pass(x, 0, x.size()), x.size());
  }
}

TYPED_TEST(WelfordTest, MergeOfPartsMatchesWhole) {
  using T = TypeParam;
  const auto x = random_values<T>(1000, 2.0, 3.0, 2);
  const Reference ref = two_pass(x, 0, x.size());
  // Uneven splits, one-element parts and an empty part, merged left to right.
  for (const std::vector<size_t>& cuts :
       std::vector<std::vector<size_t>>{{0, 500, 1000},
                                        {0, 1, 1000},
                                        {0, 999, 1000},
                                        {0, 0, 300, 301, 1000},
                                        {0, 7, 64, 300, 640, 1000}}) {
    Welford<T> merged;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      merged = welford_merge(merged, steps(x, cuts[i], cuts[i + 1]));
    }
    expect_matches(merged, ref, x.size());
  }
}

TYPED_TEST(WelfordTest, MergeTreeMatchesTwoPass) {
  using T = TypeParam;
  // Pairwise (tree) merge of 64 blocks, the order a block or warp reduction takes.
  const auto x = random_values<T>(64 * 37, -5.0, 2.0, 3);
  std::vector<Welford<T>> parts;
  for (size_t b = 0; b < 64; ++b) {
    parts.push_back(steps(x, b * 37, (b + 1) * 37));
  }
  while (parts.size() > 1) {
    std::vector<Welford<T>> next;
    for (size_t i = 0; i < parts.size(); i += 2) {
      next.push_back(welford_merge(parts[i], parts[i + 1]));
    }
    parts = next;
  }
  expect_matches(parts[0], two_pass(x, 0, x.size()), x.size());
}

TYPED_TEST(WelfordTest, MergeWithEmpty) {
  using T = TypeParam;
  const auto x = random_values<T>(10, 1.0, 1.0, 4);
  const Welford<T> w = steps(x, 0, x.size());
  const Welford<T> empty;
  for (const Welford<T>& m : {welford_merge(w, empty), welford_merge(empty, w)}) {
    EXPECT_EQ(m.count, w.count);
    EXPECT_EQ(m.mean, w.mean);
    EXPECT_EQ(m.m2, w.m2);
  }
  const Welford<T> none = welford_merge(empty, empty);
  EXPECT_EQ(none.count, 0);
  EXPECT_EQ(none.mean, T(0));
  EXPECT_EQ(none.m2, T(0));
}

// Values whose mean squared overflows, with an M2 that does not: merged into nothing (the
// first merge of a running total, with the share 1 as with the share of the values),
// they keep their statistics rather than an M2 of inf * 0 = NaN.
TYPED_TEST(WelfordTest, MergeIntoEmptyPastTheSquaresRange) {
  using T = TypeParam;
  const T big = std::sqrt(std::numeric_limits<T>::max()) * T(4);
  const T spread = big / T(1024);
  const std::vector<T> x{big, big + spread, big - spread};
  const Welford<T> w = steps(x, 0, x.size());
  ASSERT_TRUE(std::isfinite(w.m2));
  for (const Welford<T>& m :
       {welford_merge(Welford<T>{}, w, T(1)), welford_merge(Welford<T>{}, w)}) {
    EXPECT_EQ(m.count, w.count);
    EXPECT_EQ(m.mean, w.mean);
    EXPECT_EQ(m.m2, w.m2);
  }
  EXPECT_EQ(merge_m2_term(big, T(0)), T(0));
}

TYPED_TEST(WelfordTest, FromShiftedSums) {
  using T = TypeParam;
  const auto x = random_values<T>(513, 100.0, 0.25, 5);
  const T shift = x[0];
  T dsum = 0;
  T d2sum = 0;
  for (const T v : x) {
    dsum += v - shift;
    d2sum += (v - shift) * (v - shift);
  }
  expect_matches(welford_from_shifted_sums(shift, dsum, d2sum, static_cast<int64_t>(x.size())),
                 two_pass(x, 0, x.size()),
                 x.size());

  const Welford<T> empty = welford_from_shifted_sums(T(3), T(0), T(0), 0);
  EXPECT_EQ(empty.count, 0);
  EXPECT_EQ(empty.m2, T(0));
  // A constant chunk: rounding may not make M2 negative.
  const Welford<T> flat = welford_from_shifted_sums(T(1), T(0.1), T(0.0099999), 10);
  EXPECT_GE(flat.m2, T(0));
}

// An infinity makes the mean what the sum of the values gives (inf, or NaN next to the
// opposite infinity or a NaN), however the values are stepped, merged or shifted, and M2
// NaN: torch's mean is a sum, its variance NaN.
TYPED_TEST(WelfordTest, InfinityGivesTheMeanOfTheSum) {
  using T = TypeParam;
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> x = random_values<T>(64, 2.0, 1.0, 6);
  x[5] = inf;
  EXPECT_EQ(steps(x, 0, x.size()).mean, inf);
  EXPECT_TRUE(std::isnan(steps(x, 0, x.size()).m2));
  for (const size_t cut : {size_t(5), size_t(6), size_t(40)}) {
    const Welford<T> a = steps(x, 0, cut);
    const Welford<T> b = steps(x, cut, x.size());
    for (const Welford<T>& m : {welford_merge(a, b), welford_merge(b, a)}) {
      EXPECT_EQ(m.mean, inf);
      EXPECT_TRUE(std::isnan(m.m2));
    }
  }
  // A first pass's infinite mean is no shift: by 0, the sums keep the infinity.
  EXPECT_EQ(shift_from_mean(inf), T(0));
  EXPECT_EQ(shift_from_mean(T(2.5)), T(2.5));
  EXPECT_EQ(welford_from_shifted_sums(T(0), inf, inf, 4).mean, inf);
  EXPECT_EQ(merged_mean(-inf, T(1), T(0.5)), -inf);
  EXPECT_EQ(merged_mean(T(1), inf, T(0.5)), inf);
  EXPECT_TRUE(std::isnan(merged_mean(inf, -inf, T(0.5))));
  EXPECT_TRUE(std::isnan(merged_mean(inf, std::numeric_limits<T>::quiet_NaN(), T(0.5))));
  // Finite means merge as before.
  EXPECT_EQ(merged_mean(T(1), T(3), T(0.25)), T(1.5));
}
TEST(BatchNormMath, Invstd) {
  EXPECT_DOUBLE_EQ(batch_invstd(4.0, 0.0), 0.5);
  EXPECT_DOUBLE_EQ(batch_invstd(3.0, 1.0), 0.5);
  // torch normalises a constant channel to zero when eps is zero instead of dividing by 0.
  EXPECT_EQ(batch_invstd(0.0, 0.0), 0.0);
  EXPECT_EQ(batch_invstd(0.0f, 0.0), 0.0f);
  EXPECT_FLOAT_EQ(batch_invstd(0.0f, 1e-5), 1.0f / std::sqrt(1e-5f));
  EXPECT_DOUBLE_EQ(running_invstd(0.75, 0.25), 1.0);
  EXPECT_TRUE(std::isinf(running_invstd(0.0, 0.0)));
}

TEST(BatchNormMath, UnbiasedVariance) {
  EXPECT_DOUBLE_EQ(unbiased_var(6.0, 4), 2.0);
  // One value per channel: 0/0, as torch gives.
  EXPECT_TRUE(std::isnan(unbiased_var(0.0, 1)));
}

TEST(BatchNormMath, RunningUpdate) {
  EXPECT_DOUBLE_EQ(running_update(1.0, 3.0, 0.1), 0.9 * 1.0 + 0.1 * 3.0);
  EXPECT_DOUBLE_EQ(running_update(1.0, 3.0, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(running_update(1.0, 3.0, 1.0), 3.0);
  // Odd momentum values from torch's OpInfo samples follow the same formula.
  EXPECT_DOUBLE_EQ(running_update(2.0, -1.0, -1.2), -1.2 * -1.0 + 2.2 * 2.0);
  EXPECT_FLOAT_EQ(running_update(0.5f, 1.5f, 0.5), 1.0f);
}

// dx from the coefficients against the textbook formula in long double:
// The training input gradient in long double, about the exact mean:
// dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), xhat = (x - mean) * invstd.
std::vector<long double> exact_grad_input(const std::vector<double>& x,
                                          const std::vector<double>& dy,
                                          long double mean,
                                          double invstd,
                                          double w) {
  const size_t n = x.size();
  long double mean_dy = 0;
  long double mean_dy_xhat = 0;
  for (size_t i = 0; i < n; ++i) {
    mean_dy += dy[i];
    mean_dy_xhat += static_cast<long double>(dy[i]) * (x[i] - mean) * invstd;
  }
  mean_dy /= n;
  mean_dy_xhat /= n;
  std::vector<long double> dx(n);
  for (size_t i = 0; i < n; ++i) {
    const long double xhat = (x[i] - mean) * invstd;
    dx[i] = w * invstd * (dy[i] - mean_dy - xhat * mean_dy_xhat);
  }
  return dx;
}

// training: exact_grad_input; evaluation: dx = w * invstd * dy.
TEST(BatchNormMath, GradInputCoefficients) {
  const size_t n = 257;
  const auto x = random_values<double>(n, 10.0, 2.0, 6);
  const auto dy = random_values<double>(n, 0.3, 1.0, 7);
  const Reference ref = two_pass(x, 0, n);
  const double eps = 1e-5;
  const double mean = static_cast<double>(ref.mean);
  const double invstd = batch_invstd(static_cast<double>(ref.m2 / n), eps);
  const double w = 1.7;
  double sum_dy = 0;
  double sum_dy_xmu = 0;
  for (size_t i = 0; i < n; ++i) {
    sum_dy += dy[i];
    sum_dy_xmu += dy[i] * (x[i] - mean);
  }
  const auto expected = exact_grad_input(x, dy, ref.mean, invstd, w);
  const auto train =
      grad_input_coeffs(w, invstd, sum_dy, sum_dy_xmu, static_cast<int64_t>(n), true);
  const auto eval =
      grad_input_coeffs(w, invstd, sum_dy, sum_dy_xmu, static_cast<int64_t>(n), false);
  EXPECT_EQ(eval.b, 0.0);
  EXPECT_EQ(eval.c, 0.0);
  for (size_t i = 0; i < n; ++i) {
    const double got = train.a * dy[i] + train.b * (x[i] - mean) + train.c;
    EXPECT_NEAR(got, static_cast<double>(expected[i]), 1e-12 * (std::abs(expected[i]) + 1)) << i;
    EXPECT_DOUBLE_EQ(eval.a * dy[i] + eval.b * (x[i] - mean) + eval.c, w * invstd * dy[i]);
  }
}

// Sums taken about the mean rounded to float32 (save_mean), with the residual the rounding
// dropped: centre_grad_sums and the residual folded into c give the gradient about the
// exact mean. Two close values far from zero (the ill-conditioned case: dx cancels to a
// hundredth of its terms) and a larger batch.
TEST(BatchNormMath, GradInputAboutARoundedMean) {
  const std::vector<std::vector<double>> inputs = {{-2.2512032985687256, -2.1849365234375},
                                                   random_values<double>(301, 1e3, 0.5, 8)};
  for (const auto& x : inputs) {
    const size_t n = x.size();
    const auto dy = random_values<double>(n, 0.5, 1.0, 9);
    const Reference ref = two_pass(x, 0, n);
    const double invstd = batch_invstd(static_cast<double>(ref.m2 / n), 1e-5);
    const double rounded = static_cast<float>(static_cast<double>(ref.mean));
    double sum_dy = 0;
    double sum_dy_xmu = 0;
    double sum_xmu = 0;
    for (size_t i = 0; i < n; ++i) {
      sum_dy += dy[i];
      sum_dy_xmu += dy[i] * (x[i] - rounded);
      sum_xmu += x[i] - rounded;
    }
    const auto centred = centre_grad_sums(sum_dy, sum_dy_xmu, sum_xmu, static_cast<int64_t>(n));
    EXPECT_NEAR(centred.residual, static_cast<double>(ref.mean - rounded), 1e-12);
    const auto k = grad_input_coeffs(
        1.0, invstd, sum_dy, centred.sum_dy_xmu, static_cast<int64_t>(n), true, centred.residual);
    const auto expected = exact_grad_input(x, dy, ref.mean, invstd, 1.0);
    for (size_t i = 0; i < n; ++i) {
      const double got = k.a * dy[i] + k.b * (x[i] - rounded) + k.c;
      EXPECT_NEAR(got, static_cast<double>(expected[i]), 1e-9 * (std::abs(expected[i]) + 1))
          << n << " " << i;
    }
  }
}

// An infinite dy makes sum(dy) infinite: the sums stay about save_mean, whose infinities
// are torch's, rather than turning NaN (inf - inf, or 0 * inf with a zero residual).
TEST(BatchNormMath, CentredSumsOfAnInfiniteGradient) {
  const double inf = std::numeric_limits<double>::infinity();
  for (const double residual_sum : {0.0, 0.5, -0.5}) {
    const auto centred = centre_grad_sums(inf, -inf, residual_sum, 4);
    EXPECT_EQ(centred.sum_dy_xmu, -inf) << residual_sum;
    EXPECT_EQ(centred.residual, 0.0) << residual_sum;
    const auto k = grad_input_coeffs(1.0, 2.0, inf, -inf, 4, true, centred.residual);
    EXPECT_EQ(k.b, inf) << residual_sum;
    EXPECT_EQ(k.c, -inf) << residual_sum;
  }
}

}  // namespace
}  // namespace torch_batchnorm::math
