// Autograd kernel of batch_norm_forward, in C++ so LibTorch programs train with it too.

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>
#include <torch/version.h>

#include "torch_batchnorm/ops.h"

// Compiled autograd's interface for nodes defined outside torch (functions bound to its
// Python side, state packed as IValues), as in the releases this is built against.
#define TBN_COMPILED_AUTOGRAD \
  (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13))
#if TBN_COMPILED_AUTOGRAD
#include <torch/csrc/dynamo/compiled_autograd.h>
#endif

namespace torch_batchnorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool is_defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

bool requires_grad(const at::Tensor& t) {
  return t.defined() && t.requires_grad();
}

bool requires_grad(const std::optional<at::Tensor>& t) {
  return is_defined(t) && t->requires_grad();
}

// Whether a call must record a graph node. Most calls that need none (evaluation under
// no_grad, the backward pass itself) are small, and the node would cost more than
// the kernel.
template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// Neither op has a forward-mode derivative: refuse dual tensors (forward AD, jvp) rather
// than drop their tangents.
template <typename... Tensors>
void check_no_forward_grad(const char* op, const Tensors&... tensors) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(torch::autograd::isFwGradDefined(tensors) || ...), "Trying to use forward AD with "
      "torch_batchnorm::", op, " that does not support it because it has not been "
      "implemented yet.");
}

// A new graph node. torch 2.12 moved nodes from std::shared_ptr (released through
// deleteNode, found here by argument-dependent lookup) to c10::intrusive_ptr.
template <typename T>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>();
  } else {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  }
}

// The backward node of batch_norm_forward, written as ATen's generated nodes are: plain
// members and one differentiable output. torch::autograd::Function's generic bookkeeping
// (a string-keyed map of saved values, gradients materialised for the statistics that
// never get one) costs more than the kernels on small inputs.
struct BatchNormBackward : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    // Threads may run backward through a shared graph; release_variables may run beside.
    std::lock_guard<std::mutex> lock(mutex_);
    return backward(
        grads, input_.unpack(), unpack(weight_), unpack(running_mean_), unpack(running_var_),
        unpack(save_mean_), unpack(save_invstd_), training_, eps_, output_mask());
  }

#if TBN_COMPILED_AUTOGRAD
  // Compiled autograd (torch._dynamo.compiled_autograd) records the backward of a graph
  // whose forward ran eagerly. It asks the node for its state, then records a call of
  // apply_functional on that state: batch_norm_backward has a fake kernel, so the call
  // traces like any op.
  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* saved : saved_variables()) {
      args.collect(*saved, /*is_output=*/false);
    }
    args.collect(training_);
    args.collect(eps_);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::autograd::SwapSavedVariables& swap) override {
    std::lock_guard<std::mutex> lock(mutex_);
    using torch::dynamo::autograd::IValuePacker;
    for (SavedVariable* saved : saved_variables()) {
      swap.before(*saved);
    }
    torch::autograd::PackedArgs packed;
    for (SavedVariable* saved : saved_variables()) {
      packed.pack(unpack(*saved));
    }
    packed.pack(training_);
    packed.pack(eps_);
    packed.pack(output_mask());
    const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
    // The Python side keeps one namespace of bound functions per process.
    static const std::string bound = [&] {
      std::vector<at::TypePtr> schema(
          saved_variables().size(), IValuePacker<std::optional<at::Tensor>>::packed_type());
      schema.push_back(IValuePacker<bool>::packed_type());
      schema.push_back(IValuePacker<double>::packed_type());
      schema.push_back(IValuePacker<Mask>::packed_type());
      return compiler->bind_function(swap.get_py_compiler(), name(), &apply_functional, schema);
    }();
    auto result = compiler->call_function(
        swap.get_py_compiler(), "apply_functional", bound, grads, packed.vec(),
        IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            torch::dynamo::autograd::get_input_metadata(next_edges())));
    for (SavedVariable* saved : saved_variables()) {
      swap.after(*saved);
    }
    return result;
  }
#endif

  std::string name() const override {
    return "BatchNormBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : saved_variables()) {
      saved->reset_data();
    }
  }

  using SavedVariable = torch::autograd::SavedVariable;
  using Mask = std::array<bool, 3>;

  // Edges 0-2 are input, weight and bias; an undefined weight or bias has an invalid
  // edge, so its gradient is never asked for.
  Mask output_mask() const {
    return {task_should_compute_output(0), task_should_compute_output(1),
            task_should_compute_output(2)};
  }

  static std::optional<at::Tensor> unpack(const SavedVariable& saved) {
    at::Tensor t = saved.unpack();
    return t.defined() ? std::optional<at::Tensor>(std::move(t)) : std::nullopt;
  }

  static variable_list backward(
      const variable_list& grads, const at::Tensor& input,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& save_mean,
      const std::optional<at::Tensor>& save_invstd, bool training, double eps, Mask mask) {
    variable_list result(3);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2])) {
      return result;
    }
    auto grads_in = batch_norm_backward(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
        mask);
    // The op returns empty tensors for the gradients not asked for; autograd wants none.
    if (mask[0]) result[0] = std::move(std::get<0>(grads_in));
    if (mask[1]) result[1] = std::move(std::get<1>(grads_in));
    if (mask[2]) result[2] = std::move(std::get<2>(grads_in));
    return result;
  }

