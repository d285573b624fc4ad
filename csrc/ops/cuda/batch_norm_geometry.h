#pragma once

// How the CUDA kernels (batch_norm_launch_impl.cuh) cover their input: the blocks and threads of
// a launch, and the vectors each thread walks. Plain host-and-device C++ with no CUDA
// runtime, so that the index arithmetic is tested on the CPU (tests/cpp/ops/cuda).

#include <algorithm>
#include <cstdint>

#include "ops/batch_norm_layout.h"
#include "ops/batch_norm_math.h"

// Loops over compile-time counts are unrolled in device code; the host compiler, which
// also sees the host-callable functions, does not know the pragma.
#if defined(__CUDA_ARCH__)
#define TBN_UNROLL _Pragma("unroll")
#else
#define TBN_UNROLL
#endif

namespace torch_batchnorm {
namespace cuda {

constexpr int kThreads = 256;
// Vectors each thread loads before it uses any: enough bytes in flight per SM to cover
// DRAM latency at the occupancy these kernels reach.
constexpr int kUnroll = 4;

// ---------------------------------------------------------------------------------
// Geometry: how blocks and threads cover the input. Offsets are counted in vectors of
// VEC elements and kept in 64 bits; they advance by additions, never by division.

// Contiguous [N, C, HW]: channel c is N runs ("planes") of HW elements, C * HW apart.
struct PlaneGeom {
  int64_t channels;
  int64_t plane;        // vectors per plane: HW / VEC
  int64_t per_channel;  // vectors per channel: N * plane
  int64_t splits;       // blocks per channel; block b covers slice b % splits of channel b / splits

  TBN_HOST_DEVICE int64_t begin(int64_t s) const {
    return per_channel * s / splits;
  }
};

// Channels-last [rows, C]: a block covers tx vectors of channels ("a group") times a
// slice of the rows, with ty threads along the rows.
struct RowGeom {
  int64_t rows;
  int64_t vecs;    // vectors per row: C / VEC
  int tx;          // a power of two <= 32, so a warp holds whole columns of threads
  int ty;          // kThreads / tx
  int64_t groups;  // ceil(vecs / tx)
  int64_t splits;  // blocks per group; block b covers slice b / groups of group b % groups

