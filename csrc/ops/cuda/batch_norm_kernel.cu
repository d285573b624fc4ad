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
//                StatsOp::centre); gradient: sum(dy), sum(dy * (x - mean)).
//                A block reduces a slice of one channel (planes) or of a group of channels
//                (rows). When one block per channel would leave SMs idle, channels are split
//                over several blocks and the last block of each channel to finish merges
//                the partial results in a fixed order (deterministic) and finalizes: saved
//                statistics (or mean and M2) and the in-place running-stat update, or
//                grad_weight, grad_bias and the sums. No host synchronisation anywhere.
//   elementwise  out = a * dy + (b * (x - m) + c) with per-channel a, b, c, m: normalize
//                (a = 0) and grad input alike. When a block owns whole channels it runs
//                this pass itself right after its reduction (one launch per op); otherwise
//                a second kernel runs it. Either way the pass walks the data backwards, so
//                it starts with what the reduction read last, which is still in L2.
//
// batch_norm_forward is the statistics reduction with the normalizing pass,
// batch_norm_backward the gradient reduction with the grad-input pass; the split ops run
// the same pieces one at a time, with statistics and sums over all processes in between.
//
// Loads and stores are 16 bytes wide wherever the layout and the pointers allow it.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/batch_norm_check.h"
#include "ops/batch_norm_layout.h"
#include "ops/batch_norm_math.h"
#include "ops/cuda/batch_norm_geometry.h"
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
          __shfl_xor_sync(kFullMask, a.dy_xmu, lane_mask)};
}

// Blocks run in reverse order: the first to start cover what the reduction read last.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) elementwise_planes_kernel(
    PlaneGeom g, ChannelArgs<scalar_t> ch, const scalar_t* dy, const scalar_t* x, scalar_t* out) {
  const int64_t b = gridDim.x - 1 - static_cast<int64_t>(blockIdx.x);
  const int64_t c = b / g.splits;
  const int64_t s = b % g.splits;
  elementwise_planes<VEC>(g, c, g.begin(s), g.begin(s + 1), threadIdx.x, ch, dy, x, out);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) elementwise_rows_kernel(
    RowGeom g, ChannelArgs<scalar_t> ch, const scalar_t* dy, const scalar_t* x, scalar_t* out) {
  const int64_t b = gridDim.x - 1 - static_cast<int64_t>(blockIdx.x);
  const int64_t s = b / g.groups;
  const int64_t cv = (b % g.groups) * g.tx + (threadIdx.x & (g.tx - 1));
  if (cv < g.vecs) {
    elementwise_rows<VEC>(g, cv, g.begin(s), g.begin(s + 1), threadIdx.x / g.tx, ch, dy, x, out);
  }
}

// The merge order of the reductions below (this function, block_reduce_rows and the last
// block's merge of partial results) is emulated on the CPU by
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

template <typename Op, typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_planes_kernel(PlaneGeom g, ReduceArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = typename Op::Acc;
  __shared__ alignas(16) unsigned char smem_raw[kWarps * sizeof(Acc)];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);

  const int64_t c = blockIdx.x / g.splits;
  const int64_t s = blockIdx.x % g.splits;
  const int64_t v0 = g.begin(s);
  const int64_t v1 = g.begin(s + 1);
  Acc acc = thread_reduce_planes<Op, VEC>(g, c, v0, v1, threadIdx.x, args);
  acc = block_reduce_all<Op>(acc, smem);

  if (g.splits > 1) {
    acc_t* p0 = args.partial;
    acc_t* p1 = args.partial + g.splits * g.channels;
    if (threadIdx.x == 0) {
      Op::store_partial(acc, p0, p1, s * g.channels + c);
    }
    if (!arrive_last(args.semaphores + c, g.splits)) {
      return;
    }
    acc = Op::identity();
    for (int64_t t = threadIdx.x; t < g.splits; t += kThreads) {
      acc = Op::merge(
          acc, Op::load_partial(p0, p1, t * g.channels + c, (g.begin(t + 1) - g.begin(t)) * VEC));
    }
    acc = block_reduce_all<Op>(acc, smem);
  }
  if (threadIdx.x == 0) {
    Op::finalize(acc, c, plane_centre<Op, VEC>(g, c, args), args.fin, args.ch);
  }
  if (args.out != nullptr) {
    __syncthreads();  // the finalized statistics are read back by every thread
    elementwise_planes<VEC>(g, c, v0, v1, threadIdx.x, args.ch, args.dy, args.x, args.out);
  }
}

