// The bfloat16 and float16 loads and stores of the CPU loops against c10's conversions,
// on every copy of the loops this machine runs (with AVX-512 BF16 or F16C: the conversion
// instructions, and the exact path for vectors holding what they convert differently).
// Every loop converts through the same helpers, so one affine loop per layout, with and
// without streaming stores, covers them. Then the row reductions' contract with their
// callers: they write their per-channel totals, which callers leave unset.

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ops/cpu/batch_norm_loops.h"

namespace torch_batchnorm::cpu {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Floats whose rounding is easy to get wrong, then random ones: NaNs of either sign,
// quiet and signalling, with payloads; infinities; float denormals and the values around
// the smallest normal float; bfloat16 and float16 ties to even both ways; the largest
// floats and float16s, and the values just below and at the point where they round to
// infinity; float16's smallest normal and denormals, and the ties between them. Then
// random bit patterns and random values of float16's range. As many as fill whole
// vectors, so that both vector paths see every value.
std::vector<float> hard_values() {
  std::vector<float> v;
  for (uint32_t u : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF812345u, 0x7FFFFFFFu,
                     0x7F800000u, 0xFF800000u, 0x00000001u, 0x80000001u, 0x00400000u,
                     0x807FFFFFu, 0x007F8000u, 0x00008000u, 0x00800000u, 0x80800000u,
                     0x00807FFFu, 0x00808000u, 0x00818000u, 0x3F808000u, 0x3F818000u,
                     0xBF808000u, 0x7F7FFFFFu, 0xFF7FFFFFu, 0x7F7F8000u, 0x7F7F7FFFu,
                     0x00000000u, 0x80000000u, 0x3F800000u, 0x477FE000u, 0x477FEFFFu,
                     0x477FF000u, 0xC77FF000u, 0x38800000u, 0x387FC000u, 0x33800000u,
                     0x33000000u, 0xB3000000u, 0x33C00000u, 0x3F801000u, 0x3F803000u}) {
    v.push_back(from_bits(u));
  }
  std::mt19937 gen(0);
  std::uniform_int_distribution<uint32_t> any;
  std::uniform_real_distribution<float> exponent(-26.0f, 17.0f);
  for (int i = 0; v.size() < 512; ++i) {
    const float magnitude = std::exp2(exponent(gen));
    v.push_back(i % 2 ? from_bits(any(gen)) : any(gen) % 2 ? magnitude : -magnitude);
  }
  return v;
}

// y = 1 * scale + (-0) is scale itself, signed zeros included, so each output must be
// c10's conversion of the channel's scale.
template <typename scalar_t>
void expect_rounded_as_c10(const at::Tensor& y, const std::vector<float>& scale,
                           int64_t len, const char* what) {
  const auto* out = y.const_data_ptr<scalar_t>();
  const int64_t C = static_cast<int64_t>(scale.size());
  int64_t wrong = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    const float s = scale[(i / len) % C];
    const uint16_t want = scalar_t(s).x;
    if (out[i].x != want && ++wrong <= 5) {
      ADD_FAILURE() << what << ": float bits " << std::hex << c10::bit_cast<uint32_t>(s)
                    << " stored as " << out[i].x << ", c10 gives " << want;
    }
  }
  EXPECT_EQ(wrong, 0) << what;
}

// Each copy of the loops this CPU runs, the one loops() picks and the narrower ones, traced
// in failure messages by its name.
template <typename scalar_t, typename F>
void for_each_copy(F check) {
  for (const auto& [name, copy] : runnable_loops<scalar_t>()) {
    SCOPED_TRACE("loops built for " + name);
    check(copy);
  }
}

template <typename scalar_t>
class Stores16 : public ::testing::Test {};
using Types16 = ::testing::Types<c10::BFloat16, c10::Half>;
TYPED_TEST_SUITE(Stores16, Types16);

TYPED_TEST(Stores16, RowsRoundAsC10) {
  using scalar_t = TypeParam;
  const std::vector<float> scale = hard_values();
  const std::vector<float> shift(scale.size(), -0.0f);
  const int64_t C = static_cast<int64_t>(scale.size());
  const int64_t rows = 4;
  const at::Tensor x = at::ones({rows, C}, c10::CppTypeToScalarType<scalar_t>::value);
  for_each_copy<scalar_t>([&](const Loops<scalar_t>& copy) {
    for (const bool stream : {false, true}) {
      const at::Tensor y = at::empty_like(x);
      copy.rows_affine(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rows, C,
                       nullptr, scale.data(), shift.data(), stream);
      expect_rounded_as_c10<scalar_t>(y, scale, /*len=*/1, stream ? "rows, streaming" : "rows");
    }
  });
}

