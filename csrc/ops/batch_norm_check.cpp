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
  // torch reads input.size(1) unchecked (out of bounds for a 0-d or 1-d input); this is
  // the error at::Tensor::size(1) raises.
  const int64_t dim = input.dim();
  TORCH_CHECK_INDEX(
      dim >= 2,
      dim == 0 ? std::string("Dimension specified as 1 but tensor has no dimensions")
               : "Dimension out of range (expected to be in range of [" + std::to_string(-dim) +
              ", " + std::to_string(dim - 1) + "], but got 1)");
}

void check_numel(const char* name, const at::Tensor* t, int64_t channels) {
  TORCH_CHECK(t == nullptr || t->numel() == channels,
              name,
              " should contain ",
              channels,
              " elements not ",
              t->numel());
}

// torch reads the running statistics through 1-D accessors, after every other check,
// and reports a wrong rank in the accessor's words.
void check_stat_rank(const at::Tensor* t) {
  TORCH_CHECK(
      t == nullptr || t->dim() == 1, "TensorAccessor expected 1 dims but tensor has ", t->dim());
}

// torch flattens a weight or bias of any shape with C elements; the kernels take them
// 1-D only, and say so.
void check_param_rank(const char* name, const at::Tensor* t) {
  TORCH_CHECK(t == nullptr || t->dim() == 1, name, " should be a 1D tensor, got ", t->dim(), "D");
}

void check_input_dtype(const at::Tensor& input) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      at::isFloatingType(dtype) && dtype != at::kFloat8_e4m3fn && dtype != at::kFloat8_e5m2 &&
          dtype != at::kFloat8_e4m3fnuz && dtype != at::kFloat8_e5m2fnuz,
      "\"batch_norm\" not implemented for '", at::toString(dtype), "'");
}

// torch's dtype rules, in its order. The first defined of (weight, bias, running_mean,
// running_var) decides: if its dtype differs from the input's, this is "mixed type" and
// every parameter must be float32 with a float16/bfloat16 input. Otherwise every
// parameter must have the input's dtype; torch checks the running statistics first in
// training (it updates them before it reads weight and bias).
void check_param_dtypes(const at::Tensor& input,
                        const at::Tensor* weight,
                        const at::Tensor* bias,
                        const at::Tensor* mean,
                        const at::Tensor* var,
                        bool training) {
  const auto dtype = input.scalar_type();
  const at::Tensor* const params[] = {weight, bias, mean, var};
  const at::Tensor* first = nullptr;
  for (const at::Tensor* p : params) {
    if (p != nullptr) {
      first = p;
      break;
    }
  }
  if (first != nullptr && first->scalar_type() != dtype) {
    for (const at::Tensor* p : params) {
      TORCH_CHECK(p == nullptr || p->scalar_type() == at::kFloat,
                  "mixed dtype (CPU): expect parameter to have scalar type of Float");
    }
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
                "mixed dtype (CPU): all inputs must share same datatype.");
    return;
  }
  const at::Tensor* const train_order[] = {mean, var, weight, bias};
  for (const at::Tensor* p : training ? train_order : params) {
    TORCH_CHECK(p == nullptr || p->scalar_type() == dtype,
                "expected scalar type ",
                dtype,
                " but found ",
                p->scalar_type());
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

// Everything check_batch_norm_forward checks after the batch size and eps, in torch's
// order; shared with the op that normalises with statistics gathered elsewhere.
void check_forward_arguments(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training) {
  check_input_dims(input);

  const int64_t channels = num_channels(input);
  const at::Tensor* mean = defined(running_mean);
  const at::Tensor* var = defined(running_var);
  TORCH_CHECK(mean != nullptr || training, "running_mean must be defined in evaluation mode");
  check_numel("running_mean", mean, channels);
  TORCH_CHECK(var != nullptr || training, "running_var must be defined in evaluation mode");
  check_numel("running_var", var, channels);
  check_numel("weight", defined(weight), channels);
  check_numel("bias", defined(bias), channels);
  TORCH_CHECK_VALUE(
      (mean == nullptr) == (var == nullptr),
      "running_mean and running_var must either both be None or neither be None");

  check_input_dtype(input);
  check_param_dtypes(input, defined(weight), defined(bias), mean, var, training);
  check_stat_rank(mean);
  check_stat_rank(var);
  check_param_rank("weight", defined(weight));
  check_param_rank("bias", defined(bias));
  check_devices(input, {defined(weight), defined(bias), mean, var});
}

// Per-channel statistics passed between the ops (save_mean, save_invstd, M2, sums) are
// 1-D, in the accumulation dtype, on the input's device.
void check_channel_stats(
    const at::Tensor& input, std::initializer_list<std::pair<const char*, const at::Tensor*>> stats) {
  const int64_t channels = num_channels(input);
  const auto acc = at::toOpMathType(input.scalar_type());
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(t != nullptr && t->defined(), name, " must be defined");
    check_numel(name, t, channels);
    check_param_rank(name, t);
    TORCH_CHECK(t->scalar_type() == acc, name, " must have dtype ", acc, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == input.device(), name, " must be on ", input.device(), ", got ",
                t->device());
  }
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input) {
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
  check_input_dtype(input);
  check_devices(input, {&grad_out});
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
  // The order is torch's, so that an input with several faults reports the same one.
  TORCH_CHECK(input.defined(), "batch_norm: input must be defined");
  if (training) {
    // torch checks this first, in Python, as size[0] * prod(size[2:]), so a 0-d input
    // fails indexing the empty size and a 1-d one of size 1 fails here.
    TORCH_CHECK_INDEX(input.dim() > 0, "tuple index out of range");
    int64_t values_per_channel = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) {
      values_per_channel *= input.size(d);
    }
    TORCH_CHECK_VALUE(
        values_per_channel != 1,
        "Expected more than 1 value per channel when training, got input size ",
        torch_size(input.sizes()));
    // Written as torch's `eps <= 0.0` test, so that NaN passes as it does there.
    TORCH_CHECK_VALUE(!(eps <= 0.0),
                      "batch_norm eps must be positive during training, but got ",
                      python_float(eps));
  } else {
    TORCH_CHECK_VALUE(
        !(eps < 0.0), "batch_norm eps must be non-negative, but got ", python_float(eps));
  }
  check_forward_arguments(input, weight, bias, running_mean, running_var, training);
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
  check_grad_out(grad_out, input);
  const int64_t channels = num_channels(input);
  const at::Tensor* mean = defined(training ? save_mean : running_mean);
  const at::Tensor* spread = defined(training ? save_invstd : running_var);
  TORCH_CHECK(
      mean != nullptr && spread != nullptr,
      training ? "batch_norm_backward: save_mean and save_invstd must be defined in training mode"
               : "batch_norm_backward: running_mean and running_var must be defined in "
                 "evaluation mode");
  const char* mean_name = training ? "save_mean" : "running_mean";
  const char* spread_name = training ? "save_invstd" : "running_var";
  check_numel(mean_name, mean, channels);
  check_numel(spread_name, spread, channels);
  check_numel("weight", defined(weight), channels);
  TORCH_CHECK_VALUE(
      !(eps < 0.0), "batch_norm eps must be non-negative, but got ", python_float(eps));
  check_param_dtypes(
      input, defined(weight), nullptr, defined(running_mean), defined(running_var), training);
  if (training) {
    // Saved statistics are in the accumulation type: float for reduced precision.
    const auto acc = at::toOpMathType(input.scalar_type());
    TORCH_CHECK(
        mean->scalar_type() == acc && spread->scalar_type() == acc,
        "batch_norm_backward: save_mean and save_invstd must have dtype ", acc);
  }
  check_param_rank(mean_name, mean);
  check_param_rank(spread_name, spread);
  check_param_rank("weight", defined(weight));
  check_devices(input, {defined(weight), mean, spread});
}