template <typename Op, typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(RowGeom g, ReduceArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = typename Op::Acc;
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

  Acc acc[VEC];
  thread_reduce_rows<Op, VEC>(g, active ? cv : 0, r0, active ? r1 : r0, y, args, acc);
  block_reduce_rows<Op, VEC>(acc, g.tx, smem);

  // Thread t < tx * VEC owns the result of channel vector t / VEC, slot t % VEC.
  const int t = threadIdx.x;
  const int64_t own_cv = group * g.tx + t / VEC;
  const bool owner = t < g.tx * VEC && own_cv < g.vecs;
  const int64_t own_channel = own_cv * VEC + t % VEC;
  Acc total = owner ? smem[t] : Op::identity();

  if (g.splits > 1) {
    acc_t* p0 = args.partial;
    acc_t* p1 = args.partial + g.splits * channels;
    if (owner) {
      Op::store_partial(total, p0, p1, s * channels + own_channel);
    }
    if (!arrive_last(args.semaphores + group, g.splits)) {
      return;
    }
    TBN_UNROLL
    for (int k = 0; k < VEC; ++k) {
      acc[k] = Op::identity();
    }
    if (active) {
      for (int64_t p = y; p < g.splits; p += g.ty) {
        const int64_t count = g.begin(p + 1) - g.begin(p);
        TBN_UNROLL
        for (int k = 0; k < VEC; ++k) {
          acc[k] = Op::merge(acc[k], Op::load_partial(p0, p1, p * channels + cv * VEC + k, count));
        }
      }
    }
    block_reduce_rows<Op, VEC>(acc, g.tx, smem);
    total = owner ? smem[t] : Op::identity();
  }
  if (owner) {
    Op::finalize(total, own_channel, row_centre<Op, VEC>(g, own_channel, args), args.fin, args.ch);
  }
  if (args.out != nullptr) {
    __syncthreads();  // the finalized statistics are read back by every thread
    if (active) {
      elementwise_rows<VEC>(g, cv, r0, r1, y, args.ch, args.dy, args.x, args.out);
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

// Blocks of `kernel` that run at once on the current device: a full wave. Blocks per SM
// are cached per kernel: they depend on the architecture only, and merely shape launches.
// (Only c10's CUDA headers are used here, so a compiler-only toolkit builds this file.)
template <auto kKernel>
int64_t wave_size() {
  static const int per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0));
    return std::max(n, 1);
  }();
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return static_cast<int64_t>(per_sm) * sms;
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
  if (l.rows) {
    const RowGeom g =
        rg ? *rg : row_geom(l, VEC, wave_size<elementwise_rows_kernel<scalar_t, VEC>>());
    elementwise_rows_kernel<scalar_t, VEC>
        <<<grid_of(g.groups * g.splits), kThreads, 0, stream>>>(g, ch, dy, x, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const PlaneGeom g =
        pg ? *pg : plane_geom(l, VEC, wave_size<elementwise_planes_kernel<scalar_t, VEC>>());
    elementwise_planes_kernel<scalar_t, VEC>
        <<<grid_of(g.channels * g.splits), kThreads, 0, stream>>>(g, ch, dy, x, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs the reduction of Op and, when args.out is set, the elementwise pass: inside the
// reduction kernel when one block owns each channel, else as a second kernel.
template <typename Op, typename scalar_t, int VEC>
void launch_reduce(const Layout& l, const at::Tensor& like, ReduceArgs<scalar_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  PlaneGeom pg{};
  RowGeom rg{};
  int64_t splits;
  int64_t semaphores;
  if (l.rows) {
    rg = row_geom(l, VEC, wave_size<reduce_rows_kernel<Op, scalar_t, VEC>>());
    splits = rg.splits;
    semaphores = rg.groups;
  } else {
    pg = plane_geom(l, VEC, wave_size<reduce_planes_kernel<Op, scalar_t, VEC>>());
    splits = pg.splits;
    semaphores = l.channels;
  }
  scalar_t* out = args.out;
  const bool fused = splits == 1;
  if (!fused) {
    args.out = nullptr;
  }

  at::Tensor workspace;
  if (splits > 1) {
    const int64_t partial_bytes = 2 * splits * l.channels * static_cast<int64_t>(sizeof(acc_t));
    workspace = at::empty({partial_bytes + semaphores * static_cast<int64_t>(sizeof(int))},
                          like.options().dtype(at::kByte));
    auto* base = static_cast<char*>(workspace.data_ptr());
    args.partial = reinterpret_cast<acc_t*>(base);
    args.semaphores = reinterpret_cast<int*>(base + partial_bytes);
    C10_CUDA_CHECK(cudaMemsetAsync(args.semaphores, 0, semaphores * sizeof(int), stream));
  }

  if (l.rows) {
    reduce_rows_kernel<Op, scalar_t, VEC>
        <<<grid_of(rg.groups * rg.splits), kThreads, 0, stream>>>(rg, args);
  } else {
    reduce_planes_kernel<Op, scalar_t, VEC>
        <<<grid_of(pg.channels * pg.splits), kThreads, 0, stream>>>(pg, args);
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

// A per-channel tensor the kernels can index as [C]: itself when contiguous, undefined
// when absent.
at::Tensor dense(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Writes back running statistics that were updated in a dense copy.
void copy_back(const std::optional<at::Tensor>& running, const at::Tensor& updated) {
  if (updated.defined() && !updated.is_same(*running)) {
    running->copy_(updated);
  }
}

// The elementwise pass alone: out = map(dy, x) with the per-channel map of `pass`.
void run_elementwise(const Layout& l,
                     const at::Tensor& x,
                     const at::Tensor& dy,
                     const at::Tensor& out,
                     Pass pass,
                     const ChannelTensors& channels,
                     int64_t count,
                     double eps) {
  if (l.channels == 0 || out.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_elementwise_cuda", [&] {
        const auto ch = channel_args<scalar_t>(pass, channels, count, eps);
        const scalar_t* x_data = x.const_data_ptr<scalar_t>();
        const scalar_t* dy_data = ptr_of<const scalar_t>(dy);
        scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
        with_vector_width<scalar_t>(l, {x_data, dy_data, out_data}, [&](auto vec) {
          constexpr int VEC = decltype(vec)::value;
          launch_elementwise<scalar_t, VEC>(l, nullptr, nullptr, ch, dy_data, x_data, out_data);
        });
      });
}

// A reduction of Op (StatsOp or GradOp) over x and dy, writing the outputs of `fin` per
// channel, followed by the elementwise pass of `pass` into `out` when that is defined and
// not empty. An empty batch still finalizes every channel.
template <template <typename> class Op>
void run_reduce(const Layout& l,
                const at::Tensor& x,
                const at::Tensor& dy,
                const at::Tensor& out,
                Pass pass,
                const ChannelTensors& channels,
                const FinalizeTensors& fin,
                double eps) {
  if (l.channels == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_reduce_cuda", [&] {
        ReduceArgs<scalar_t> args{};
        args.x = x.const_data_ptr<scalar_t>();
        args.dy = ptr_of<const scalar_t>(dy);
        args.out = out.defined() && out.numel() > 0 ? out.mutable_data_ptr<scalar_t>() : nullptr;
        args.fin = finalize_args<scalar_t>(fin);
        args.ch = channel_args<scalar_t>(pass, channels, l.per_channel(), eps);
        with_vector_width<scalar_t>(l, {args.x, args.dy, args.out}, [&](auto vec) {
          constexpr int VEC = decltype(vec)::value;
          launch_reduce<Op<scalar_t>, scalar_t, VEC>(l, x, args);
        });
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps) {
  check_batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  at::Tensor out = empty_result(input);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor save_mean = at::empty({training ? l.channels : 0}, x.options().dtype(acc_type));
  at::Tensor save_invstd = at::empty_like(save_mean);

  ChannelTensors ch;
  ch.weight = dense(weight);
  ch.bias = dense(bias);
  if (!training) {
    ch.mean = dense(running_mean);
    ch.spread = dense(running_var);
    run_elementwise(l, x, at::Tensor(), out, Pass::kNormalizeEval, ch, l.per_channel(), eps);
    return {out, save_mean, save_invstd};
  }
  FinalizeTensors fin;
  fin.save_mean = save_mean;
  fin.save_invstd = save_invstd;
  fin.running_mean = dense(running_mean);
  fin.running_var = dense(running_var);
  fin.momentum = momentum;
  ch.mean = save_mean;
  ch.spread = save_invstd;
  run_reduce<StatsOp>(l, x, at::Tensor(), out, Pass::kNormalizeTraining, ch, fin, eps);
  copy_back(running_mean, fin.running_mean);
  copy_back(running_var, fin.running_var);
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
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
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat grad_format = grad_input_format(input, grad_out);
  Layout l{};
  const at::Tensor x = kernel_layout(input.contiguous(grad_format), l);
  const at::Tensor dy = same_layout(grad_out, l);
  const bool mixed = is_mixed_type(input, {&weight, &running_mean, &running_var});
  const auto param_type = param_dtype(input, mixed);
  const int64_t C = l.channels;
  at::Tensor grad_input =
      mask[0] ? empty_in_format(input, grad_format) : at::empty({0}, x.options());
  at::Tensor grad_weight = at::empty({mask[1] ? C : 0}, x.options().dtype(param_type));
  at::Tensor grad_bias = at::empty({mask[2] ? C : 0}, x.options().dtype(param_type));

  ChannelTensors ch;
  ch.mean = dense(training ? save_mean : running_mean);
  ch.spread = dense(training ? save_invstd : running_var);
  ch.weight = dense(weight);
  const Pass pass = training ? Pass::kGradTraining : Pass::kGradEval;
  // As on the CPU: the sums are taken whenever an output depends on them, so an empty
  // batch still produces grad_weight and grad_bias.
  const bool need_sums = training ? (mask[0] || mask[1] || mask[2]) : (mask[1] || mask[2]);
  if (!need_sums) {
    run_elementwise(l, x, dy, grad_input, pass, ch, l.per_channel(), eps);
    return {grad_input, grad_weight, grad_bias};
  }
  FinalizeTensors fin;
  fin.grad_weight = mask[1] ? grad_weight : at::Tensor();
  fin.grad_bias = mask[2] ? grad_bias : at::Tensor();
  if (training && mask[0]) {
    // The sums the grad-input pass reads.
    const at::Tensor sums = at::empty({2, C}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    ch.sum_dy = sums[0];
    ch.sum_dy_xmu = sums[1];
    fin.sum_dy = ch.sum_dy;
    fin.sum_dy_xmu = ch.sum_dy_xmu;
  }
  run_reduce<GradOp>(l, x, dy, grad_input, pass, ch, fin, eps);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_batch_norm_stats(input);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  FinalizeTensors fin;
  fin.save_mean = at::empty({l.channels}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  fin.m2 = at::empty_like(fin.save_mean);
  run_reduce<StatsOp>(
      l, x, at::Tensor(), at::Tensor(), Pass::kNormalizeTraining, ChannelTensors(), fin, 0.0);
  return {fin.save_mean, fin.m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_with_stats_cuda(
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
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  at::Tensor out = empty_result(input);
  const int64_t C = l.channels;
  FinalizeTensors fin;
  fin.save_mean = at::empty({C}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  fin.save_invstd = at::empty_like(fin.save_mean);
  if (C == 0) {
    return {out, fin.save_mean, fin.save_invstd};
  }
  fin.running_mean = dense(running_mean);
  fin.running_var = dense(running_var);
  fin.momentum = momentum;
  ChannelTensors ch;
  ch.weight = dense(weight);
  ch.bias = dense(bias);
  ch.mean = fin.save_mean;
  ch.spread = fin.save_invstd;
  const at::Tensor mean_d = mean.contiguous();
  const at::Tensor m2_d = m2.contiguous();
  // The statistics are finalized (and the running statistics updated) even when this
  // process holds no values: they are those of all `count`.
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_with_stats_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        finalize_stats_kernel<scalar_t>
            <<<grid_of(ceil_div(C, kThreads)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                mean_d.const_data_ptr<acc_t>(),
                m2_d.const_data_ptr<acc_t>(),
                count,
                C,
                finalize_args<scalar_t>(fin),
                channel_args<scalar_t>(Pass::kNormalizeTraining, ch, count, eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  run_elementwise(l, x, at::Tensor(), out, Pass::kNormalizeTraining, ch, count, eps);
  copy_back(running_mean, fin.running_mean);
  copy_back(running_var, fin.running_var);
  return {out, fin.save_mean, fin.save_invstd};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_out,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& mean,
                                                                   const at::Tensor& invstd) {
  check_batch_norm_backward_reduce(grad_out, input, mean, invstd);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const at::Tensor dy = same_layout(grad_out, l);
  ChannelTensors ch;
  ch.mean = mean.contiguous();
  ch.spread = invstd.contiguous();
  FinalizeTensors fin;
  fin.sum_dy = at::empty({l.channels}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  fin.sum_dy_xmu = at::empty_like(fin.sum_dy);
  run_reduce<GradOp>(l, x, dy, at::Tensor(), Pass::kGradTraining, ch, fin, 0.0);
  return {fin.sum_dy, fin.sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_out,
                                          const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight,
                                          const at::Tensor& mean,
                                          const at::Tensor& invstd,
                                          const at::Tensor& sum_dy,
                                          const at::Tensor& sum_dy_xmu,
                                          int64_t count) {
  check_batch_norm_backward_elemt(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count);
  const c10::cuda::CUDAGuard guard(input.device());
  Layout l{};
  const at::Tensor x = kernel_layout(input, l);
  const at::Tensor dy = same_layout(grad_out, l);
  at::Tensor grad_input = empty_result(input);
  ChannelTensors ch;
  ch.mean = mean.contiguous();
  ch.spread = invstd.contiguous();
  ch.weight = dense(weight);
  ch.sum_dy = sum_dy.contiguous();
  ch.sum_dy_xmu = sum_dy_xmu.contiguous();
  // The sums and `count` are those of every process: the coefficients are the training
  // ones of batch_norm_backward with that count.
  run_elementwise(l, x, dy, grad_input, Pass::kGradTraining, ch, count, 0.0);
  return grad_input;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(torch_batchnorm, CUDA, m) {
  m.impl("batch_norm_forward", &cuda::batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &cuda::batch_norm_backward_cuda);
  m.impl("batch_norm_stats", &cuda::batch_norm_stats_cuda);
  m.impl("batch_norm_forward_with_stats", &cuda::batch_norm_forward_with_stats_cuda);
  m.impl("batch_norm_backward_reduce", &cuda::batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &cuda::batch_norm_backward_elemt_cuda);
}

}  // namespace torch_batchnorm
