// State shared with Python through torch.save's file format (see state_dict.h).

#include "torch_batchnorm/state_dict.h"

#include <ATen/core/Dict.h>
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <string_view>
#include <vector>

namespace torch_batchnorm {
namespace {

// Parameters then buffers, under the names Python's state_dict() gives them. Undefined
// tensors (Python's None) are left out by named_parameters()/named_buffers(), as
// state_dict() leaves out None.
std::vector<std::pair<std::string, at::Tensor>> named_state(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : module.named_parameters()) {
    out.emplace_back(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers()) {
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

std::string quoted_list(const std::vector<std::string>& keys) {
  std::ostringstream ss;
  for (size_t i = 0; i < keys.size(); ++i) {
    ss << (i ? ", " : "") << '"' << keys[i] << '"';
  }
  return ss.str();
}

// Python's normalisation modules load a state without num_batches_tracked (one saved
// before the buffer existed, or any plain dict, which carries no version) and keep their
// own count (_NormBase._load_from_state_dict): such a key is never missing.
bool may_be_absent(const std::string& name) {
  constexpr std::string_view kCount = "num_batches_tracked";
  return name.size() >= kCount.size() &&
      std::string_view(name).substr(name.size() - kCount.size()) == kCount &&
      (name.size() == kCount.size() || name[name.size() - kCount.size() - 1] == '.');
}

c10::impl::GenericDict read_dict(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "load_state_dict: cannot open '", path, "'");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  c10::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false,
                "load_state_dict: cannot read '",
                path,
                "' as a dict of tensors saved by ",
                "torch.save (",
                e.what_without_backtrace(),
                "). A file written with ",
                "torch.save(model.state_dict(), path) holds a collections.OrderedDict, which ",
                "LibTorch cannot read; save dict(model.state_dict()) instead.");
  }
  TORCH_CHECK(value.isGenericDict(),
              "load_state_dict: '",
              path,
              "' holds a ",
              value.tagKind(),
              ", not a dict of tensors");
  return value.toGenericDict();
}

}  // namespace

void load_state_dict(torch::nn::Module& module, const std::string& path, bool strict) {
  const c10::impl::GenericDict saved = read_dict(path);
  const auto targets = named_state(module);

  // Check everything first, copy afterwards: a failed load changes nothing.
  std::vector<std::string> missing;
  std::vector<std::string> errors;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  std::set<std::string> names;
  for (const auto& [name, target] : targets) {
    names.insert(name);
    const auto it = saved.find(name);
    if (it == saved.end()) {
      if (!may_be_absent(name)) {
        missing.push_back(name);
      }
      continue;
    }
    if (!it->value().isTensor()) {
      errors.push_back("While copying the parameter named \"" + name +
                       "\", expected a tensor, got " + it->value().tagKind() + ".");
      continue;
    }
    const at::Tensor& source = it->value().toTensor();
    if (source.sizes() != target.sizes()) {
      std::ostringstream ss;
      ss << "size mismatch for " << name << ": copying a param with shape " << source.sizes()
         << " from checkpoint, the shape in current model is " << target.sizes() << ".";
      errors.push_back(ss.str());
      continue;
    }
    copies.emplace_back(target, source);
  }
  std::vector<std::string> unexpected;
  for (const auto& item : saved) {
    const std::string key = item.key().isString() ? item.key().toStringRef() : "<non-string key>";
    if (names.count(key) == 0) {
      unexpected.push_back(key);
    }
  }
  std::ostringstream report;
  // Python's load_state_dict wording and order.
  if (strict && !missing.empty()) {
    report << "\n\tMissing key(s) in state_dict: " << quoted_list(missing) << ". ";
  }
  if (strict && !unexpected.empty()) {
    report << "\n\tUnexpected key(s) in state_dict: " << quoted_list(unexpected) << ". ";
  }
  for (const auto& e : errors) {
    report << "\n\t" << e;
  }
  TORCH_CHECK(
      report.tellp() == 0, "Error(s) in loading state_dict for ", module.name(), ":", report.str());

  torch::NoGradGuard no_grad;
  for (auto& [target, source] : copies) {
    target.copy_(source);
  }
}

void save_state_dict(const torch::nn::Module& module, const std::string& path) {
  c10::Dict<std::string, at::Tensor> state;
  for (const auto& [name, tensor] : named_state(module)) {
    state.insert(name, tensor.detach());
  }
  // torch::pickle_save, without the type tag it puts on containers: Python's torch.load
  // (weights_only, its default) refuses that tag, and a plain dict needs none.
  std::vector<char> pickled;
  torch::jit::Pickler pickler(
      [&](const char* data, size_t size) { pickled.insert(pickled.end(), data, data + size); },
      /*tensor_table=*/nullptr,
      /*type_renamer=*/nullptr,
      /*memoized_class_types=*/nullptr,
      /*get_tensor_id=*/nullptr,
      /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(state);
  pickler.stop();

  std::ofstream file(path, std::ios::binary);
  TORCH_CHECK(file, "save_state_dict: cannot open '", path, "' for writing");
  {
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t size) {
      file.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
      return file ? size : 0;
    });
    torch::jit::writeArchiveAndTensors(
        "data", pickled.data(), pickled.size(), pickler.tensorData(), writer);
    writer.writeEndOfFile();
  }
  TORCH_CHECK(file, "save_state_dict: writing '", path, "' failed");
}

}  // namespace torch_batchnorm
