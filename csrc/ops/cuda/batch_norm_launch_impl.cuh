#pragma once

// CUDA kernels of batch_norm_forward and batch_norm_backward, and of the ops that split
// training into pieces for statistics that span processes (batch_norm_stats,
// batch_norm_forward_with_stats, batch_norm_backward_reduce, batch_norm_backward_elemt).
//
// Same contract as the CPU kernels (cpu/batch_norm_kernel.cpp), which are the reference:
// same layouts (batch_norm_layout.h), same per-channel formulas (batch_norm_math.h), same
// outputs. The input is walked either as contiguous planes [N, C, HW] or as rows
// [N * HW, C] with the channels adjacent (batch_norm_geometry.h: how blocks and threads
// cover it). Every op is built from two kernels:
//
//   reduction    statistics: Welford mean and M2 of x (as deviations from a centre, see
//                StatsOp::centre); gradient: sum(dy), sum(dy * (x - mean)), sum(x - mean).
//                A block reduces a slice of one channel (planes) or of a group of channels
//                (rows). When one block per channel would leave SMs idle, channels are split
//                over several blocks, whose partial results are merged in a fixed order
//                (deterministic) to finalize the channel: saved statistics (or mean and M2)
//                and the in-place running-stat update, or grad_weight, grad_bias and the
//                sums. No host synchronisation anywhere. Where the device allows, a split
//                reduction is launched cooperatively (all its blocks resident at once),
//                unless it is long and that would leave it half the blocks of a plain launch
//                (launch_cooperatively): the blocks wait for each other at a grid-wide
//                barrier, then every block of a channel merges its partial results, in the
//                same order to the same total, and the first writes the outputs. Otherwise
//                the last block of each channel to finish (an atomic count of arrivals)
//                merges and finalizes.
//   elementwise  out = a * dy + (b * (x - m) + c) with per-channel a, b, c, m: normalize
//                (a = 0) and grad input alike. A block that holds a channel's total (it
//                owns the whole channel, or it is in a cooperative launch) runs this pass
//                over what it reduced, with the map it derives from that total (one launch
//                per op); otherwise a second kernel runs it, with the map derived from the
//                finalized outputs. Either way the pass walks the data backwards, so it
//                starts with what the reduction read last, which is still in L2.
//
// batch_norm_forward is the statistics reduction with the normalizing pass,
// batch_norm_backward the gradient reduction with the grad-input pass; the split ops run
// the same pieces one at a time, with statistics and sums over all processes in between.
//
// Loads and stores are 16 bytes wide wherever the layout and the pointers allow it.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/batch_norm_layout.h"
#include "ops/batch_norm_math.h"
#include "ops/cuda/batch_norm_geometry.h"
#include "ops/cuda/batch_norm_launch.h"
#include "ops/cuda/batch_norm_thread.h"

namespace torch_batchnorm {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;

constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kWarps <= 32 && (kWarps & (kWarps - 1)) == 0,
              "block reduction needs a power-of-two warp count");

// The value of lane (this lane ^ lane_mask), for each partial result an Op merges.
template <typename T>
__device__ math::Welford<T> shfl_xor(const math::Welford<T>& a, int lane_mask) {
  math::Welford<T> o;
  o.mean = __shfl_xor_sync(kFullMask, a.mean, lane_mask);
  o.m2 = __shfl_xor_sync(kFullMask, a.m2, lane_mask);
  o.count = __shfl_xor_sync(kFullMask, a.count, lane_mask);
  return o;
}

template <typename T>
__device__ GradSums<T> shfl_xor(const GradSums<T>& a, int lane_mask) {
  return {__shfl_xor_sync(kFullMask, a.dy, lane_mask),
          __shfl_xor_sync(kFullMask, a.dy_xmu, lane_mask),
          __shfl_xor_sync(kFullMask, a.xmu, lane_mask)};
}

// Blocks run in reverse order: the first to start cover what the reduction read last.
template <typename scalar_t, int VEC, bool kReadsDy>
__global__ void __launch_bounds__(kThreads) elementwise_planes_kernel(
    PlaneGeom g, ChannelArgs<scalar_t> ch, const scalar_t* dy, const scalar_t* x, scalar_t* out) {
  const int64_t b = gridDim.x - 1 - static_cast<int64_t>(blockIdx.x);
  const int64_t c = b / g.splits;
  const int64_t s = b % g.splits;
  elementwise_planes<VEC, kReadsDy>(
      g, c, g.begin(s), g.begin(s + 1), threadIdx.x, ch.map(c), ch, dy, x, out);
}

