// Autograd kernel of batch_norm_forward, in C++ so LibTorch programs train with it too.

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>
#include <torch/version.h>

#include "ops/batch_norm_check.h"
#include "ops/batch_norm_layout.h"
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

template <typename... Tensors>
bool has_forward_grad(const Tensors&... tensors) {
  return (torch::autograd::isFwGradDefined(tensors) || ...);
}

// The tangent of a tensor (undefined when it has none), as ATen's generated kernels read
// it: level 0 stands for the current forward-AD level.
at::Tensor tangent_of(const std::optional<at::Tensor>& t) {
  return is_defined(t) ? t->_fw_grad(/*level=*/0) : at::Tensor();
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

// A graph node written as ATen's generated nodes are: saved tensors and scalars as plain
// members, three outputs. torch::autograd::Function's generic bookkeeping (a string-keyed
// map of saved values, gradients materialised for outputs that never get one) costs more
// than the kernels on small inputs. `Derived` names itself and computes its gradients
// from its kSaved saved tensors with
//   static variable_list backward(const variable_list& grads, const Saved& saved,
//                                 bool training, double eps, Mask mask);
template <typename Derived, size_t kSaved>
struct BatchNormNode : public torch::autograd::TraceableFunction {
  using SavedVariable = torch::autograd::SavedVariable;
  using Saved = std::array<std::optional<at::Tensor>, kSaved>;
  using Mask = std::array<bool, 3>;

  variable_list apply(variable_list&& grads) override {
    // Threads may run backward through a shared graph; release_variables may run beside.
    std::lock_guard<std::mutex> lock(mutex_);
    Saved saved;
    for (size_t i = 0; i < kSaved; ++i) {
      saved[i] = unpack(saved_[i]);
    }
    return Derived::backward(grads, saved, training_, eps_, output_mask());
  }

#if TBN_COMPILED_AUTOGRAD
  // Compiled autograd (torch._dynamo.compiled_autograd) records the backward of a graph
  // whose forward ran eagerly. It asks the node for its state, then records a call of
  // apply_functional on that state: the ops involved have fake kernels, so the call
  // traces like any op.
  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable& saved : saved_) {
      args.collect(saved, /*is_output=*/false);
    }
    args.collect(training_);
    args.collect(eps_);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::autograd::SwapSavedVariables& swap) override {
    std::lock_guard<std::mutex> lock(mutex_);
    using torch::dynamo::autograd::IValuePacker;
    for (SavedVariable& saved : saved_) {
      swap.before(saved);
    }
    torch::autograd::PackedArgs packed;
    for (const SavedVariable& saved : saved_) {
      packed.pack(unpack(saved));
    }
    packed.pack(training_);
    packed.pack(eps_);
    packed.pack(output_mask());
    const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
    // The Python side keeps one namespace of bound functions per process.
    static const std::string bound = [&] {
      std::vector<at::TypePtr> schema(
          kSaved, IValuePacker<std::optional<at::Tensor>>::packed_type());
      schema.push_back(IValuePacker<bool>::packed_type());
      schema.push_back(IValuePacker<double>::packed_type());
      schema.push_back(IValuePacker<Mask>::packed_type());
      return compiler->bind_function(swap.get_py_compiler(), name(), &apply_functional, schema);
    }();
    auto result = compiler->call_function(
        swap.get_py_compiler(), "apply_functional", bound, grads, packed.vec(),
        IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            torch::dynamo::autograd::get_input_metadata(next_edges())));
    for (SavedVariable& saved : saved_) {
      swap.after(saved);
    }
    return result;
  }

  // The backward as a function of the state apply_with_saved packs, in its order.
  static variable_list apply_functional(
      const variable_list& grads, const std::vector<c10::IValue>& state) {
    torch::autograd::PackedArgs packed(state);
    Saved saved;
    for (auto& t : saved) {
      t = packed.unpack<std::optional<at::Tensor>>();
    }
    const bool training = packed.unpack<bool>();
    const double eps = packed.unpack<double>();
    const Mask mask = packed.unpack<Mask>();
    return Derived::backward(grads, saved, training, eps, mask);
  }
#endif

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& saved : saved_) {
      saved.reset_data();
    }
  }

  // An output without a valid edge (an undefined weight or bias) is never asked for.
  Mask output_mask() const {
    return {task_should_compute_output(0), task_should_compute_output(1),
            task_should_compute_output(2)};
  }

  static std::optional<at::Tensor> unpack(const SavedVariable& saved) {
    at::Tensor t = saved.unpack();
    return t.defined() ? std::optional<at::Tensor>(std::move(t)) : std::nullopt;
  }

  static SavedVariable save(const std::optional<at::Tensor>& t) {
    return SavedVariable(t.value_or(at::Tensor()), /*is_output=*/false);
  }

  std::array<SavedVariable, kSaved> saved_;
  bool training_ = false;
  double eps_ = 0.0;
};

