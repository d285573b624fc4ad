#pragma once

// The launches of the CUDA kernels, typed by the input's dtype. The ops
// (batch_norm_kernel.cpp) dispatch on the dtype and call these; each dtype's kernels are
// compiled in a file of their own (batch_norm_launch_<dtype>.cu, from
// batch_norm_launch_impl.cuh), so that the four compile in parallel. In one file they were
// the build's longest step: 58 s of nvcc for sm_90 alone, against 27 s for the slowest
// C++ file. The callers return early for inputs without channels and outputs without
// elements, which these do not expect.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "ops/batch_norm_layout.h"
#include "ops/cuda/batch_norm_thread.h"

namespace torch_batchnorm {
namespace cuda {

enum class Reduction {
  kStats,  // StatsOp: Welford mean and M2 of x
  kGrad,   // GradOp: sum(dy), sum(dy * (x - mean))
};

template <typename scalar_t>
struct Launch {
  // The reduction `r` over x (and dy), writing the outputs of `fin` per channel, followed
  // by the elementwise pass of `pass` into `out` when that is defined and not empty. An
  // empty batch still finalizes every channel.
  static void reduce(Reduction r,
                     const Layout& l,
                     const at::Tensor& x,
                     const at::Tensor& dy,
                     const at::Tensor& out,
                     Pass pass,
                     const ChannelTensors& channels,
                     const FinalizeTensors& fin,
                     double eps);

  // The elementwise pass alone: out = map(dy, x) with the per-channel map of `pass`.
  static void elementwise(const Layout& l,
                          const at::Tensor& x,
                          const at::Tensor& dy,
                          const at::Tensor& out,
                          Pass pass,
                          const ChannelTensors& channels,
                          int64_t count,
                          double eps);

  // Finalizes statistics of `count` values per channel gathered elsewhere, given their
  // mean and M2 (dense, in the accumulation type), as a reduction finalizes its own.
  static void finalize_stats(const at::Tensor& mean,
                             const at::Tensor& m2,
                             int64_t count,
                             const FinalizeTensors& fin,
                             const ChannelTensors& channels,
                             double eps);
};

}  // namespace cuda
}  // namespace torch_batchnorm