template <typename scalar_t, int VEC, bool kReadsDy>
__global__ void __launch_bounds__(kThreads) elementwise_rows_kernel(
    RowGeom g, ChannelArgs<scalar_t> ch, const scalar_t* dy, const scalar_t* x, scalar_t* out) {
  const int64_t b = gridDim.x - 1 - static_cast<int64_t>(blockIdx.x);
  const int64_t s = b / g.groups;
  const int64_t cv = (b % g.groups) * g.tx + (threadIdx.x & (g.tx - 1));
  if (cv < g.vecs) {
    ChannelMap<at::opmath_type<scalar_t>> map[VEC];
    TBN_UNROLL
    for (int k = 0; k < VEC; ++k) {
      map[k] = ch.map(cv * VEC + k);
    }
    elementwise_rows<VEC, kReadsDy>(
        g, cv, g.begin(s), g.begin(s + 1), threadIdx.x / g.tx, map, ch, dy, x, out);
  }
}

// The merge order of the reductions below (this function, block_reduce_rows and the
// finalizing block's merge of partial results) is emulated on the CPU by
// tests/cpp/ops/cuda/test_batch_norm_thread.cpp: a change here goes there too.
//
// Merges every thread's value into thread 0 (all threads of the block call it). The tree
// is fixed, so the result does not depend on timing.
template <typename Op>
__device__ typename Op::Acc block_reduce_all(typename Op::Acc v, typename Op::Acc* smem) {
  TBN_UNROLL
  for (int m = 16; m > 0; m >>= 1) {
    v = Op::merge(v, shfl_xor(v, m));
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    smem[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : Op::identity();
    TBN_UNROLL
    for (int m = kWarps / 2; m > 0; m >>= 1) {
      v = Op::merge(v, shfl_xor(v, m));
    }
  }
  __syncthreads();  // smem may be reused on return
  return v;
}

// Merges the K values of every thread over the rows of the block (threads with the same
// threadIdx.x % tx). On return smem[x * K + k] holds the result of column x, slot k.
template <typename Op, int K>
__device__ void block_reduce_rows(typename Op::Acc (&acc)[K], int tx, typename Op::Acc* smem) {
  // Callers come from loops of a different length per thread: reconverged, the warp takes
  // the shuffles' fast path.
  __syncwarp();
  // Lanes of a warp that share a column are tx apart.
  for (int m = 16; m >= tx; m >>= 1) {
    TBN_UNROLL
    for (int k = 0; k < K; ++k) {
      acc[k] = Op::merge(acc[k], shfl_xor(acc[k], m));
    }
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane < tx) {
    TBN_UNROLL
    for (int k = 0; k < K; ++k) {
      smem[(warp * tx + lane) * K + k] = acc[k];
    }
  }
  __syncthreads();
  // Thread t < tx * K merges the warps' values of (x, k) = (t / K, t % K), stored at
  // smem[w * tx * K + t]; it alone writes slot t, which the others never read.
  const int t = threadIdx.x;
  if (t < tx * K) {
    typename Op::Acc r = smem[t];
    for (int w = 1; w < kWarps; ++w) {
      r = Op::merge(r, smem[w * tx * K + t]);
    }
    smem[t] = r;
  }
  __syncthreads();
}

// Called by every thread of a block once its partial result is in global memory: true in
// the last block of the `expected` that share `semaphore`, which then sees all partials.
__device__ bool arrive_last(int* semaphore, int64_t expected) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(semaphore, 1) == static_cast<int>(expected - 1);
  }
  __syncthreads();
  if (last) {
    __threadfence();
  }
  return last;
}

// Waits until every block of the grid has arrived, and makes their global writes before it
// visible to every block after it. Only in kernels launched cooperatively, whose blocks are
// all resident at once.
__device__ void grid_barrier() {
  cooperative_groups::this_grid().sync();
}