// The backward node of batch_norm_forward. Edges 0-2 are input, weight and bias; saved_
// holds batch_norm_backward's tensor arguments after grad_out, in its order: input,
// weight, running_mean and running_var (in evaluation only, where they are constants:
// training overwrites them in place), save_mean, save_invstd.
struct BatchNormBackward : public BatchNormNode<BatchNormBackward, 6> {
  std::string name() const override {
    return "BatchNormBackward";
  }

  static variable_list backward(
      const variable_list& grads, const Saved& saved, bool training, double eps, Mask mask) {
    variable_list result(3);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2])) {
      return result;
    }
    auto grads_in = batch_norm_backward(
        grad_out, saved[0].value(), saved[1], saved[2], saved[3], saved[4], saved[5], training,
        eps, mask);
    // The op returns empty tensors for the gradients not asked for; autograd wants none.
    if (mask[0]) result[0] = std::move(std::get<0>(grads_in));
    if (mask[1]) result[1] = std::move(std::get<1>(grads_in));
    if (mask[2]) result[2] = std::move(std::get<2>(grads_in));
    return result;
  }
};

// Derivatives of the backward, and forward-mode derivatives, are written in ATen ops,
// whose own derivatives make them exact to any order and on every device. Only higher-
// order or forward-mode differentiation (gradient penalties, MAML, Hessians, jvp) runs
// them; the values of the forward and of the first backward always come from the kernels.

// The shape that broadcasts per-channel values against the input.
std::vector<int64_t> channel_shape(const at::Tensor& input) {
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = input.size(1);
  return shape;
}

// Every dim but the channels'.
std::vector<int64_t> reduced_dims(const at::Tensor& input) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d != 1) {
      dims.push_back(d);
    }
  }
  return dims;
}

// The mean of a per-element tensor over each channel, broadcastable against it.
at::Tensor channel_mean(const at::Tensor& t) {
  return t.mean(reduced_dims(t), /*keepdim=*/true);
}

// x_hat = (x - mean) * invstd of x (in float32 at least) and its invstd, broadcastable
// against it, as differentiable functions of x: in training with x's own batch
// statistics, recomputed (the saved ones would be constants to autograd), in evaluation
// with the running statistics.
std::pair<at::Tensor, at::Tensor> normalise(
    const at::Tensor& x,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double eps) {
  at::Tensor centred;
  at::Tensor invstd;
  if (training) {
    centred = x - channel_mean(x);
    invstd = (channel_mean(centred.square()) + eps).rsqrt();
  } else {
    const auto shape = channel_shape(x);
    centred = x - running_mean->to(x.scalar_type()).view(shape);
    invstd = (running_var->to(x.scalar_type()) + eps).rsqrt().view(shape);
  }
  return {centred * invstd, invstd};
}

// In training, x_hat = (x - mean) * invstd with the batch's own statistics, which absorb
// a change of x along the constant and along x_hat itself: a change dx moves x_hat by
// invstd * batch_free(dx), and a gradient g of x_hat reaches x as invstd * batch_free(g).
at::Tensor batch_free(const at::Tensor& v, const at::Tensor& x_hat) {
  return v - channel_mean(v) - x_hat * channel_mean(v * x_hat);
}

// batch_norm_backward in differentiable ATen ops, in float32 at least, with the same
// validation, dtypes and layouts as the kernels: what runs when tangents flow into it
// (forward mode over reverse). save_mean and save_invstd are the input's own statistics
// (batch_norm_forward's), recomputed here.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_composite(
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
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto shape = channel_shape(input);
  const at::Tensor x = input.to(acc);
  const at::Tensor dy = grad_out.to(acc);
  const auto [x_hat, invstd] = normalise(x, running_mean, running_var, training, eps);
  const at::Tensor scale = is_defined(weight) ? invstd * weight->to(acc).view(shape) : invstd;
  const at::Tensor grad_input = (training ? batch_free(dy, x_hat) : dy) * scale;
  const auto dims = reduced_dims(input);
  const auto params = input.options().dtype(
      param_dtype(input, is_mixed_type(input, {&weight, &running_mean, &running_var})));
  return {mask[0] ? with_standard_strides(grad_input.to(input.scalar_type()),
                                          grad_input_format(input, grad_out))
                  : at::empty({0}, input.options()),
          mask[1] ? (dy * x_hat).sum(dims).to(params) : at::empty({0}, params),
          mask[2] ? dy.sum(dims).to(params) : at::empty({0}, params)};
}

