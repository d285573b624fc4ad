#pragma once

// Helpers shared by the torch-based tests: comparisons with torch's default tolerances,
// the device parameter, and checks on thrown c10::Error.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <functional>
#include <string>
#include <vector>

#include "torch_batchnorm/ops.h"

namespace tbn_test {

// torch.testing.assert_close's default (rtol, atol) for a dtype.
struct Tolerance {
  double rtol;
  double atol;
};

inline Tolerance default_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return {1e-7, 1e-7};
    case at::kHalf:
      return {1e-3, 1e-5};
    case at::kBFloat16:
      return {1.6e-2, 1e-5};
    default:
      return {1.3e-6, 1e-5};
  }
}

// |actual - expected| <= atol + rtol * |expected| everywhere, NaNs in the same places,
// same shape and dtype; reports the worst element otherwise.
inline ::testing::AssertionResult all_close(const at::Tensor& actual,
                                            const at::Tensor& expected,
                                            Tolerance tol) {
  if (actual.defined() != expected.defined()) {
    return ::testing::AssertionFailure() << "one tensor is undefined";
  }
  if (!actual.defined()) {
    return ::testing::AssertionSuccess();
  }
  if (actual.sizes() != expected.sizes() || actual.scalar_type() != expected.scalar_type()) {
    return ::testing::AssertionFailure()
           << "got " << actual.scalar_type() << actual.sizes() << ", expected "
           << expected.scalar_type() << expected.sizes();
  }
  const at::Tensor a = actual.detach().cpu().to(at::kDouble);
  const at::Tensor e = expected.detach().cpu().to(at::kDouble);
  const at::Tensor nan_mismatch = a.isnan().ne(e.isnan());
  if (nan_mismatch.any().item<bool>()) {
    return ::testing::AssertionFailure() << "NaNs in different places";
  }
  const at::Tensor err = (a - e).abs().nan_to_num(0.0);
  const at::Tensor excess = err - (tol.atol + tol.rtol * e.abs().nan_to_num(0.0));
  if (a.numel() > 0 && excess.max().item<double>() > 0) {
    const int64_t i = excess.flatten().argmax().item<int64_t>();
    return ::testing::AssertionFailure()
           << "max excess at flat index " << i << ": got " << a.flatten()[i].item<double>()
           << ", expected " << e.flatten()[i].item<double>() << " (rtol " << tol.rtol << ", atol "
           << tol.atol << ")";
  }
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult all_close(const at::Tensor& actual, const at::Tensor& expected) {
  return all_close(actual, expected, default_tolerance(expected.scalar_type()));
}

// torch's CPU kernels round the batch statistics to the input dtype when the input and all
// parameters are half/bfloat16 (only "mixed" calls, with float parameters, keep them in
// float), which costs them up to a few percent on outputs near zero. Ours keep float
// statistics, so for such calls the reference is torch run in float64 on the same values,
// rounded to the result's dtype.
inline bool needs_float64_reference(const at::Tensor& input,
                                    std::initializer_list<at::Tensor> params) {
  const auto dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return false;
  }
  for (const at::Tensor& p : params) {
    if (p.defined() && p.scalar_type() == at::kFloat) {
      return false;
    }
  }
  return true;
}

// `t` converted to the dtype of `like` (undefined stays undefined).
inline at::Tensor as_dtype_of(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() && like.defined() ? t.to(like.scalar_type()) : t;
}

// Bitwise equality, for buffers a failed call must leave untouched.
inline ::testing::AssertionResult identical(const at::Tensor& a, const at::Tensor& b) {
  if (a.defined() != b.defined() || (a.defined() && !at::equal(a, b))) {
    return ::testing::AssertionFailure() << "tensors differ";
  }
  return ::testing::AssertionSuccess();
}

// Runs `fn`, expecting a c10::Error whose message (without backtrace) contains `needle`.
inline ::testing::AssertionResult throws_c10_error(const std::function<void()>& fn,
                                                   const std::string& needle) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos) {
      return ::testing::AssertionFailure()
             << "message \"" << msg << "\" lacks \"" << needle << "\"";
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-c10 exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "nothing was thrown";
}

// The devices this build has kernels for: CPU, and CUDA when the CUDA kernels were
// compiled in. A CUDA build on a machine without a GPU skips the CUDA cases.
inline std::vector<at::DeviceType> devices_of_this_build() {
  std::vector<at::DeviceType> devices{at::kCPU};
  if (torch_batchnorm::compiled_with_cuda()) {
    devices.push_back(at::kCUDA);
  }
  return devices;
}

// Base of the tests run once per device.
class DeviceTest : public ::testing::TestWithParam<at::DeviceType> {
 protected:
  void SetUp() override {
    if (GetParam() == at::kCUDA && !torch::cuda::is_available()) {
      GTEST_SKIP() << "no CUDA device";
    }
  }
  at::Device device() const {
    return at::Device(GetParam());
  }
};

inline std::string device_name(const ::testing::TestParamInfo<at::DeviceType>& info) {
  return info.param == at::kCUDA ? "CUDA" : "CPU";
}

}  // namespace tbn_test

#define TBN_INSTANTIATE_DEVICE_TESTS(Suite)                                          \
  INSTANTIATE_TEST_SUITE_P(Devices,                                                  \
                           Suite,                                                    \
                           ::testing::ValuesIn(::tbn_test::devices_of_this_build()), \
                           ::tbn_test::device_name)