// kGridSync: launched cooperatively with splits > 1 (see launch_reduce).
template <typename Op, typename scalar_t, int VEC, bool kGridSync>
__global__ void __launch_bounds__(kThreads)
    reduce_planes_kernel(PlaneGeom g, ReduceArgs<scalar_t> args) {
  using Acc = typename Op::Acc;
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ alignas(16) unsigned char smem_raw[kWarps * sizeof(Acc)];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);

  const int64_t c = blockIdx.x / g.splits;
  const int64_t s = blockIdx.x % g.splits;
  const int64_t v0 = g.begin(s);
  const int64_t v1 = g.begin(s + 1);
  __shared__ acc_t shared_centre;
  if (threadIdx.x == 0) {
    shared_centre = plane_centre<Op, VEC>(g, c, args);
  }
  __syncthreads();
  const acc_t centre = shared_centre;
  Acc acc = thread_reduce_planes<Op, VEC>(g, c, v0, v1, threadIdx.x, args, centre);
  acc = block_reduce_all<Op>(acc, smem);

  bool finalizes = true;  // this block writes the channel's outputs
  if (g.splits > 1) {
    const int64_t stride = g.splits * g.channels;
    if (threadIdx.x == 0) {
      Op::store_partial(acc, args.partial, stride, s * g.channels + c);
    }
    if constexpr (kGridSync) {
      // Every block merges the partial results, in the same order, to the same total: the
      // first writes the outputs, and each has the map for its own elementwise pass.
      grid_barrier();
      finalizes = s == 0;
      if (!finalizes && args.out == nullptr) {
        return;  // no elementwise pass to derive a map for
      }
    } else if (!arrive_last(args.semaphores + c, g.splits)) {
      return;
    }
    acc = Op::identity();
    for (int64_t t = threadIdx.x; t < g.splits; t += kThreads) {
      acc = Op::merge(
          acc,
          Op::load_partial(
              args.partial, stride, t * g.channels + c, (g.begin(t + 1) - g.begin(t)) * VEC));
    }
    acc = block_reduce_all<Op>(acc, smem);
  }
  __shared__ ChannelMap<acc_t> map;
  if (threadIdx.x == 0) {
    if (finalizes) {
      Op::finalize(acc, c, centre, args.fin, args.ch);
    }
    if (args.out != nullptr) {
      map = Op::map(acc, c, centre, args.fin, args.ch);
    }
  }
  if (args.out != nullptr) {
    __syncthreads();
    elementwise_planes<VEC, Op::kReadsDy>(
        g, c, v0, v1, threadIdx.x, map, args.ch, args.dy, args.x, args.out);
  }
}

template <typename Op, typename scalar_t, int VEC, bool kGridSync>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(RowGeom g, ReduceArgs<scalar_t> args) {
  using Acc = typename Op::Acc;
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ alignas(16) unsigned char smem_raw[kThreads * VEC * sizeof(Acc)];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);

  const int64_t s = blockIdx.x / g.groups;
  const int64_t group = blockIdx.x % g.groups;
  const int y = threadIdx.x / g.tx;
  const int64_t cv = group * g.tx + (threadIdx.x & (g.tx - 1));
  const bool active = cv < g.vecs;
  const int64_t r0 = g.begin(s);
  const int64_t r1 = g.begin(s + 1);
  const int64_t channels = g.vecs * VEC;

  // centres[x * VEC + k]: the centre of slot k of column x; tx <= 32.
  __shared__ acc_t centres[32 * VEC];
  if (y == 0) {
    TBN_UNROLL
    for (int k = 0; k < VEC; ++k) {
      centres[threadIdx.x * VEC + k] = active ? row_centre<Op, VEC>(g, cv * VEC + k, args) : 0;
    }
  }
  __syncthreads();
  acc_t centre[VEC];
  TBN_UNROLL
  for (int k = 0; k < VEC; ++k) {
    centre[k] = centres[(threadIdx.x & (g.tx - 1)) * VEC + k];
  }
  Acc acc[VEC];
  thread_reduce_rows<Op, VEC>(g, active ? cv : 0, r0, active ? r1 : r0, y, args, centre, acc);
  block_reduce_rows<Op, VEC>(acc, g.tx, smem);

  // Thread t < tx * VEC owns the result of channel vector t / VEC, slot t % VEC.
  const int t = threadIdx.x;
  const int64_t own_cv = group * g.tx + t / VEC;
  const bool owner = t < g.tx * VEC && own_cv < g.vecs;
  const int64_t own_channel = own_cv * VEC + t % VEC;
  Acc total = owner ? smem[t] : Op::identity();

  bool finalizes = true;  // this block writes the group's outputs
  if (g.splits > 1) {
    const int64_t stride = g.splits * channels;
    if (owner) {
      Op::store_partial(total, args.partial, stride, s * channels + own_channel);
    }
    if constexpr (kGridSync) {
      // As in reduce_planes_kernel: every block merges, the first writes the outputs.
      grid_barrier();
      finalizes = s == 0;
      if (!finalizes && args.out == nullptr) {
        return;
      }
    } else if (!arrive_last(args.semaphores + group, g.splits)) {
      return;
    }
    TBN_UNROLL
    for (int k = 0; k < VEC; ++k) {
      acc[k] = Op::identity();
    }
    if (active) {
      for (int64_t p = y; p < g.splits; p += g.ty) {
        const int64_t count = g.begin(p + 1) - g.begin(p);
        // All loads first, then the merges: one trip to L2 rather than one per slot.
        Acc part[VEC];
        TBN_UNROLL
        for (int k = 0; k < VEC; ++k) {
          part[k] = Op::load_partial(args.partial, stride, p * channels + cv * VEC + k, count);
        }
        TBN_UNROLL
        for (int k = 0; k < VEC; ++k) {
          acc[k] = Op::merge(acc[k], part[k]);
        }
      }
    }
    block_reduce_rows<Op, VEC>(acc, g.tx, smem);
    total = owner ? smem[t] : Op::identity();
  }
  // maps[t]: the map of the channel that thread t owns; tx <= 32.
  __shared__ ChannelMap<acc_t> maps[32 * VEC];
  if (owner) {
    // Thread t's channel is slot t % VEC of column t / VEC.
    if (finalizes) {
      Op::finalize(total, own_channel, centres[t], args.fin, args.ch);
    }
    if (args.out != nullptr) {
      maps[t] = Op::map(total, own_channel, centres[t], args.fin, args.ch);
    }
  }
  if (args.out != nullptr) {
    __syncthreads();
    if (active) {
      ChannelMap<acc_t> map[VEC];
      TBN_UNROLL
      for (int k = 0; k < VEC; ++k) {
        map[k] = maps[(threadIdx.x & (g.tx - 1)) * VEC + k];
      }
      elementwise_rows<VEC, Op::kReadsDy>(
          g, cv, r0, r1, y, map, args.ch, args.dy, args.x, args.out);
    }
  }
}