// The tangent of batch_norm_forward's output, from the primal values and the tangents of
// input, weight and bias (forward-mode AD). Differentiable itself, for derivatives of
// higher order taken around it (jacrev or jacfwd of jacfwd).
at::Tensor batch_norm_forward_tangent(
    const at::Tensor& input,
    const at::Tensor& input_t,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& weight_t,
    const at::Tensor& bias_t,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double eps,
    at::ScalarType dtype) {
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto shape = channel_shape(input);
  const auto [x_hat, invstd] = normalise(input.to(acc), running_mean, running_var, training, eps);
  at::Tensor tangent = at::zeros_like(x_hat);
  if (input_t.defined()) {
    const at::Tensor dx = input_t.to(acc);
    tangent = (training ? batch_free(dx, x_hat) : dx) * invstd;
    if (is_defined(weight)) {
      tangent = tangent * weight->to(acc).view(shape);
    }
  }
  if (weight_t.defined()) {
    tangent = tangent + x_hat * weight_t.to(acc).view(shape);
  }
  if (bias_t.defined()) {
    tangent = tangent + bias_t.to(acc).view(shape);
  }
  return tangent.to(dtype);
}

// The derivatives of batch_norm_backward's outputs (grad_input, grad_weight, grad_bias)
// with respect to its inputs grad_out, input and weight, given the gradients `grads` of
// those outputs (the second derivatives of batch_norm), in differentiable ATen ops. With
// P(v) = batch_free(v, x_hat), r = invstd, g = grad_out, and the outputs' gradients
// (a, alpha, beta), training gives
//   grad_out: w r P(a) + alpha x_hat + beta
//   weight:   r sum(a P(g))
//   input:    r (alpha P(g) - w r (mean(a P(g)) x_hat + mean(g x_hat) P(a) + mean(a x_hat) P(g)))
// and evaluation the same with P the identity and no input term but r alpha g.
variable_list batch_norm_double_backward(
    const variable_list& grads,
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double eps,
    std::array<bool, 3> mask) {
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto shape = channel_shape(input);
  const auto per_channel = [&](const at::Tensor& t) { return t.to(acc).view(shape); };
  const at::Tensor g = grad_out.to(acc);
  const auto [x_hat, invstd] = normalise(input.to(acc), running_mean, running_var, training, eps);
  const auto P = [&](const at::Tensor& v) { return training ? batch_free(v, x_hat) : v; };
  const at::Tensor w = is_defined(weight) ? per_channel(*weight) : at::ones_like(invstd);
  at::Tensor d_grad_out = at::zeros_like(g);
  at::Tensor d_input = at::zeros_like(g);
  at::Tensor d_weight = at::zeros_like(invstd);
  const at::Tensor P_g = P(g);
  if (grads[0].defined()) {
    const at::Tensor a = grads[0].to(acc);
    const at::Tensor P_a = P(a);
    d_grad_out = d_grad_out + w * invstd * P_a;
    // invstd inside the sum: an empty batch has none (NaN), and sums to zero.
    d_weight = d_weight + (a * P_g * invstd).sum(reduced_dims(input), /*keepdim=*/true);
    if (training) {
      d_input = d_input - w * invstd.square() *
              (channel_mean(a * P_g) * x_hat + channel_mean(g * x_hat) * P_a +
               channel_mean(a * x_hat) * P_g);
    }
  }
  if (grads[1].defined()) {
    const at::Tensor alpha = per_channel(grads[1]);
    d_grad_out = d_grad_out + alpha * x_hat;
    d_input = d_input + alpha * invstd * P_g;
  }
  if (grads[2].defined()) {
    d_grad_out = d_grad_out + per_channel(grads[2]);
  }
  variable_list result(3);
  if (mask[0]) result[0] = d_grad_out.to(grad_out.scalar_type());
  if (mask[1]) result[1] = d_input.to(input.scalar_type());
  if (mask[2] && is_defined(weight)) result[2] = d_weight.view(-1).to(weight->scalar_type());
  return result;
}

// The node of batch_norm_backward, whose outputs a second differentiation through
// batch_norm reaches (create_graph=True, then backward again; torch.func's reverse mode
// records it every time). Edges 0-2 are grad_out, input and weight; saved_ holds them,
// then running_mean and running_var (in evaluation only).
struct BatchNormBackwardBackward : public BatchNormNode<BatchNormBackwardBackward, 5> {
  std::string name() const override {
    return "BatchNormBackwardBackward";
  }

