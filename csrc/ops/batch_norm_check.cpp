#include "ops/batch_norm_check.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <sstream>
#include <string>

namespace torch_batchnorm {
namespace {

// Python's repr of a float, so messages read exactly as torch's Python layer prints them.
std::string python_float(double value) {
  if (std::isnan(value)) {
    return "nan";
  }
  if (std::isinf(value)) {
    return value > 0 ? "inf" : "-inf";
  }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), value);
  std::string out(buf, res.ptr);
  if (out.find_first_of(".e") == std::string::npos) {
    out += ".0";
  }
  return out;
}

std::string torch_size(at::IntArrayRef sizes) {
  std::ostringstream ss;
  ss << "torch.Size([";
  for (size_t i = 0; i < sizes.size(); ++i) {
    ss << (i ? ", " : "") << sizes[i];
  }
  ss << "])";
  return ss.str();
}

const at::Tensor* defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

void check_input_dims(const at::Tensor& input) {
  // torch reads input.size(1) first, so a 0-d or 1-d input fails there.
  const int64_t dim = input.dim();
  TORCH_CHECK_INDEX(
      dim >= 2,
      dim == 0 ? std::string("Dimension specified as 1 but tensor has no dimensions")
               : "Dimension out of range (expected to be in range of [" + std::to_string(-dim) +
              ", " + std::to_string(dim - 1) + "], but got 1)");
}

void check_per_channel(const char* name, const at::Tensor* t, int64_t channels) {
  if (t == nullptr) {
    return;
  }
  TORCH_CHECK(
      t->numel() == channels, name, " should contain ", channels, " elements not ", t->numel());
  TORCH_CHECK(t->dim() == 1, name, " should be a 1D tensor, got ", t->dim(), "D");
}

void check_dtypes(
    const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> params) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      at::isFloatingType(dtype) && dtype != at::kFloat8_e4m3fn && dtype != at::kFloat8_e5m2 &&
          dtype != at::kFloat8_e4m3fnuz && dtype != at::kFloat8_e5m2fnuz,
      "\"batch_norm\" not implemented for '", at::toString(dtype), "'");
  if (is_mixed_type(input, params)) {
    for (const auto* p : params) {
      const at::Tensor* t = defined(*p);
      TORCH_CHECK(
          t == nullptr || t->scalar_type() == at::kFloat,
          "mixed dtype (CPU): expect parameter to have scalar type of Float");
    }
    return;
  }
  for (const auto* p : params) {
    const at::Tensor* t = defined(*p);
    TORCH_CHECK(
        t == nullptr || t->scalar_type() == dtype,
        "mixed dtype (CPU): all inputs must share same datatype.");
  }
}

void check_devices(const at::Tensor& input, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others) {
    TORCH_CHECK(
        t == nullptr || t->device() == input.device(),
        "Expected all tensors to be on the same device, but found at least two devices, ",
        input.device(), " and ", t->device(), "!");
  }
}

}  // namespace

bool is_mixed_type(
    const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> params) {
  const auto dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return false;
  }
  // Like torch, the first defined parameter decides; the rest must then agree.
  for (const auto* p : params) {
    if (const at::Tensor* t = defined(*p)) {
      return t->scalar_type() == at::kFloat;
    }
  }
  return false;
}

void check_batch_norm_forward(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double eps) {
  TORCH_CHECK(input.defined(), "batch_norm: input must be defined");
  check_input_dims(input);
  if (training) {
    int64_t values_per_channel = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) {
      values_per_channel *= input.size(d);
    }
    TORCH_CHECK_VALUE(
        values_per_channel != 1,
        "Expected more than 1 value per channel when training, got input size ",
        torch_size(input.sizes()));
  }
  if (training) {
    TORCH_CHECK_VALUE(
        eps > 0.0, "batch_norm eps must be positive during training, but got ", python_float(eps));
  } else {
    TORCH_CHECK_VALUE(
        eps >= 0.0, "batch_norm eps must be non-negative, but got ", python_float(eps));
  }
  const at::Tensor* mean = defined(running_mean);
  const at::Tensor* var = defined(running_var);
  TORCH_CHECK_VALUE(
      (mean == nullptr) == (var == nullptr),
      "running_mean and running_var must either both be None or neither be None");

  const int64_t channels = num_channels(input);
  TORCH_CHECK(mean != nullptr || training, "running_mean must be defined in evaluation mode");
  check_per_channel("running_mean", mean, channels);
  TORCH_CHECK(var != nullptr || training, "running_var must be defined in evaluation mode");
  check_per_channel("running_var", var, channels);
  check_per_channel("weight", defined(weight), channels);
  check_per_channel("bias", defined(bias), channels);

  check_dtypes(input, {&weight, &bias, &running_mean, &running_var});
  check_devices(input, {defined(weight), defined(bias), mean, var});
}

void check_batch_norm_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    bool training,
    double eps) {
  TORCH_CHECK(input.defined() && grad_out.defined(), "batch_norm_backward: undefined input");
  check_input_dims(input);
  TORCH_CHECK(
      grad_out.sizes() == input.sizes(),
      "batch_norm_backward: grad_out of size ", grad_out.sizes(),
      " does not match input of size ", input.sizes());
  TORCH_CHECK(
      grad_out.scalar_type() == input.scalar_type(),
      "batch_norm_backward: grad_out has dtype ", grad_out.scalar_type(),
      " but input has dtype ", input.scalar_type());
  const int64_t channels = num_channels(input);
  const at::Tensor* mean = defined(training ? save_mean : running_mean);
  const at::Tensor* spread = defined(training ? save_invstd : running_var);
  TORCH_CHECK(
      mean != nullptr && spread != nullptr,
      training ? "batch_norm_backward: save_mean and save_invstd must be defined in training mode"
               : "batch_norm_backward: running_mean and running_var must be defined in "
                 "evaluation mode");
  check_per_channel(training ? "save_mean" : "running_mean", mean, channels);
  check_per_channel(training ? "save_invstd" : "running_var", spread, channels);
  check_per_channel("weight", defined(weight), channels);
  TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", python_float(eps));
  check_dtypes(input, {&weight, &running_mean, &running_var});
  if (training) {
    // Saved statistics are in the accumulation type: float for reduced precision.
    const auto acc = at::toOpMathType(input.scalar_type());
    TORCH_CHECK(
        mean->scalar_type() == acc && spread->scalar_type() == acc,
        "batch_norm_backward: save_mean and save_invstd must have dtype ", acc);
  }
  check_devices(input, {&grad_out, defined(weight), mean, spread});
}

}  // namespace torch_batchnorm