TYPED_TEST(Stores16, RunsRoundAsC10) {
  using scalar_t = TypeParam;
  const std::vector<float> scale = hard_values();
  const std::vector<float> shift(scale.size(), -0.0f);
  const int64_t C = static_cast<int64_t>(scale.size());
  // Runs of 64 values (whole vectors) and of 49 (a 7x7 plane: vectors across runs, and
  // a tail).
  for_each_copy<scalar_t>([&](const Loops<scalar_t>& copy) {
    for (const int64_t len : {64, 49}) {
      const at::Tensor x = at::ones({C * len}, c10::CppTypeToScalarType<scalar_t>::value);
      for (const bool stream : {false, true}) {
        const at::Tensor y = at::empty_like(x);
        copy.runs_affine(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                         /*spans=*/1, /*stride=*/C * len, /*runs=*/C, len, /*c0=*/0, C, nullptr,
                         scale.data(), shift.data(), stream);
        expect_rounded_as_c10<scalar_t>(y, scale, len, stream ? "runs, streaming" : "runs");
      }
    }
  });
}

// Every 16-bit pattern, denormals, infinities and NaNs included, loads as c10 widens it:
// y = x * 1 + (-0) stores x back, so y must be c10's round trip of x.
TYPED_TEST(Stores16, EveryValueLoadsAsC10) {
  using scalar_t = TypeParam;
  const int64_t C = 1 << 16;
  at::Tensor x = at::empty({C}, c10::CppTypeToScalarType<scalar_t>::value);
  auto* bits = x.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < C; ++i) {
    bits[i].x = static_cast<uint16_t>(i);
  }
  const std::vector<float> scale(C, 1.0f);
  const std::vector<float> shift(C, -0.0f);
  for_each_copy<scalar_t>([&](const Loops<scalar_t>& copy) {
    const at::Tensor y = at::empty_like(x);
    copy.rows_affine(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), /*rows=*/1,
                     C, nullptr, scale.data(), shift.data(), /*stream=*/false);
    const auto* out = y.const_data_ptr<scalar_t>();
    int64_t wrong = 0;
    for (int64_t i = 0; i < C; ++i) {
      const uint16_t want = scalar_t(static_cast<float>(bits[i])).x;
      if (out[i].x != want && ++wrong <= 5) {
        ADD_FAILURE() << std::hex << "bits " << i << " came back as " << out[i].x
                      << ", c10 gives " << want;
      }
    }
    EXPECT_EQ(wrong, 0);
  });
}

// rows_stats and rows_grad_sums write their totals whatever the arrays held (the kernels
// leave them unset): NaN in, the exact statistics and sums out, for one block of rows and
// for several, rows wider than a vector (33 channels: the last vector overlaps the one
// before it) and narrower (5).
TEST(RowReductions, WriteTheirTotals) {
  at::manual_seed(0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const int64_t C : {33, 5}) {
    for (const int64_t rows : {7, 40}) {
      SCOPED_TRACE(::testing::Message() << "[" << rows << ", " << C << "]");
      const at::Tensor x = at::randn({rows, C}, at::kFloat);
      const at::Tensor dy = at::randn({rows, C}, at::kFloat);
      const at::Tensor x64 = x.to(at::kDouble);
      const at::Tensor dy64 = dy.to(at::kDouble);
      const at::Tensor mean = x64.mean(0);
      const at::Tensor m2 = (x64 - mean).square().sum(0);
      const std::vector<float> centre(C, 0.25f);
      const at::Tensor xmu = x64 - 0.25;
      const at::Tensor want[] = {dy64.sum(0), (dy64 * xmu).sum(0), xmu.sum(0)};
      for_each_copy<float>([&](const Loops<float>& copy) {
        std::vector<float> scratch(3 * C);
        std::vector<double> stats(2 * C, nan);
        copy.rows_stats(x.const_data_ptr<float>(),
                        rows,
                        C,
                        /*ld=*/C,
                        /*rows_per_block=*/16,
                        stats.data(),
                        stats.data() + C,
                        scratch.data());
        std::vector<double> sums(3 * C, nan);
        copy.rows_grad_sums(dy.const_data_ptr<float>(),
                            x.const_data_ptr<float>(),
                            rows,
                            C,
                            /*ld=*/C,
                            /*rows_per_block=*/16,
                            centre.data(),
                            sums.data(),
                            sums.data() + C,
                            sums.data() + 2 * C,
                            scratch.data());
        const auto near = [&](const double* got, const at::Tensor& expected, const char* what) {
          const auto e = expected.accessor<double, 1>();
          for (int64_t c = 0; c < C; ++c) {
            EXPECT_NEAR(got[c], e[c], 1e-5 * (1 + std::abs(e[c]))) << what << ", channel " << c;
          }
        };
        near(stats.data(), mean, "mean");
        near(stats.data() + C, m2, "m2");
        near(sums.data(), want[0], "sum(dy)");
        near(sums.data() + C, want[1], "sum(dy * (x - centre))");
        near(sums.data() + 2 * C, want[2], "sum(x - centre)");
      });
    }
  }
}

}  // namespace
}  // namespace torch_batchnorm::cpu
