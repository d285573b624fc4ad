// The bfloat16 stores of the CPU loops against c10's conversion, on the loops this
// machine picks (with AVX-512 BF16: the conversion instruction, and the exact path for
// vectors holding a NaN or a float denormal). Every loop stores through the same helpers,
// so one affine loop per layout, with and without streaming stores, covers them.

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "ops/cpu/batch_norm_loops.h"

namespace torch_batchnorm::cpu {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Floats whose rounding is easy to get wrong, then random bit patterns: NaNs of either
// sign, quiet and signalling, with payloads; infinities; float denormals and the values
// around the smallest normal; ties to even both ways; the largest floats, which round to
// infinity. As many as fill whole vectors, so that both vector paths see every value.
std::vector<float> hard_values() {
  std::vector<float> v;
  for (uint32_t u : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF812345u, 0x7FFFFFFFu,
                     0x7F800000u, 0xFF800000u, 0x00000001u, 0x80000001u, 0x00400000u,
                     0x807FFFFFu, 0x007F8000u, 0x00008000u, 0x00800000u, 0x80800000u,
                     0x00807FFFu, 0x00808000u, 0x00818000u, 0x3F808000u, 0x3F818000u,
                     0xBF808000u, 0x7F7FFFFFu, 0xFF7FFFFFu, 0x7F7F8000u, 0x7F7F7FFFu,
                     0x00000000u, 0x80000000u, 0x3F800000u}) {
    v.push_back(from_bits(u));
  }
  std::mt19937 gen(0);
  std::uniform_int_distribution<uint32_t> any;
  while (v.size() < 512) {
    v.push_back(from_bits(any(gen)));
  }
  return v;
}

// y = 1 * scale + (-0) is scale itself, signed zeros included, so each output must be
// c10's bfloat16 of the channel's scale.
void expect_rounded_as_c10(const at::Tensor& y, const std::vector<float>& scale,
                           int64_t len, const char* what) {
  const auto* out = y.const_data_ptr<c10::BFloat16>();
  const int64_t C = static_cast<int64_t>(scale.size());
  int64_t wrong = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    const float s = scale[(i / len) % C];
    const uint16_t want = c10::BFloat16(s).x;
    if (out[i].x != want && ++wrong <= 5) {
      ADD_FAILURE() << what << ": float bits " << std::hex << c10::bit_cast<uint32_t>(s)
                    << " stored as " << out[i].x << ", c10 gives " << want;
    }
  }
  EXPECT_EQ(wrong, 0) << what;
}

class BFloat16Stores : public ::testing::TestWithParam<bool> {};

TEST_P(BFloat16Stores, RowsRoundAsC10) {
  const bool stream = GetParam();
  const std::vector<float> scale = hard_values();
  const std::vector<float> shift(scale.size(), -0.0f);
  const int64_t C = static_cast<int64_t>(scale.size());
  const int64_t rows = 4;
  const at::Tensor x = at::ones({rows, C}, at::kBFloat16);
  const at::Tensor y = at::empty_like(x);
  loops<c10::BFloat16>().rows_affine(x.const_data_ptr<c10::BFloat16>(),
                                     y.mutable_data_ptr<c10::BFloat16>(), rows, C, nullptr,
                                     scale.data(), shift.data(), stream);
  expect_rounded_as_c10(y, scale, /*len=*/1, "rows_affine");
}

TEST_P(BFloat16Stores, RunsRoundAsC10) {
  const bool stream = GetParam();
  const std::vector<float> scale = hard_values();
  const std::vector<float> shift(scale.size(), -0.0f);
  const int64_t C = static_cast<int64_t>(scale.size());
  // Runs of 64 values (whole vectors) and of 49 (a 7x7 plane: vectors across runs, and
  // a tail).
  for (const int64_t len : {64, 49}) {
    const at::Tensor x = at::ones({C * len}, at::kBFloat16);
    const at::Tensor y = at::empty_like(x);
    loops<c10::BFloat16>().runs_affine(x.const_data_ptr<c10::BFloat16>(),
                                       y.mutable_data_ptr<c10::BFloat16>(), /*spans=*/1,
                                       /*stride=*/C * len, /*runs=*/C, len, /*c0=*/0, C,
                                       nullptr, scale.data(), shift.data(), stream);
    expect_rounded_as_c10(y, scale, len, "runs_affine");
  }
}

INSTANTIATE_TEST_SUITE_P(Loops, BFloat16Stores, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "streaming" : "plain"; });

}  // namespace
}  // namespace torch_batchnorm::cpu