void check_batch_norm_stats(const at::Tensor& input) {
  TORCH_CHECK(input.defined(), "batch_norm_stats: input must be defined");
  check_input_dims(input);
  check_input_dtype(input);
}

void check_batch_norm_forward_with_stats(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const at::Tensor& mean,
    const at::Tensor& m2,
    int64_t count,
    double eps) {
  TORCH_CHECK(input.defined(), "batch_norm: input must be defined");
  TORCH_CHECK_VALUE(count > 1,
                    "Expected more than 1 value per channel when training, got ", count,
                    " values per channel in total");
  TORCH_CHECK_VALUE(!(eps <= 0.0),
                    "batch_norm eps must be positive during training, but got ",
                    python_float(eps));
  check_forward_arguments(input, weight, bias, running_mean, running_var, /*training=*/true);
  check_channel_stats(input, {{"mean", &mean}, {"m2", &m2}});
}

void check_batch_norm_backward_reduce(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd) {
  check_grad_out(grad_out, input);
  check_channel_stats(input, {{"mean", &mean}, {"invstd", &invstd}});
}

void check_batch_norm_backward_elemt(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    int64_t count) {
  check_grad_out(grad_out, input);
  check_channel_stats(input,
                      {{"mean", &mean},
                       {"invstd", &invstd},
                       {"sum_dy", &sum_dy},
                       {"sum_dy_xmu", &sum_dy_xmu}});
  TORCH_CHECK_VALUE(count > 0, "batch_norm_backward_elemt: count must be positive, got ", count);
  check_numel("weight", defined(weight), num_channels(input));
  check_param_rank("weight", defined(weight));
  check_param_dtypes(input, defined(weight), nullptr, nullptr, nullptr, /*training=*/true);
  check_devices(input, {defined(weight)});
}

}  // namespace torch_batchnorm
