#pragma once

// The memory layout of the ops' results and how the kernels walk their inputs. Host only,
// shared by the CPU and CUDA kernels so that both backends return the same strides.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <optional>

namespace torch_batchnorm {

// An input as the kernels walk it, in one of two shapes:
//   planes  [outer = N, C, inner = prod(spatial)], contiguous: one run per (n, c);
//   rows    [outer = N * prod(spatial), C], inner = 1: the channels of a position adjacent.
struct Layout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  bool rows;

  int64_t per_channel() const {
    return outer * inner;
  }
};

// torch's rule for the layout of the result (batch_norm_cpu, whose callers rely on it:
// code calls .view() on outputs): a contiguous input gives a contiguous result; a
// channels_last / channels_last_3d input that is not also contiguous keeps that format;
// anything else takes its suggested memory format. So a 3D [N, C, L] input with C
// innermost, or a transposed 2D one, gives a contiguous result.
//
// The memory format `t` is dense in, contiguous first; none where it is dense in none
// (the fake kernels' _dense_format).
inline std::optional<at::MemoryFormat> dense_format(const at::Tensor& t) {
  for (const auto format : {at::MemoryFormat::Contiguous,
                            at::MemoryFormat::ChannelsLast,
                            at::MemoryFormat::ChannelsLast3d}) {
    if (t.is_contiguous(format)) {
      return format;
    }
  }
  return std::nullopt;
}

// The memory format of the result by that rule. A channels-last input is asked for its
// format by name: suggest_memory_format can call one with size-1 dims contiguous
// ([1, C, 1, W] with strides (1, 1, C, C) suggests contiguous) though it is not.
inline at::MemoryFormat result_format(const at::Tensor& input) {
  return dense_format(input).value_or(input.suggest_memory_format());
}

// Returns `input` in the layout of the result, copying only where the rule above asks
// for another one, and sets how the kernels walk it. empty_result(input) allocates the
// result in the same memory order.
//
// A channels-last tensor is walked as rows, a contiguous one as planes, except where it
// has no spatial extent ([N, C], [N, C, 1, 1]): its memory is then rows of C channels.
inline at::Tensor kernel_layout(const at::Tensor& input, Layout& layout) {
  at::Tensor x = input;
  if (!dense_format(x)) {
    x = x.contiguous(result_format(x));
  }
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    spatial *= x.size(d);
  }
  layout.channels = x.size(1);
  layout.rows = !x.is_contiguous() || spatial == 1;
  layout.outer = layout.rows ? x.size(0) * spatial : x.size(0);
  layout.inner = layout.rows ? 1 : spatial;
  return x;
}

// Storage of `input`'s shape in `format`, with its standard strides; an empty input keeps
// its strides, as in the fake kernels.
inline at::Tensor empty_in_format(const at::Tensor& input, at::MemoryFormat format) {
  return at::empty_like(input, input.numel() == 0 ? at::MemoryFormat::Preserve : format);
}

// Storage for the result of `input`, in the memory layout kernel_layout walks, with the
// standard strides of the result's format as torch's result and the fake kernels have
// them. Not empty_like(x) on kernel_layout's tensor: that copies its strides, which on
// size-1 dims can be anything ([1, C, 1, 1] viewed through a permute has strides
// (1, 1, C, C), torch's result (C, 1, 1, 1)), nor its format: a copy of [N, C, 1, 1] into
// channels_last also counts as contiguous.
inline at::Tensor empty_result(const at::Tensor& input) {
  return empty_in_format(input, result_format(input));
}

// The memory format of the input gradient by torch's rule (batch_norm_backward_cpu), which
// also looks at grad_out: the result's format when input and grad_out are each dense in
// some memory format and suggest the same one, else the input's suggested format. The
// two name different memory orders only for an input that suggest_memory_format misnames
// ([1, C, 1, W] with C innermost: channels-last, suggested contiguous) where the rule
// falls back to that suggestion; elsewhere they differ at most in the strides of size-1
// dims. The backward walks the input in this format, copying it where the memory orders
// differ, and allocates the gradient with empty_in_format.
inline at::MemoryFormat grad_input_format(const at::Tensor& input, const at::Tensor& grad_out) {
  const bool same = dense_format(input) && dense_format(grad_out) &&
                    input.suggest_memory_format() == grad_out.suggest_memory_format();
  return same ? result_format(input) : input.suggest_memory_format();
}

// `t` with the standard strides of `format`, as the kernels' results have them. Only
// out-of-place and view ops (movedim, contiguous, flatten, view): they also work on
// functorch's batched tensors, where a clone into a memory format does not. contiguous()
// alone keeps a contiguous tensor's strides on size-1 dims; flattened and viewed back, it
// takes the standard ones.
inline at::Tensor with_standard_strides(const at::Tensor& t, at::MemoryFormat format) {
  if (format == at::MemoryFormat::Contiguous) {
    return t.contiguous().flatten().view(t.sizes());
  }
  const at::Tensor channels_innermost = t.movedim(1, -1).contiguous();
  return channels_innermost.flatten().view(channels_innermost.sizes()).movedim(-1, 1);
}

// Brings a second tensor of the input's shape (grad_out) into the walked layout of the
// input, copying only when its strides differ.
inline at::Tensor same_layout(const at::Tensor& t, const Layout& layout) {
  if (layout.rows) {
    // Channels innermost, in every dimension count: [N, *, C] in memory.
    return t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.contiguous();
}

}  // namespace torch_batchnorm