#if TBN_COMPILED_AUTOGRAD
  // The backward as a function of the state apply_with_saved packs, in its order.
  static variable_list apply_functional(
      const variable_list& grads, const std::vector<c10::IValue>& state) {
    torch::autograd::PackedArgs packed(state);
    std::array<std::optional<at::Tensor>, 6> saved;
    for (auto& t : saved) {
      t = packed.unpack<std::optional<at::Tensor>>();
    }
    const bool training = packed.unpack<bool>();
    const double eps = packed.unpack<double>();
    const Mask mask = packed.unpack<Mask>();
    return backward(
        grads, saved[0].value(), saved[1], saved[2], saved[3], saved[4], saved[5], training, eps,
        mask);
  }
#endif

  std::array<SavedVariable*, 6> saved_variables() {
    return {&input_, &weight_, &running_mean_, &running_var_, &save_mean_, &save_invstd_};
  }
  std::array<const SavedVariable*, 6> saved_variables() const {
    return {&input_, &weight_, &running_mean_, &running_var_, &save_mean_, &save_invstd_};
  }

  // In the order of batch_norm_backward's arguments.
  SavedVariable input_;
  SavedVariable weight_;
  // Evaluation differentiates through the running statistics, which training would
  // overwrite in place: they are saved only when they are constants.
  SavedVariable running_mean_;
  SavedVariable running_var_;
  SavedVariable save_mean_;
  SavedVariable save_invstd_;
  bool training_ = false;
  double eps_ = 0.0;
};

// batch_norm_backward written with differentiable ATen ops, in float32 at least: what
// its derivative is taken of. In training the statistics are the input's own, recomputed
// here because they depend on it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_composite(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double eps) {
  const int64_t channels = input.size(1);
  std::vector<int64_t> dims;  // every dim but the channels
  std::vector<int64_t> shape(input.dim(), 1);  // per-channel values, broadcast
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d != 1) {
      dims.push_back(d);
    }
  }
  shape[1] = channels;
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor x = input.to(acc);
  const at::Tensor dy = grad_out.to(acc);
  at::Tensor mean;
  at::Tensor invstd;
  if (training) {
    mean = x.mean(dims, /*keepdim=*/true);
    invstd = ((x - mean).square().mean(dims, /*keepdim=*/true) + eps).rsqrt();
  } else {
    mean = running_mean->to(acc).view(shape);
    invstd = (running_var->to(acc) + eps).rsqrt().view(shape);
  }
  const at::Tensor scale = is_defined(weight) ? invstd * weight->to(acc).view(shape) : invstd;
  const at::Tensor x_hat = (x - mean) * invstd;
  at::Tensor grad_bias = dy.sum(dims);
  at::Tensor grad_weight = (dy * x_hat).sum(dims);
  at::Tensor grad_input;
  if (training) {
    const int64_t count = channels == 0 ? 0 : input.numel() / channels;
    const double inv_count = count == 0 ? 0.0 : 1.0 / static_cast<double>(count);
    const at::Tensor mean_dy = grad_bias.view(shape) * inv_count;
    const at::Tensor mean_dy_x_hat = grad_weight.view(shape) * inv_count;
    grad_input = scale * (dy - mean_dy - x_hat * mean_dy_x_hat);
  } else {
    grad_input = dy * scale;
  }
  return {grad_input, grad_weight, grad_bias};
}