// Finalizes statistics of `count` values per channel gathered elsewhere, given their
// mean and M2, as a reduction finalizes its own.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    finalize_stats_kernel(const at::opmath_type<scalar_t>* mean,
                          const at::opmath_type<scalar_t>* m2,
                          int64_t count,
                          int64_t channels,
                          FinalizeArgs<scalar_t> fin,
                          ChannelArgs<scalar_t> ch) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c < channels) {
    math::Welford<at::opmath_type<scalar_t>> a;
    a.mean = mean[c];
    a.m2 = m2[c];
    a.count = count;
    StatsOp<scalar_t>::finalize(a, c, 0, fin, ch);  // the mean is not centred
  }
}

// ---------------------------------------------------------------------------------
// Host side

// Blocks of `kernel` per SM on the current device. Cached per kernel and device: they
// depend on the architecture only, and GPUs of different architectures may share a
// process. (Only c10's CUDA headers are used here, so a compiler-only toolkit builds
// this file.)
template <auto kKernel>
int blocks_per_sm() {
  static std::atomic<int> cached[C10_COMPILE_TIME_MAX_GPUS];
  const c10::DeviceIndex device = c10::cuda::current_device();
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0));
    n = std::max(n, 1);
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

int sm_count() {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}

// Blocks of `kernel` that run at once on the current device: a full wave.
template <auto kKernel>
int64_t wave_size() {
  return static_cast<int64_t>(blocks_per_sm<kKernel>()) * sm_count();
}

// The wave of a cooperative launch of `kernel`, whose blocks must all be resident at once
// before any runs: one block per SM fewer than a full wave, so that kernels of other
// streams (NCCL's, overlapping a backward pass) that hold part of an SM do not keep it
// waiting. 0, for no cooperative launch, where the device has none or the kernel fits one
// block per SM.
template <auto kKernel>
int64_t cooperative_wave() {
  int supported = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &supported, cudaDevAttrCooperativeLaunch, c10::cuda::current_device()));
  const int per_sm = blocks_per_sm<kKernel>();
  return supported != 0 && per_sm > 1 ? static_cast<int64_t>(per_sm - 1) * sm_count() : 0;
}

// A 1D grid of `blocks`: at most 2^31 - 1, which a channel count would have to exceed.
dim3 grid_of(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(),
              "batch_norm: too many channels for the CUDA kernels (",
              blocks,
              " blocks)");
  return dim3(static_cast<unsigned int>(blocks));
}