  static variable_list backward(
      const variable_list& grads, const Saved& saved, bool training, double eps, Mask mask) {
    return batch_norm_double_backward(
        grads, saved[0].value(), saved[1].value(), saved[2], saved[3], saved[4], training, eps,
        mask);
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
  // The statistics are batch_norm_forward's outputs and its running statistics, which
  // take no gradient.
  torch::autograd::check_no_requires_grad(running_mean, "running_mean", "batch_norm_backward");
  torch::autograd::check_no_requires_grad(running_var, "running_var", "batch_norm_backward");
  torch::autograd::check_no_requires_grad(save_mean, "save_mean", "batch_norm_backward");
  torch::autograd::check_no_requires_grad(save_invstd, "save_invstd", "batch_norm_backward");
  if (has_forward_grad(grad_out, input, weight, running_mean, running_var)) {
    return batch_norm_backward_composite(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training,
        eps, output_mask);
  }
  decltype(make_node<BatchNormBackwardBackward>()) grad_fn;
  if (records_graph(grad_out, input, weight)) {
    using Node = BatchNormBackwardBackward;
    grad_fn = make_node<Node>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(grad_out, input, weight));
    grad_fn->saved_ = {Node::save(grad_out), Node::save(input), Node::save(weight),
                       Node::save(training ? std::nullopt : running_mean),
                       Node::save(training ? std::nullopt : running_var)};
    grad_fn->training_ = training;
    grad_fn->eps_ = eps;
  }
  auto grads = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_backward(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training,
        eps, output_mask);
  }();
  if (grad_fn) {
    // Only the gradients asked for are differentiable; the empty ones stay plain.
    const auto& [grad_input, grad_weight, grad_bias] = grads;
    variable_list outputs = {output_mask[0] ? grad_input : at::Tensor(),
                             output_mask[1] ? grad_weight : at::Tensor(),
                             output_mask[2] ? grad_bias : at::Tensor()};
    torch::autograd::set_history(outputs, grad_fn);
  }
  return grads;
}

// The weight the backward node saves. Without a weight, a float32 bias of a float16 or
// bfloat16 input makes torch's kernels run in mixed precision, and its gradient a float32
// sum; batch_norm_backward, which takes no bias, learns of mixed precision from the weight
// and the running statistics alone, and would round that sum to the input's dtype. A
// weight of ones in the bias's dtype tells it, and leaves every other gradient as it is.
std::optional<at::Tensor> backward_weight(const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias) {
  if (is_defined(weight) || !is_defined(bias) || bias->scalar_type() == input.scalar_type()) {
    return weight;
  }
  return at::ones({bias->numel()}, bias->options());
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
  // A tangent of the output would need the running statistics' in evaluation, where the
  // output depends on them; torch refuses those rather than ignore them.
  const bool forward_ad = has_forward_grad(input, weight, bias);
  TORCH_CHECK(training || !forward_ad || !has_forward_grad(running_mean, running_var),
              "batch_norm is not differentiable wrt running_mean and running_var, they cannot "
              "have forward grad defined");
  using Node = BatchNormBackward;
  decltype(make_node<Node>()) grad_fn;
  if (records_graph(input, weight, bias)) {
    grad_fn = make_node<Node>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    // The arguments are saved before the kernel runs: one that cannot be saved (an
    // inference tensor) fails the call before the running statistics are updated.
    grad_fn->saved_[0] = Node::save(input);
    grad_fn->saved_[1] = Node::save(backward_weight(input, weight, bias));
    grad_fn->saved_[2] = Node::save(training ? std::nullopt : running_mean);
    grad_fn->saved_[3] = Node::save(training ? std::nullopt : running_var);
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
    grad_fn->saved_[4] = Node::save(save_mean);
    grad_fn->saved_[5] = Node::save(save_invstd);
    grad_fn->training_ = training;
    grad_fn->eps_ = eps;
    // Only the output is differentiable; the statistics stay plain tensors.
    torch::autograd::set_history(out, grad_fn);
  }
  if (forward_ad) {
    // The tangent is computed from primal values only: a tangent must not carry one of
    // its own at the same level.
    const auto primal = [](const std::optional<at::Tensor>& t) {
      return is_defined(t) ? std::optional<at::Tensor>(t->_fw_primal(/*level=*/0)) : std::nullopt;
    };
    at::Tensor& out = std::get<0>(outs);
    out._set_fw_grad(
        batch_norm_forward_tangent(
            input._fw_primal(/*level=*/0), input._fw_grad(/*level=*/0), primal(weight),
            tangent_of(weight), tangent_of(bias), primal(running_mean), primal(running_var),
            training, eps, out.scalar_type()),
        /*level=*/0, /*is_inplace_op=*/false);
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_batchnorm, Autograd, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace torch_batchnorm