// The node of batch_norm_backward, which a second differentiation through batch_norm
// reaches (create_graph=True, then backward again: gradient penalties, MAML, Hessian-
// vector products). Its backward differentiates batch_norm_backward_composite with
// autograd: slower than a kernel of its own would be, but exact to any order and on
// every device, and only higher-order gradients pay for it.
class BatchNormBackwardFunction : public torch::autograd::Function<BatchNormBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& grad_out,
      const at::Tensor& input,
      const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var,
      const std::optional<at::Tensor>& save_mean,
      const std::optional<at::Tensor>& save_invstd,
      bool training,
      double eps,
      std::array<bool, 3> output_mask) {
    ctx->save_for_backward({grad_out, input, weight.value_or(at::Tensor()),
                            running_mean.value_or(at::Tensor()),
                            running_var.value_or(at::Tensor())});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    // Gradients that never arrive stay undefined rather than become zeros, and the
    // empty tensors returned for the outputs not asked for take none.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_weight, grad_bias] = batch_norm_backward(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training,
        eps, output_mask);
    variable_list outputs = {grad_input, grad_weight, grad_bias};
    for (size_t k = 0; k < outputs.size(); ++k) {
      if (!output_mask[k]) {
        ctx->mark_non_differentiable({outputs[k]});
      }
    }
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    // grad_out, input and weight (arguments 0-2, and edges 0-2 while weight is defined)
    // are the differentiable ones. The composite sees a fresh alias of each, so that
    // autograd::grad returns its partial derivatives (grad_out may itself depend on
    // input), while the aliases keep the result connected to the originals for
    // derivatives of higher order.
    std::array<at::Tensor, 3> args = {saved[0], saved[1], saved[2]};
    variable_list wrt;
    std::vector<size_t> wrt_index;
    const bool create_graph = at::GradMode::is_enabled();
    at::AutoGradMode enable_grad(true);
    for (size_t i = 0; i < args.size(); ++i) {
      if (ctx->needs_input_grad(i) && args[i].defined()) {
        args[i] = args[i].view_as(args[i]);
        wrt.push_back(args[i]);
        wrt_index.push_back(i);
      }
    }
    auto [grad_input, grad_weight, grad_bias] = batch_norm_backward_composite(
        args[0], args[1], optional(args[2]), optional(saved[3]), optional(saved[4]),
        ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble());
    variable_list outputs;
    variable_list grad_outputs;
    const std::array<at::Tensor*, 3> composite = {&grad_input, &grad_weight, &grad_bias};
    for (size_t k = 0; k < composite.size(); ++k) {
      if (grads[k].defined()) {
        outputs.push_back(composite[k]->to(grads[k].scalar_type()));
        grad_outputs.push_back(grads[k]);
      }
    }
    variable_list result(10);  // one per argument of forward
    if (wrt.empty() || outputs.empty()) {
      return result;
    }
    const variable_list partials = torch::autograd::grad(
        outputs, wrt, grad_outputs, /*retain_graph=*/create_graph, create_graph,
        /*allow_unused=*/true);
    for (size_t j = 0; j < wrt.size(); ++j) {
      result[wrt_index[j]] = partials[j];
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    bool training,
    double eps,
    std::array<bool, 3> output_mask) {
  check_no_forward_grad(
      "batch_norm_backward", grad_out, input, weight, running_mean, running_var, save_mean,
      save_invstd);
  if (!records_graph(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_backward(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training,
        eps, output_mask);
  }
  auto grads = BatchNormBackwardFunction::apply(
      grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
      output_mask);
  return {grads[0], grads[1], grads[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_autograd(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps) {
  // No gradient flows to the running statistics (training overwrites them in place), so
  // like torch refuse ones that ask for it rather than return none silently.
  torch::autograd::check_no_requires_grad(running_mean, "running_mean", "batch_norm_forward");
  torch::autograd::check_no_requires_grad(running_var, "running_var", "batch_norm_forward");
  check_no_forward_grad("batch_norm_forward", input, weight, bias, running_mean, running_var);
  decltype(make_node<BatchNormBackward>()) grad_fn;
  if (records_graph(input, weight, bias)) {
    grad_fn = make_node<BatchNormBackward>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  }
  auto outs = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, momentum, eps);
  }();
  // The update happened below autograd; bump the versions so that a graph that saved
  // the old running statistics for its backward notices. Inference tensors have no
  // version, and torch updates them outside inference mode as well.
  if (training) {
    for (const auto* stat : {&running_mean, &running_var}) {
      if (is_defined(*stat) && !(*stat)->is_inference()) {
        torch::autograd::increment_version(**stat);
      }
    }
  }
  if (grad_fn) {
    const auto& [out, save_mean, save_invstd] = outs;
    const auto save = [](const std::optional<at::Tensor>& t) {
      return torch::autograd::SavedVariable(t.value_or(at::Tensor()), /*is_output=*/false);
    };
    grad_fn->input_ = save(input);
    grad_fn->weight_ = save(weight);
    if (!training) {
      grad_fn->running_mean_ = save(running_mean);
      grad_fn->running_var_ = save(running_var);
    }
    grad_fn->save_mean_ = save(save_mean);
    grad_fn->save_invstd_ = save(save_invstd);
    grad_fn->training_ = training;
    grad_fn->eps_ = eps;
    // Only the output is differentiable; the statistics stay plain tensors.
    torch::autograd::set_history(out, grad_fn);
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_batchnorm, Autograd, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace torch_batchnorm