template <typename scalar_t, int VEC>
void launch_elementwise(const Layout& l,
                        const PlaneGeom* pg,
                        const RowGeom* rg,
                        const ChannelArgs<scalar_t>& ch,
                        const scalar_t* dy,
                        const scalar_t* x,
                        scalar_t* out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_reads_dy(ch, [&](auto reads_dy) {
    constexpr bool kReadsDy = decltype(reads_dy)::value;
    if (l.rows) {
      constexpr auto kernel = elementwise_rows_kernel<scalar_t, VEC, kReadsDy>;
      const RowGeom g = rg ? *rg : row_geom(l, VEC, wave_size<kernel>());
      kernel<<<grid_of(g.groups * g.splits), kThreads, 0, stream>>>(g, ch, dy, x, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      constexpr auto kernel = elementwise_planes_kernel<scalar_t, VEC, kReadsDy>;
      const PlaneGeom g = pg ? *pg : plane_geom(l, VEC, wave_size<kernel>());
      kernel<<<grid_of(g.channels * g.splits), kThreads, 0, stream>>>(g, ch, dy, x, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// Launches `kernel` over `blocks` blocks on the current stream, cooperatively: all of
// them resident at once, as grid_barrier needs.
template <typename Geom, typename scalar_t>
void launch_cooperative(void (*kernel)(Geom, ReduceArgs<scalar_t>),
                        int64_t blocks,
                        const Geom& g,
                        const ReduceArgs<scalar_t>& args) {
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid_of(blocks);
  config.blockDim = dim3(kThreads);
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = &cooperative;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, g, args));
}

// Runs the reduction of Op and, when args.out is set, the elementwise pass: in one kernel
// when one block owns each channel or the split reduction is launched cooperatively
// (cooperative_wave, launch_cooperatively), else as a second kernel after the reduction's.
// Shapes are taken at the cooperative wave, at which more layers get one block per channel
// (or group); a split reduction that launches plainly takes the full wave's.
template <typename Op, typename scalar_t, int VEC>
void launch_reduce(const Layout& l, const at::Tensor& like, ReduceArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto rows_kernel = reduce_rows_kernel<Op, scalar_t, VEC, false>;
  constexpr auto planes_kernel = reduce_planes_kernel<Op, scalar_t, VEC, false>;
  constexpr auto rows_grid_sync = reduce_rows_kernel<Op, scalar_t, VEC, true>;
  constexpr auto planes_grid_sync = reduce_planes_kernel<Op, scalar_t, VEC, true>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t cooperative =
      l.rows ? cooperative_wave<rows_grid_sync>() : cooperative_wave<planes_grid_sync>();
  const int64_t plain = l.rows ? wave_size<rows_kernel>() : wave_size<planes_kernel>();
  PlaneGeom pg{};
  RowGeom rg{};
  int64_t splits = 0;
  int64_t semaphores = 0;
  int64_t tiles = 0;
  const auto shape = [&](int64_t wave) {
    if (l.rows) {
      rg = reduction_row_geom(l, VEC, VEC * static_cast<int>(sizeof(scalar_t)), wave);
      splits = rg.splits;
      semaphores = rg.groups;
      tiles = tiles_per_thread(rg);
    } else {
      pg = plane_geom(l, VEC, wave);
      splits = pg.splits;
      semaphores = l.channels;
      tiles = tiles_per_thread(pg);
    }
  };
  shape(cooperative > 0 ? cooperative : plain);
  const bool grid_sync = launch_cooperatively(splits, tiles, cooperative, plain);
  if (cooperative > 0 && splits > 1 && !grid_sync) {
    shape(plain);
  }
  scalar_t* out = args.out;
  const bool fused = splits == 1 || grid_sync;
  if (!fused) {
    args.out = nullptr;
  }

  at::Tensor workspace;
  if (splits > 1) {
    const int64_t partial_bytes =
        Op::kPartials * splits * l.channels * static_cast<int64_t>(sizeof(acc_t));
    const int64_t semaphore_bytes = grid_sync ? 0 : semaphores * static_cast<int64_t>(sizeof(int));
    workspace = at::empty({partial_bytes + semaphore_bytes}, like.options().dtype(at::kByte));
    auto* base = static_cast<char*>(workspace.data_ptr());
    args.partial = reinterpret_cast<acc_t*>(base);
    if (!grid_sync) {
      args.semaphores = reinterpret_cast<int*>(base + partial_bytes);
      C10_CUDA_CHECK(cudaMemsetAsync(args.semaphores, 0, semaphore_bytes, stream));
    }
  }

  if (grid_sync) {
    if (l.rows) {
      launch_cooperative(rows_grid_sync, rg.groups * rg.splits, rg, args);
    } else {
      launch_cooperative(planes_grid_sync, pg.channels * pg.splits, pg, args);
    }
    return;
  }
  if (l.rows) {
    rows_kernel<<<grid_of(rg.groups * rg.splits), kThreads, 0, stream>>>(rg, args);
  } else {
    planes_kernel<<<grid_of(pg.channels * pg.splits), kThreads, 0, stream>>>(pg, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (out != nullptr && !fused) {
    launch_elementwise<scalar_t, VEC>(l, &pg, &rg, args.ch, args.dy, args.x, out);
  }
}

// Calls f(std::integral_constant<int, VEC>) with the widest vector that the layout and
// every pointer allow: a channel's run (planes) or a row (rows) must hold whole vectors,
// and pointers must be aligned to them. 16-byte vectors, else (float16/bfloat16 only, for
// runs such as 14 x 14 = 196 elements) 8-byte ones, else single elements.
template <typename scalar_t, typename F>
void with_vector_width(const Layout& l, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int V = kVec<scalar_t>;
  const auto fits = [&](int vec) {
    bool ok = (l.rows ? l.channels : l.inner) % vec == 0;
    for (const void* p : ptrs) {
      ok = ok && reinterpret_cast<uintptr_t>(p) % (vec * sizeof(scalar_t)) == 0;
    }
    return ok;
  };
  if (fits(V)) {
    f(std::integral_constant<int, V>{});
  } else if constexpr (V == 8) {
    if (fits(V / 2)) {
      f(std::integral_constant<int, V / 2>{});
    } else {
      f(std::integral_constant<int, 1>{});
    }
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace

template <typename scalar_t>
void Launch<scalar_t>::reduce(Reduction r,
                              const Layout& l,
                              const at::Tensor& x,
                              const at::Tensor& dy,
                              const at::Tensor& out,
                              Pass pass,
                              const ChannelTensors& channels,
                              const FinalizeTensors& fin,
                              double eps) {
  ReduceArgs<scalar_t> args{};
  args.x = x.const_data_ptr<scalar_t>();
  args.dy = ptr_of<const scalar_t>(dy);
  args.out = out.defined() && out.numel() > 0 ? out.mutable_data_ptr<scalar_t>() : nullptr;
  args.fin = finalize_args<scalar_t>(fin);
  args.ch = channel_args<scalar_t>(pass, channels, l.per_channel(), eps);
  with_vector_width<scalar_t>(l, {args.x, args.dy, args.out}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    if (r == Reduction::kStats) {
      launch_reduce<StatsOp<scalar_t>, scalar_t, VEC>(l, x, args);
    } else {
      launch_reduce<GradOp<scalar_t>, scalar_t, VEC>(l, x, args);
    }
  });
}

template <typename scalar_t>
void Launch<scalar_t>::elementwise(const Layout& l,
                                   const at::Tensor& x,
                                   const at::Tensor& dy,
                                   const at::Tensor& out,
                                   Pass pass,
                                   const ChannelTensors& channels,
                                   int64_t count,
                                   double eps) {
  const auto ch = channel_args<scalar_t>(pass, channels, count, eps);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_data = ptr_of<const scalar_t>(dy);
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  with_vector_width<scalar_t>(l, {x_data, dy_data, out_data}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    launch_elementwise<scalar_t, VEC>(l, nullptr, nullptr, ch, dy_data, x_data, out_data);
  });
}

template <typename scalar_t>
void Launch<scalar_t>::finalize_stats(const at::Tensor& mean,
                                      const at::Tensor& m2,
                                      int64_t count,
                                      const FinalizeTensors& fin,
                                      const ChannelTensors& channels,
                                      double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = mean.numel();
  finalize_stats_kernel<scalar_t>
      <<<grid_of(ceil_div(C, kThreads)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          mean.const_data_ptr<acc_t>(),
          m2.const_data_ptr<acc_t>(),
          count,
          C,
          finalize_args<scalar_t>(fin),
          channel_args<scalar_t>(Pass::kNormalizeTraining, channels, count, eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace torch_batchnorm
