// The CUDA kernels' geometry (csrc/ops/cuda/batch_norm_geometry.h), run on the CPU: the
// launch shapes the host picks cover every vector of the input exactly once, in the
// channel (planes) or row and column (rows) the kernel attributes it to, forwards and
// backwards, and the offsets the threads step to match the closed form, also past 2^32.
// No GPU and no CUDA toolkit needed: a wrong offset here is a wrong result there.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/cuda/batch_norm_geometry.h"

namespace torch_batchnorm {
namespace cuda {
namespace {

// Waves of blocks (blocks per SM times SMs) of the GPUs the kernels are tuned for, and
// extremes.
constexpr int64_t kWaves[] = {1, 7, 264, 396, 660, 1056, 1 << 20};

// The offsets one thread visits, in order. Checks that only the last tile is partial.
template <bool kReverse, typename Walk>
std::vector<int64_t> visits(Walk&& walk) {
  std::vector<int64_t> out;
  bool partial_seen = false;
  walk([&](const int64_t (&offs)[kUnroll], int n) {
    EXPECT_FALSE(partial_seen) << "a partial tile before the last one";
    EXPECT_GE(n, 1);
    EXPECT_LE(n, kUnroll);
    partial_seen = n < kUnroll;
    out.insert(out.end(), offs, offs + n);
  });
  return out;
}

std::vector<int64_t> plane_visits(
    const PlaneGeom& g, int64_t c, int64_t v0, int64_t v1, int tid, bool reverse) {
  if (reverse) {
    return visits<true>([&](auto&& f) { for_each_plane_tile<true>(g, c, v0, v1, tid, f); });
  }
  return visits<false>([&](auto&& f) { for_each_plane_tile<false>(g, c, v0, v1, tid, f); });
}

std::vector<int64_t> row_visits(
    const RowGeom& g, int64_t cv, int64_t r0, int64_t r1, int y, bool reverse) {
  if (reverse) {
    return visits<true>([&](auto&& f) { for_each_row_tile<true>(g, cv, r0, r1, y, f); });
  }
  return visits<false>([&](auto&& f) { for_each_row_tile<false>(g, cv, r0, r1, y, f); });
}

// Raises *most, if given, to the tiles a walk of `vectors` took (only its last is partial).
void count_tiles(int64_t vectors, int64_t* most) {
  if (most != nullptr) {
    *most = std::max(*most, ceil_div(vectors, kUnroll));
  }
}

// Thread `tid` of a slice [v0, v1) of channel c owns vectors v0 + tid + k * kThreads;
// vector v of the channel lies in plane v / plane at position v % plane.
void expect_plane_walk(const PlaneGeom& g,
                       int64_t c,
                       int64_t v0,
                       int64_t v1,
                       int tid,
                       std::vector<int>* seen,
                       int64_t* most_tiles) {
  const auto fwd = plane_visits(g, c, v0, v1, tid, false);
  count_tiles(static_cast<int64_t>(fwd.size()), most_tiles);
  int64_t k = 0;
  for (int64_t v = v0 + tid; v < v1; v += kThreads, ++k) {
    ASSERT_LT(k, static_cast<int64_t>(fwd.size()));
    const int64_t expected = (v / g.plane * g.channels + c) * g.plane + v % g.plane;
    ASSERT_EQ(fwd[k], expected) << "channel " << c << ", vector " << v << ", thread " << tid;
    if (seen != nullptr) {
      ++(*seen)[expected];
    }
  }
  ASSERT_EQ(k, static_cast<int64_t>(fwd.size()));
  const auto bwd = plane_visits(g, c, v0, v1, tid, true);
  ASSERT_EQ(std::vector<int64_t>(fwd.rbegin(), fwd.rend()), bwd) << "thread " << tid;
}

// Thread (x, y) of slice [r0, r1) of group `group` owns column vector group * tx + x of
// rows r0 + y + k * ty.
void expect_row_walk(const RowGeom& g,
                     int64_t group,
                     int64_t r0,
                     int64_t r1,
                     int t,
                     std::vector<int>* seen,
                     int64_t* most_tiles) {
  const int64_t cv = group * g.tx + t % g.tx;
  const int y = t / g.tx;
  if (cv >= g.vecs) {
    return;  // the kernels skip these threads
  }
  const auto fwd = row_visits(g, cv, r0, r1, y, false);
  count_tiles(static_cast<int64_t>(fwd.size()), most_tiles);
  int64_t k = 0;
  for (int64_t r = r0 + y; r < r1; r += g.ty, ++k) {
    ASSERT_LT(k, static_cast<int64_t>(fwd.size()));
    ASSERT_EQ(fwd[k], r * g.vecs + cv) << "row " << r << ", column " << cv;
    if (seen != nullptr) {
      ++(*seen)[r * g.vecs + cv];
    }
  }
  ASSERT_EQ(k, static_cast<int64_t>(fwd.size()));
  const auto bwd = row_visits(g, cv, r0, r1, y, true);
  ASSERT_EQ(std::vector<int64_t>(fwd.rbegin(), fwd.rend()), bwd) << "thread " << t;
}

// Slices partition [0, total) in order; none is empty unless there is nothing to cover
// (a reduction merges the partial result of every slice, and an empty one has no mean).
template <typename Geom>
void expect_slices(const Geom& g, int64_t total) {
  ASSERT_GE(g.splits, 1);
  EXPECT_EQ(g.begin(0), 0);
  EXPECT_EQ(g.begin(g.splits), total);
  for (int64_t s = 0; s < g.splits; ++s) {
    if (total > 0) {
      EXPECT_LT(g.begin(s), g.begin(s + 1)) << "slice " << s << " of " << g.splits;
    }
  }
}

PlaneGeom planes_with_splits(int64_t outer, int64_t channels, int64_t plane, int64_t splits) {
  return PlaneGeom{channels, plane, outer * plane, splits};
}

// Every block and thread of a planes launch: each vector exactly once, and the busiest
// thread as many tiles as tiles_per_thread says (launches are chosen by it).
void expect_planes_cover(const PlaneGeom& g, int64_t outer) {
  expect_slices(g, g.per_channel);
  std::vector<int> seen(static_cast<size_t>(outer * g.channels * g.plane), 0);
  int64_t most_tiles = 0;
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t s = 0; s < g.splits; ++s) {
      for (int tid = 0; tid < kThreads; ++tid) {
        expect_plane_walk(g, c, g.begin(s), g.begin(s + 1), tid, &seen, &most_tiles);
      }
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    ASSERT_EQ(seen[i], 1) << "vector " << i;
  }
  EXPECT_EQ(most_tiles, tiles_per_thread(g));
}

void expect_rows_cover(const RowGeom& g) {
  expect_slices(g, g.rows);
  std::vector<int> seen(static_cast<size_t>(g.rows * g.vecs), 0);
  int64_t most_tiles = 0;
  for (int64_t s = 0; s < g.splits; ++s) {
    for (int64_t group = 0; group < g.groups; ++group) {
      for (int t = 0; t < kThreads; ++t) {
        expect_row_walk(g, group, g.begin(s), g.begin(s + 1), t, &seen, &most_tiles);
      }
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    ASSERT_EQ(seen[i], 1) << "row " << i / g.vecs << ", column " << i % g.vecs;
  }
  EXPECT_EQ(most_tiles, tiles_per_thread(g));
}

// Planes of every length against kThreads (shorter, equal, longer, not a divisor), with
// the slice counts the host picks and forced ones (down to one vector per slice).
TEST(CudaGeometry, PlanesCoverEveryVectorOnce) {
  const int64_t planes[] = {1, 3, 49, 196, 255, 256, 257, 784, 1000};
  const int64_t outers[] = {1, 2, 5};
  const int64_t channel_counts[] = {1, 3};
  for (int64_t plane : planes) {
    for (int64_t outer : outers) {
      for (int64_t channels : channel_counts) {
        SCOPED_TRACE(testing::Message()
                     << "outer " << outer << ", channels " << channels << ", plane " << plane);
        const Layout l{outer, channels, plane, false};
        for (int64_t wave : kWaves) {
          const PlaneGeom g = plane_geom(l, 1, wave);
          EXPECT_EQ(g.per_channel, outer * plane);
          EXPECT_LE(g.splits * channels, std::max(wave, channels)) << "more than one wave";
          expect_planes_cover(g, outer);
        }
        for (int64_t splits : {int64_t{2}, int64_t{7}, outer * plane}) {
          splits = std::min(splits, outer * plane);  // a slice of at least one vector
          expect_planes_cover(planes_with_splits(outer, channels, plane, splits), outer);
        }
      }
    }
  }
}

// Rows with each group width (tx) the kernels can be given, columns that fill the last
// group or not, and the slice counts the host picks or forced ones.
TEST(CudaGeometry, RowsCoverEveryVectorOnce) {
  const int64_t row_counts[] = {1, 3, 31, 64, 100, 513};
  const int64_t vec_counts[] = {1, 2, 5, 8, 16, 24, 32, 33, 64, 100};
  for (int64_t rows : row_counts) {
    for (int64_t vecs : vec_counts) {
      SCOPED_TRACE(testing::Message() << "rows " << rows << ", vectors per row " << vecs);
      const Layout l{rows, vecs, 1, true};
      for (int64_t wave : kWaves) {
        // The elementwise kernel's geometry, and a reduction's of 16-byte vectors.
        for (const RowGeom& g : {row_geom(l, 1, wave), reduction_row_geom(l, 1, 16, wave)}) {
          EXPECT_EQ(g.rows, rows);
          EXPECT_EQ(g.vecs, vecs);
          EXPECT_EQ(g.tx * g.ty, kThreads);
          EXPECT_TRUE(g.tx >= 1 && g.tx <= 32 && (g.tx & (g.tx - 1)) == 0) << "tx " << g.tx;
          EXPECT_EQ(g.groups, (vecs + g.tx - 1) / g.tx);
          EXPECT_LE(g.splits * g.groups, std::max(wave, g.groups)) << "more than one wave";
          expect_rows_cover(g);
        }
      }
      for (int tx = 1; tx <= 32; tx *= 2) {
        for (int64_t splits : {int64_t{1}, int64_t{3}, int64_t{40}}) {
          splits = std::min(splits, rows);  // a slice of at least one row
          const RowGeom g{rows, vecs, tx, kThreads / tx, (vecs + tx - 1) / tx, splits};
          SCOPED_TRACE(testing::Message() << "tx " << tx << ", splits " << splits);
          expect_rows_cover(g);
        }
      }
    }
  }
}

// The vector width divides the run (planes) or row (rows) the kernels walk in vectors.
TEST(CudaGeometry, VectorWidths) {
  const PlaneGeom p = plane_geom(Layout{4, 3, 196, false}, 4, 396);
  EXPECT_EQ(p.plane, 49);
  EXPECT_EQ(p.per_channel, 4 * 49);
  const RowGeom r = row_geom(Layout{6272, 256, 1, true}, 8, 264);
  EXPECT_EQ(r.vecs, 32);
  EXPECT_EQ(r.rows, 6272);
}

// Groups are a warp wide unless their last block would merge more than two partial
// results per thread; then one line (8 vectors) wide.
TEST(CudaGeometry, RowGroupWidth) {
  // [32, 128, 28, 28] float32 on an H100 (3 blocks per SM): 396 slices of one group.
  const RowGeom narrow = row_geom(Layout{32 * 28 * 28, 128, 1, true}, 4, 396);
  EXPECT_EQ(narrow.tx, 8);
  EXPECT_EQ(narrow.groups, 4);
  EXPECT_EQ(narrow.splits, 99);
  // [256, 4096] float32: 32 groups of 8 slices, one merge per thread.
  const RowGeom wide = row_geom(Layout{256, 4096, 1, true}, 4, 396);
  EXPECT_EQ(wide.tx, 32);
  EXPECT_EQ(wide.splits, 8);
  // Fewer vectors than a group holds: as many as there are.
  EXPECT_EQ(row_geom(Layout{1000, 12, 1, true}, 4, 396).tx, 4);
}

// A short reduction narrows its groups where that makes each one block, down to a run of
// 32 bytes per row; else it keeps row_geom's.
TEST(CudaGeometry, ReductionRowGroupsNarrowToOneBlock) {
  const auto expect_geom = [](const RowGeom& g, int tx, int64_t groups, int64_t splits) {
    EXPECT_EQ(g.tx, tx);
    EXPECT_EQ(g.groups, groups);
    EXPECT_EQ(g.splits, splits);
  };
  // [256, 4096] float32 on an H100: 256 groups of 4 vectors, not 32 groups of 8 slices.
  expect_geom(reduction_row_geom(Layout{256, 4096, 1, true}, 4, 16, 396), 4, 256, 1);
  // bfloat16 (2 blocks per SM): 128 groups of 4 vectors, 4 rows per thread.
  expect_geom(reduction_row_geom(Layout{256, 4096, 1, true}, 8, 16, 264), 4, 128, 1);
  // [32, 2048, 7, 7] float32 channels-last: from 64 groups of 6 slices to 256 groups,
  // each a sector of a row wide.
  expect_geom(reduction_row_geom(Layout{32 * 7 * 7, 2048, 1, true}, 4, 16, 396), 2, 256, 1);
  // Few groups for many rows: no width gets to one block; row_geom's groups.
  expect_geom(reduction_row_geom(Layout{32 * 28 * 28, 128, 1, true}, 4, 16, 396), 8, 4, 99);
  // 8-byte vectors: 4 of them are a sector. 256 rows get one block per group at that
  // width; 512 rows would need 2 vectors, so they keep row_geom's 16 slices.
  expect_geom(reduction_row_geom(Layout{256, 1024, 1, true}, 4, 8, 264), 4, 64, 1);
  expect_geom(reduction_row_geom(Layout{512, 1024, 1, true}, 4, 8, 264), 32, 8, 16);
  // Long reductions keep their blocks: bfloat16 [64, 1120, 28, 28] at a wave of 132 would
  // be one block for each of 70 groups, its threads reading 98 tiles each.
  expect_geom(reduction_row_geom(Layout{64 * 28 * 28, 1120, 1, true}, 8, 16, 132), 8, 18, 7);
}

// A split reduction launches plainly, at the full wave, only where it is long and the
// cooperative wave is half the full one or less.
TEST(CudaGeometry, LongSplitReductionsAtHalfTheWaveLaunchPlainly) {
  const auto tiles = [](int64_t rows, int64_t channels, int vec, int64_t wave) {
    return tiles_per_thread(reduction_row_geom(Layout{rows, channels, 1, true}, vec, 16, wave));
  };
  // bfloat16 channels-last on 132 SMs (2 blocks per SM, cooperatively 1): [64, 256, 56, 56]
  // reads 48 tiles a thread at the cooperative wave and launches plainly; [32, 256, 28, 28]
  // reads 6 and stays cooperative.
  EXPECT_EQ(tiles(64 * 56 * 56, 256, 8, 132), 48);
  EXPECT_FALSE(launch_cooperatively(33, 48, 132, 264));
  EXPECT_EQ(tiles(32 * 28 * 28, 256, 8, 132), 6);
  EXPECT_TRUE(launch_cooperatively(33, 6, 132, 264));
  // float32 (3 blocks per SM, cooperatively 2): cooperative however long.
  EXPECT_TRUE(launch_cooperatively(33, 48, 264, 396));
  // One block per group, or no cooperative launch on the device: nothing to launch so.
  EXPECT_FALSE(launch_cooperatively(1, 48, 132, 264));
  EXPECT_FALSE(launch_cooperatively(33, 6, 0, 264));
}

// No vector to cover (an empty batch): one slice, which the kernels use to finalize the
// channel's statistics.
TEST(CudaGeometry, EmptyBatchHasOneSlice) {
  for (int64_t wave : kWaves) {
    const PlaneGeom p = plane_geom(Layout{0, 5, 49, false}, 1, wave);
    EXPECT_EQ(p.splits, 1);
    expect_planes_cover(p, 0);
    const RowGeom r = row_geom(Layout{0, 40, 1, true}, 4, wave);
    EXPECT_EQ(r.splits, 1);
    expect_rows_cover(r);
  }
}

// Offsets past 2^32 vectors: the incremental steps against the closed form, for every
// thread of the first and last slices (short ones, so that each thread walks a few vectors).
TEST(CudaGeometry, OffsetsBeyond32Bits) {
  // 7 channels of 2^30 planes of 5 vectors: 3.8e10 vectors; planes shorter than kThreads,
  // so each step crosses planes.
  const PlaneGeom p = planes_with_splits(int64_t{1} << 30, 7, 5, int64_t{1} << 22);
  ASSERT_GT(p.channels * p.per_channel, int64_t{1} << 32);
  for (int64_t c : {int64_t{0}, int64_t{6}}) {
    for (int64_t s : {int64_t{0}, p.splits / 2, p.splits - 1}) {
      for (int tid = 0; tid < kThreads; ++tid) {
        expect_plane_walk(p, c, p.begin(s), p.begin(s + 1), tid, nullptr, nullptr);
      }
    }
  }
  // 2^30 rows of 24 vectors: 2.6e10 vectors.
  const RowGeom r{int64_t{1} << 30, 24, 32, kThreads / 32, 1, int64_t{1} << 22};
  ASSERT_GT(r.rows * r.vecs, int64_t{1} << 32);
  for (int64_t s : {int64_t{0}, r.splits / 2, r.splits - 1}) {
    for (int t = 0; t < kThreads; ++t) {
      expect_row_walk(r, 0, r.begin(s), r.begin(s + 1), t, nullptr, nullptr);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace torch_batchnorm
