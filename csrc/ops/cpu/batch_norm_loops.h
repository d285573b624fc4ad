#pragma once

// Inner loops of the CPU kernels, compiled once per instruction set (AVX-512, AVX2+FMA,
// baseline; bfloat16 also for AVX-512 BF16) and picked at run time like torch's own
// kernels (ATEN_CPU_CAPABILITY overrides the choice). The kernels in
// batch_norm_kernel.cpp split the work and call these on cache-sized pieces.

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ops/batch_norm_math.h"

// Before a loop over channels whose arrays are distinct: no iteration depends on another.
// A per-channel loop that reads and writes ten arrays has more pairs than GCC checks for
// overlap at run time (10, --param vect-max-version-for-alias-checks), and it then leaves
// the loop scalar.
#if defined(__clang__)
#define TBN_INDEPENDENT_ITERATIONS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define TBN_INDEPENDENT_ITERATIONS _Pragma("GCC ivdep")
#else
#define TBN_INDEPENDENT_ITERATIONS
#endif

namespace torch_batchnorm {
namespace cpu {

// Values of one channel taken in two passes while they stay in cache (NCHW): a group of
// whole runs, or one piece of a longer run.
constexpr int64_t kGroupElems = 16384;

// Rows of a channels-last block taken in two passes while they stay in cache (L2). At
// least 16, so that merging a block's per-channel results costs little per row; at most
// 512, so that no float accumulator sums more than 512 values.
inline int64_t rows_per_block(int64_t channels) {
  constexpr int64_t kBlockElems = 65536;
  return std::clamp<int64_t>(kBlockElems / std::max<int64_t>(1, channels), 16, 512);
}

// A backward reduction's sums over some of a channel's values, about a centre `mean`:
// sum(dy), sum(dy * (x - mean)) and sum(x - mean) (for math::centre_grad_sums).
struct GradSums {
  double dy = 0;
  double dy_xmu = 0;
  double xmu = 0;

  GradSums& operator+=(const GradSums& o) {
    dy += o.dy;
    dy_xmu += o.dy_xmu;
    xmu += o.xmu;
    return *this;
  }
};

template <typename scalar_t>
struct Loops {
  using acc_t = at::opmath_type<scalar_t>;

  // Runs of one channel: `spans` runs of `len` values, run s at x + s * stride.
  // Mean and M2 of the runs.
  math::Welford<double> (*group_stats)(const scalar_t* x, int64_t spans, int64_t len, int64_t stride);
  // y = (x - centre) * scale + shift over `spans` spans of `runs` consecutive runs, span s
  // at offset s * stride, run r of channel (c0 + r) % C, with per-channel arrays; a null
  // centre means y = x * scale + shift.
  void (*runs_affine)(
      const scalar_t* x, scalar_t* y, int64_t spans, int64_t stride, int64_t runs, int64_t len,
      int64_t c0, int64_t C, const acc_t* centre, const acc_t* scale, const acc_t* shift,
      bool stream);
  // The sums of the runs about `mean`.
  GradSums (*group_grad_sums)(
      const scalar_t* dy, const scalar_t* x, int64_t spans, int64_t len, int64_t stride,
      acc_t mean);
  // dx = a * dy + b * (x - mean) + k over spans of consecutive runs, as runs_affine; the
  // _eval form computes a * dy and reads no x.
  void (*runs_grad_input)(
      const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t spans, int64_t stride,
      int64_t runs, int64_t len, int64_t c0, int64_t C, const acc_t* mean, const acc_t* a,
      const acc_t* b, const acc_t* k, bool stream);
  void (*runs_grad_input_eval)(
      const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t spans, int64_t stride,
      int64_t runs, int64_t len, int64_t c0, int64_t C, const acc_t* mean, const acc_t* a,
      const acc_t* b, const acc_t* k, bool stream);

  // Rows of C channels (channels-last, 2D), with per-channel arrays of C values; the
  // reductions take C channels of rows `ld` apart (a block of the channels).
  // Statistics of the rows (at least one) into mean/m2, overwritten; scratch: 3 * C values.
  void (*rows_stats)(
      const scalar_t* x, int64_t rows, int64_t C, int64_t ld, int64_t rows_per_block,
      double* mean, double* m2, acc_t* scratch);
  // y = (x - centre) * scale + shift; a null centre means y = x * scale + shift.
  void (*rows_affine)(
      const scalar_t* x, scalar_t* y, int64_t rows, int64_t C, const acc_t* centre,
      const acc_t* scale, const acc_t* shift, bool stream);
  // The sums about `mean` (GradSums) of the rows (at least one) into sum_dy, sum_dy_xmu
  // and sum_xmu, overwritten; scratch: 3 * C values.
  void (*rows_grad_sums)(
      const scalar_t* dy, const scalar_t* x, int64_t rows, int64_t C, int64_t ld,
      int64_t rows_per_block, const acc_t* mean, double* sum_dy, double* sum_dy_xmu,
      double* sum_xmu, acc_t* scratch);
  // dx = a * dy + b * (x - mean) + k; the _eval form computes a * dy and reads no x.
  void (*rows_grad_input)(
      const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t C,
      const acc_t* mean, const acc_t* a, const acc_t* b, const acc_t* k, bool stream);
  void (*rows_grad_input_eval)(
      const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t C,
      const acc_t* mean, const acc_t* a, const acc_t* b, const acc_t* k, bool stream);

  // The backward's per-channel finish of C channels, from their sums (GradSums over
  // `total` values each, about the mean whose invstd is given): grad_weight (gw),
  // grad_bias (gb) and dx's coefficients a, b and k (math::grad_input_coeffs).
  void (*grad_coeffs)(const double* sum_dy,
                      const double* sum_dy_xmu,
                      const double* sum_xmu,
                      int64_t C,
                      int64_t total,
                      bool training,
                      const acc_t* invstd,
                      const acc_t* w,
                      acc_t* gw,
                      acc_t* gb,
                      acc_t* a,
                      acc_t* b,
                      acc_t* k);
};

// The elementwise loops take `stream`: write the output with streaming stores, for
// outputs too large to stay in cache (same results, less memory traffic).
//
// The loops for this machine (float, double, c10::BFloat16, c10::Half).
template <typename scalar_t>
const Loops<scalar_t>& loops();

// Every copy of the loops this CPU runs, named ("avx512_bf16", "avx512", "avx2",
// "default"), whatever torch picks: the tests check each, not only the one loops() picks.
template <typename scalar_t>
std::vector<std::pair<std::string, Loops<scalar_t>>> runnable_loops();

}  // namespace cpu
}  // namespace torch_batchnorm