  TBN_HOST_DEVICE int64_t begin(int64_t s) const {
    return rows * s / splits;
  }
};

// Calls f(offsets, n) for each group of kUnroll of a thread's `mine` vectors, of which the
// first n are in range: the first at `off`, each next one at next(previous).
template <typename F, typename Next>
TBN_HOST_DEVICE void for_each_tile(int64_t mine, int64_t off, F& f, Next&& next) {
  for (int64_t left = mine; left > 0; left -= kUnroll) {
    int64_t offs[kUnroll];
    TBN_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      offs[u] = off;
      off = next(off);
    }
    f(offs, static_cast<int>(left < kUnroll ? left : kUnroll));
  }
}

// Walks the vectors of channel `c` in [v0, v1) that thread `tid` of a block owns: v0 + tid,
// then every kThreads-th. Calls f(offsets, n) for each group of kUnroll of them, of which
// the first n are in range. kReverse walks them from the last to the first.
template <bool kReverse, typename F>
TBN_HOST_DEVICE void for_each_plane_tile(
    const PlaneGeom& g, int64_t c, int64_t v0, int64_t v1, int tid, F&& f) {
  const int64_t first = v0 + tid;
  if (first >= v1) {
    return;
  }
  const int64_t mine = (v1 - first + kThreads - 1) / kThreads;
  const int64_t v = kReverse ? first + (mine - 1) * kThreads : first;
  const int64_t n = v / g.plane;
  int64_t j = v - n * g.plane;
  const int64_t off = (n * g.channels + c) * g.plane + j;
  // A step of kThreads vectors moves dn planes of this channel and dj within a plane.
  const int64_t dn = kThreads / g.plane;
  const int64_t dj = kThreads % g.plane;
  const int64_t plane_stride = g.channels * g.plane;
  const int64_t step = dn * plane_stride + dj;
  for_each_tile(mine, off, f, [&](int64_t o) {
    if constexpr (kReverse) {
      j -= dj;
      o -= step;
      if (j < 0) {
        j += g.plane;
        o -= plane_stride - g.plane;
      }
    } else {
      j += dj;
      o += step;
      if (j >= g.plane) {
        j -= g.plane;
        o += plane_stride - g.plane;
      }
    }
    return o;
  });
}

// Walks a thread's rows r0 + y, r0 + y + ty, ... < r1 of column vector `cv`.
template <bool kReverse, typename F>
TBN_HOST_DEVICE void for_each_row_tile(
    const RowGeom& g, int64_t cv, int64_t r0, int64_t r1, int y, F&& f) {
  const int64_t first = r0 + y;
  if (first >= r1) {
    return;
  }
  const int64_t mine = (r1 - first + g.ty - 1) / g.ty;
  const int64_t r = kReverse ? first + (mine - 1) * g.ty : first;
  const int64_t step = kReverse ? -g.ty * g.vecs : g.ty * g.vecs;
  for_each_tile(mine, r * g.vecs + cv, f, [step](int64_t o) { return o + step; });
}

// ---------------------------------------------------------------------------------
// Launch shapes, given `wave`: the blocks of the kernel that run at once on the device.

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Blocks per channel (or group): as many as fit in one wave together, so that every block
// is resident from the start and none waits for a second wave, and each at least one full
// round of kThreads * kUnroll vectors (rows: ty * kUnroll rows). With enough channels for a
// wave, one block owns a whole channel and the elementwise pass runs in the reduction
// kernel. (A cooperative launch, whose blocks wait for each other, must be one wave.)
inline int64_t choose_splits(int64_t units, int64_t rounds, int64_t wave) {
  return std::max<int64_t>(1, std::min(wave / units, rounds));
}

// Tiles (kUnroll vectors) that the busiest thread of a launch reads: the first thread of
// a longest slice, ceil(total / splits) vectors or rows long.
inline int64_t tiles_per_thread(const PlaneGeom& g) {
  return ceil_div(ceil_div(g.per_channel, g.splits), int64_t{kThreads} * kUnroll);
}

inline int64_t tiles_per_thread(const RowGeom& g) {
  return ceil_div(ceil_div(g.rows, g.splits), static_cast<int64_t>(g.ty) * kUnroll);
}

inline PlaneGeom plane_geom(const Layout& l, int vec, int64_t wave) {
  PlaneGeom g{};
  g.channels = l.channels;
  g.plane = l.inner / vec;
  g.per_channel = l.outer * g.plane;
  g.splits = choose_splits(l.channels, ceil_div(g.per_channel, kThreads * kUnroll), wave);
  return g;
}

inline RowGeom row_geom_of_width(const Layout& l, int vec, int64_t wave, int max_tx) {
  RowGeom g{};
  g.rows = l.outer;
  g.vecs = l.channels / vec;
  g.tx = 1;
  while (g.tx < max_tx && g.tx < g.vecs) {
    g.tx *= 2;
  }
  g.ty = kThreads / g.tx;
  g.groups = ceil_div(g.vecs, g.tx);
  g.splits = choose_splits(g.groups, ceil_div(g.rows, static_cast<int64_t>(g.ty) * kUnroll), wave);
  return g;
}

// Groups up to a warp wide (32 vectors) where a block that merges a group's partial results
// merges at most two per thread, else up to 8 vectors (one 128-byte line of 16-byte ones)
// wide. Wide groups are few, so each is split over many slices of the rows, and a merging
// block's ty = kThreads / tx threads merge all of them, one after another: the merge grows
// with the square of the width. On an H100
// (benchmarks/results/cuda-h100.md) narrow groups took the GPU time of a channels-last
// training forward from 74 to 25 us at [32, 128, 28, 28] float32 and from 72 to 25 us at
// [32, 256, 14, 14] bfloat16, but from 16.5 to 20.9 us at [256, 4096] float32, whose wide
// groups merged one partial result per thread.
inline RowGeom row_geom(const Layout& l, int vec, int64_t wave) {
  const RowGeom wide = row_geom_of_width(l, vec, wave, 32);
  return wide.splits <= 2 * wide.ty ? wide : row_geom_of_width(l, vec, wave, 8);
}

// A reduction whose threads read at most this many tiles is short: what splitting it
// costs (partial results, their merge, a second pass or a grid-wide barrier) is a large
// part of its time, and the occupancy that more blocks buy is not.
constexpr int64_t kShortTiles = 4;

// A split reduction whose threads read at least this many tiles at the cooperative wave
// is long: bound by bandwidth, it gains more from the blocks a plain launch adds than the
// split costs it there (partial results merged by the last block, a second kernel).
constexpr int64_t kLongTiles = 12;

// Whether a split reduction, whose busiest thread reads `tiles` at the cooperative wave
// `cooperative`, is launched cooperatively (0: the device or the kernel has no cooperative
// launch) rather than plainly at the full wave `plain`. A cooperative launch leaves one
// block per SM free; where the kernel fits two per SM (the bfloat16 kernels over rows),
// that halves the bytes in flight, which a long reduction pays for in bandwidth. An H200
// measured it (benchmarks/results/cuda-h200.md): plain launches of long bfloat16
// channels-last reductions took 11-16% off their gradient kernels ([64, 256, 56, 56]:
// training step 307 -> 261 us), but float32 ones (3 blocks per SM, cooperatively 2) and
// short ones lost up to 35%.
inline bool launch_cooperatively(int64_t splits,
                                 int64_t tiles,
                                 int64_t cooperative,
                                 int64_t plain) {
  return splits > 1 && cooperative > 0 && (2 * cooperative > plain || tiles < kLongTiles);
}

// The narrowest run of a row a group may read: 32 bytes, one sector (the unit DRAM and L2
// move) where rows are aligned to it.
constexpr int kSectorBytes = 32;

// A reduction's groups, of vectors of `vec_bytes`: row_geom's, or, for a short reduction,
// narrower ones where narrowing makes each group one block (splits 1) before a group's run
// of a row gets shorter than kSectorBytes. One block per group needs no partial results,
// no merge and no second pass (kernel or grid-wide barrier): the block runs the elementwise
// pass itself, as with one block per channel over planes. Where the slices were limited by
// the rows, narrowing keeps about as many blocks and rows per thread (halving tx doubles
// the groups and about halves the slices); where they were limited by the wave, it leaves
// more than half of it. Only short reductions (kShortTiles) are narrowed: a long one loses
// more to fewer blocks than it saves. They get to one block per group where there are
// many channels for the rows: the 2D [256, 4096] (float32: 256 groups of 4 vectors, each
// thread 4 rows, against 32 groups of 8 slices) and channels-last [32, 2048, 7, 7].
inline RowGeom reduction_row_geom(const Layout& l, int vec, int vec_bytes, int64_t wave) {
  const RowGeom g = row_geom(l, vec, wave);
  for (int tx = g.tx / 2; g.splits > 1 && tx * vec_bytes >= kSectorBytes; tx /= 2) {
    const RowGeom narrow = row_geom_of_width(l, vec, wave, tx);
    if (narrow.splits == 1 && tiles_per_thread(narrow) <= kShortTiles) {
      return narrow;
    }
  }
  return g;
}

}  // namespace cuda
}  // namespace torch_batchnorm
