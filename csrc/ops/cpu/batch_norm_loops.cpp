// Builds the inner loops of batch_norm_loops_impl.h once per x86 instruction set and
// picks one at run time.
//
// Each copy lives in a namespace of its own, compiled under `#pragma GCC target`, so the
// library itself still runs on baseline x86-64. Every header is included above the
// pragmas: an inline function of a shared header compiled with AVX-512 enabled could be
// the copy the linker keeps for the whole library.

#include "ops/cpu/batch_norm_loops.h"

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TBN_X86_CLONES 1
// GCC 12 warns inside its own AVX-512 intrinsics, whose unused lanes come from the
// self-initialised _mm512_undefined_* placeholders (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#else
#define TBN_X86_CLONES 0
#endif
// GCC knows AVX-512 BF16 from version 10.
#define TBN_X86_BF16_CLONE (TBN_X86_CLONES && __GNUC__ >= 10)

// Vector types wider than the baseline ISA pass through always-inlined helpers only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace torch_batchnorm {
namespace cpu {

#if TBN_X86_CLONES
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace avx512 {
#define TBN_VEC_BYTES 64
#define TBN_HAVE_AVX512 1
#define TBN_HAVE_AVX2 1
#define TBN_HAVE_AVX512_BF16 0
#include "ops/cpu/batch_norm_loops_impl.h"
#undef TBN_HAVE_AVX512_BF16
#undef TBN_HAVE_AVX2
#undef TBN_HAVE_AVX512
#undef TBN_VEC_BYTES
}  // namespace avx512
#pragma GCC pop_options

#if TBN_X86_BF16_CLONE
// The same with the AVX-512 BF16 conversion for bfloat16 stores (Cooper Lake, Sapphire
// Rapids, Zen 4 and later); only the bfloat16 loops are built from it.
#pragma GCC push_options
#pragma GCC target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,prefer-vector-width=512")
namespace avx512_bf16 {
#define TBN_VEC_BYTES 64
#define TBN_HAVE_AVX512 1
#define TBN_HAVE_AVX2 1
#define TBN_HAVE_AVX512_BF16 1
#include "ops/cpu/batch_norm_loops_impl.h"
#undef TBN_HAVE_AVX512_BF16
#undef TBN_HAVE_AVX2
#undef TBN_HAVE_AVX512
#undef TBN_VEC_BYTES
}  // namespace avx512_bf16
#pragma GCC pop_options
#endif  // TBN_X86_BF16_CLONE

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define TBN_VEC_BYTES 32
#define TBN_HAVE_AVX512 0
#define TBN_HAVE_AVX2 1
#define TBN_HAVE_AVX512_BF16 0
#include "ops/cpu/batch_norm_loops_impl.h"
#undef TBN_HAVE_AVX512_BF16
#undef TBN_HAVE_AVX2
#undef TBN_HAVE_AVX512
#undef TBN_VEC_BYTES
}  // namespace avx2
#pragma GCC pop_options
#endif  // TBN_X86_CLONES

namespace base {
#define TBN_VEC_BYTES 16
#define TBN_HAVE_AVX512 0
#define TBN_HAVE_AVX2 0
#define TBN_HAVE_AVX512_BF16 0
#include "ops/cpu/batch_norm_loops_impl.h"
#undef TBN_HAVE_AVX512_BF16
#undef TBN_HAVE_AVX2
#undef TBN_HAVE_AVX512
#undef TBN_VEC_BYTES
}  // namespace base

namespace {

enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

struct IsaInfo {
  Isa isa;
  const char* name;
};

// Widest first: the order in which loops() prefers them.
constexpr IsaInfo kIsas[] = {{Isa::kAvx512Bf16, "avx512_bf16"},
                             {Isa::kAvx512, "avx512"},
                             {Isa::kAvx2, "avx2"},
                             {Isa::kDefault, "default"}};

// Whether this CPU runs the copy built for `isa`.
bool cpu_runs(Isa isa) {
#if TBN_X86_CLONES
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::kAvx512Bf16:
#if TBN_X86_BF16_CLONE
      return avx512 && __builtin_cpu_supports("avx512bf16");
#else
      return false;  // (a compiler without the copy may not know the feature's name)
#endif
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    case Isa::kDefault:
      return true;
  }
  return false;
#else
  return isa == Isa::kDefault;
#endif
}

// The widest copy this CPU runs within torch's choice (which ATEN_CPU_CAPABILITY
// overrides).
Isa detect_isa() {
  const std::string torch_isa = at::get_cpu_capability();
  const Isa cap = torch_isa == "AVX512" ? Isa::kAvx512Bf16
      : torch_isa == "AVX2"             ? Isa::kAvx2
                                        : Isa::kDefault;
  for (const IsaInfo& i : kIsas) {
    if (i.isa <= cap && cpu_runs(i.isa)) {
      return i.isa;
    }
  }
  return Isa::kDefault;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

template <typename scalar_t>
Loops<scalar_t> make_loops_for(Isa isa) {
  switch (isa) {
#if TBN_X86_CLONES
    case Isa::kAvx512Bf16:
#if TBN_X86_BF16_CLONE
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        return avx512_bf16::make_loops<scalar_t>();
      }
#endif
      return avx512::make_loops<scalar_t>();
    case Isa::kAvx512:
      return avx512::make_loops<scalar_t>();
    case Isa::kAvx2:
      return avx2::make_loops<scalar_t>();
#endif
    default:
      return base::make_loops<scalar_t>();
  }
}

}  // namespace

template <typename scalar_t>
const Loops<scalar_t>& loops() {
  static const Loops<scalar_t> table = make_loops_for<scalar_t>(isa());
  return table;
}

template <typename scalar_t>
std::vector<std::pair<std::string, Loops<scalar_t>>> runnable_loops() {
  std::vector<std::pair<std::string, Loops<scalar_t>>> out;
  for (const IsaInfo& i : kIsas) {
    // Only bfloat16 has a copy of its own for AVX-512 BF16.
    const bool own_copy = i.isa != Isa::kAvx512Bf16 || std::is_same_v<scalar_t, c10::BFloat16>;
    if (own_copy && cpu_runs(i.isa)) {
      out.emplace_back(i.name, make_loops_for<scalar_t>(i.isa));
    }
  }
  return out;
}

template const Loops<float>& loops<float>();
template const Loops<double>& loops<double>();
template const Loops<c10::BFloat16>& loops<c10::BFloat16>();
template const Loops<c10::Half>& loops<c10::Half>();
template std::vector<std::pair<std::string, Loops<float>>> runnable_loops<float>();
template std::vector<std::pair<std::string, Loops<double>>> runnable_loops<double>();
template std::vector<std::pair<std::string, Loops<c10::BFloat16>>> runnable_loops<c10::BFloat16>();
template std::vector<std::pair<std::string, Loops<c10::Half>>> runnable_loops<c10::Half>();

}  // namespace cpu
}  // namespace torch_batchnorm

#pragma GCC diagnostic pop
