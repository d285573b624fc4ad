// The inner loops of the CPU kernels, written once with GCC/Clang vector extensions.
//
// batch_norm_loops.cpp includes this file several times, each time inside a namespace of
// its own compiled for one instruction set (AVX-512, AVX2+FMA, baseline x86-64), with
// TBN_VEC_BYTES set to that set's vector width, TBN_HAVE_AVX512 and TBN_HAVE_AVX2 to 0
// or 1, and TBN_HAVE_AVX512_BF16 to 1 in a fourth copy, built for bfloat16 only, whose
// stores round with the AVX-512 BF16 conversion.
// Hence no include guard, and no includes:
// the includer brings in every header first (<immintrin.h> too, for the few conversions
// written with intrinsics), so that no inline function of a shared header is ever
// compiled for an instruction set the machine may lack.
//
// Every loop visits its elements in an order fixed by the shapes alone (vector lanes,
// unrolled accumulators, then a scalar tail), so results never depend on the thread
// count. Accumulation is in acc_t (float for float, bfloat16 and half; double for double)
// over cache-sized groups, and in double across groups.

// NOLINTBEGIN(cppcoreguidelines-*, readability-*)

#define TBN_INLINE inline __attribute__((always_inline))
// On a reduction over span_vectors: every call inlined, the lambdas too, so that its
// accumulators stay in registers.
#define TBN_FLATTEN __attribute__((flatten))

typedef uint32_t U32x __attribute__((vector_size(TBN_VEC_BYTES)));
typedef uint16_t U16x __attribute__((vector_size(TBN_VEC_BYTES / 2)));

// kBytes-wide vectors of T (GCC/Clang vector extensions).
template <typename T, int64_t kBytes = TBN_VEC_BYTES>
struct Vec {
  static constexpr int64_t kLanes = kBytes / static_cast<int64_t>(sizeof(T));
  typedef T type __attribute__((vector_size(kBytes)));
};

// Whether vectors of kBytes have x86 intrinsics here (conversions from and to 16-bit
// floats, streaming stores): 256 bits with AVX2 and F16C, 512 bits with AVX-512.
template <int64_t kBytes>
constexpr bool kIntrinsicWidth =
    TBN_HAVE_AVX2 && (kBytes == 32 || (TBN_HAVE_AVX512 && kBytes == 64));

// Loads Vec<acc_t, kBytes>::kLanes values of scalar_t as acc_t.
template <typename acc_t, int64_t kBytes = TBN_VEC_BYTES, typename scalar_t>
TBN_INLINE typename Vec<acc_t, kBytes>::type vload(const scalar_t* p) {
  using V = typename Vec<acc_t, kBytes>::type;
  V v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, p, sizeof(V));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // bfloat16 is the upper half of a float. (GCC widens vector extensions of 16-bit
    // lanes in several steps; the intrinsics take one.)
    if constexpr (TBN_HAVE_AVX512 && kBytes == 64) {
#if TBN_HAVE_AVX512
      const __m512i w = _mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
      std::memcpy(&v, &w, sizeof(V));
#endif
    } else if constexpr (TBN_HAVE_AVX2 && kBytes == 32) {
#if TBN_HAVE_AVX2
      const __m256i w = _mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
      std::memcpy(&v, &w, sizeof(V));
#endif
    } else {
      static_assert(kBytes == TBN_VEC_BYTES, "no bfloat16 conversion for this width");
      U16x h;
      std::memcpy(&h, p, sizeof(U16x));
      const U32x w = __builtin_convertvector(h, U32x) << 16;
      std::memcpy(&v, &w, sizeof(V));
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float> &&
                       kIntrinsicWidth<kBytes>) {
    // F16C widens exactly, as c10 does: denormals, infinities and NaNs included.
    if constexpr (kBytes == 64) {
#if TBN_HAVE_AVX512
      const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      std::memcpy(&v, &f, sizeof(V));
#endif
    } else {
#if TBN_HAVE_AVX2
      const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&v, &f, sizeof(V));
#endif
    }
  } else {
    for (int64_t i = 0; i < Vec<acc_t, kBytes>::kLanes; ++i) {
      v[i] = static_cast<acc_t>(p[i]);
    }
  }
  return v;
}

// The bfloat16 bits of each float lane, in the low half of 32-bit lanes: round to
// nearest even, NaN to the canonical quiet NaN, as c10::BFloat16(float) does.
template <typename V>
TBN_INLINE auto bf16_bits(V v) {
  typedef uint32_t U32 __attribute__((vector_size(sizeof(V))));
  U32 u;
  std::memcpy(&u, &v, sizeof(U32));
  U32 r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const U32 nan = (U32)(v != v);  // all ones in NaN lanes
  return (r & ~nan) | (nan & 0x7FC0u);
}

// Those bits packed to 16-bit lanes, in a register of half the width.
#if TBN_HAVE_AVX2
template <typename U>
TBN_INLINE auto pack_bf16(U r) {
  if constexpr (sizeof(U) == 64) {
#if TBN_HAVE_AVX512
    __m512i ri;
    std::memcpy(&ri, &r, sizeof(ri));
    return _mm512_cvtepi32_epi16(ri);
#endif
  } else {
    static_assert(sizeof(U) == 32, "256 or 512 bits");
    __m256i ri;
    std::memcpy(&ri, &r, sizeof(ri));
    // Every lane is below 2^16, so the saturating pack is exact.
    return _mm_packus_epi32(_mm256_castsi256_si128(ri), _mm256_extracti128_si256(ri, 1));
  }
}

// Float lanes as bfloat16 in a register of half the width, rounded as bf16_bits does.
// With AVX-512 BF16 one instruction rounds to nearest even, as c10 does, in place of
// the eight or so of bf16_bits and pack_bf16; but it flushes float denormals to zero and
// keeps the sign and payload of a NaN, so a vector holding either (fpclass: quiet or
// signalling NaN, denormal) takes the exact path. Large bfloat16 outputs written with
// streaming stores wait on these instructions rather than on memory.
template <typename V>
TBN_INLINE auto to_bf16(V v) {
#if TBN_HAVE_AVX512_BF16
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;
  // The instruction's bfloat16 vector as the integer vector the exact path returns.
  const auto as_packed = [&v](auto h) {
    decltype(pack_bf16(bf16_bits(v))) r;
    std::memcpy(&r, &h, sizeof(r));
    return r;
  };
  if constexpr (sizeof(V) == 64) {
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    if (__builtin_expect(_mm512_fpclass_ps_mask(f, kNanOrDenormal) == 0, 1)) {
      return as_packed(_mm512_cvtneps_pbh(f));
    }
  } else {
    __m256 f;
    std::memcpy(&f, &v, sizeof(f));
    if (__builtin_expect(_mm256_fpclass_ps_mask(f, kNanOrDenormal) == 0, 1)) {
      return as_packed(_mm256_cvtneps_pbh(f));
    }
  }
#endif
  return pack_bf16(bf16_bits(v));
}

// Float lanes as float16 in a register of half the width. F16C rounds to nearest even,
// as c10 does, denormal results included; only a NaN comes out differently (F16C keeps
// its payload, c10 stores 0x7E00 with its sign), so a vector holding one is converted
// lane by lane by c10.
template <typename V>
TBN_INLINE auto to_half(V v) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const auto exact_if_nan = [&v](auto h, bool nan) {
    if (__builtin_expect(nan, 0)) {
      c10::Half lanes[sizeof(V) / sizeof(float)];
      for (size_t i = 0; i < sizeof(V) / sizeof(float); ++i) {
        lanes[i] = static_cast<c10::Half>(v[i]);
      }
      std::memcpy(&h, lanes, sizeof(h));
    }
    return h;
  };
  if constexpr (sizeof(V) == 64) {
#if TBN_HAVE_AVX512
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    return exact_if_nan(_mm512_cvtps_ph(f, kRound), _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q) != 0);
#endif
  } else {
    __m256 f;
    std::memcpy(&f, &v, sizeof(f));
    return exact_if_nan(
        _mm256_cvtps_ph(f, kRound), _mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)) != 0);
  }
}
#endif

// Stores acc_t lanes as scalar_t, rounding as c10's scalar conversions do.
template <typename scalar_t, typename V>
TBN_INLINE void vstore(scalar_t* p, V v) {
  using acc_t = std::remove_reference_t<decltype(v[0])>;
  constexpr int64_t kBytes = sizeof(V);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(p, &v, sizeof(V));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if constexpr (kIntrinsicWidth<kBytes>) {
#if TBN_HAVE_AVX2
      const auto h = to_bf16(v);
      std::memcpy(p, &h, sizeof(h));
#endif
    } else {
      static_assert(kBytes == TBN_VEC_BYTES, "no bfloat16 conversion for this width");
      const auto r = bf16_bits(v);
      U32x rx;
      std::memcpy(&rx, &r, sizeof(rx));
      const U16x h = __builtin_convertvector(rx, U16x);
      std::memcpy(p, &h, sizeof(U16x));
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float> &&
                       kIntrinsicWidth<kBytes>) {
#if TBN_HAVE_AVX2
    const auto h = to_half(v);
    std::memcpy(p, &h, sizeof(h));
#endif
  } else {
    for (int64_t i = 0; i < static_cast<int64_t>(sizeof(V) / sizeof(acc_t)); ++i) {
      p[i] = static_cast<scalar_t>(v[i]);
    }
  }
}

// Whether vstream writes scalar_t vectors of kBytes (of acc_t) with streaming stores.
template <typename scalar_t, int64_t kBytes>
constexpr bool kStreams = kIntrinsicWidth<kBytes> &&
    (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double> ||
     std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>);

// Stores like vstore, with a streaming (non-temporal) store: the line is written to
// memory without being read into the cache first, and without evicting what is there.
// `p` must be aligned to the bytes stored.
template <typename scalar_t, typename V>
TBN_INLINE void vstream(scalar_t* p, V v) {
  if constexpr (!kStreams<scalar_t, sizeof(V)>) {
    vstore(p, v);
  } else {
#if TBN_HAVE_AVX2
    const auto stream = [](void* q, auto w) {
      if constexpr (sizeof(w) == 64) {
#if TBN_HAVE_AVX512
        _mm512_stream_si512(reinterpret_cast<__m512i*>(q), w);
#endif
      } else if constexpr (sizeof(w) == 32) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(q), w);
      } else {
        _mm_stream_si128(reinterpret_cast<__m128i*>(q), w);
      }
    };
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      stream(p, to_bf16(v));
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      stream(p, to_half(v));
    } else if constexpr (sizeof(V) == 64) {
#if TBN_HAVE_AVX512
      __m512i w;
      std::memcpy(&w, &v, sizeof(w));
      stream(p, w);
#endif
    } else {
      __m256i w;
      std::memcpy(&w, &v, sizeof(w));
      stream(p, w);
    }
#endif
  }
}

// vstream when `stream` (under the same alignment requirement), else vstore.
template <typename scalar_t, typename V>
TBN_INLINE void vput(scalar_t* p, V v, bool stream) {
  if (stream) {
    vstream(p, v);
  } else {
    vstore(p, v);
  }
}

// Streaming stores are weakly ordered: one fence after the last makes them visible
// before anything the caller does next (another thread reading the output, say).
TBN_INLINE void stream_fence() {
#if TBN_HAVE_AVX2
  _mm_sfence();
#endif
}

// Sum of the lanes as a tree: the upper half of the vector added to the lower half
// until one lane is left. A short dependency chain, and a fixed order.
template <typename T, int64_t kBytes, typename V>
TBN_INLINE T hsum_tree(V v) {
  if constexpr (kBytes == 2 * static_cast<int64_t>(sizeof(T))) {
    return v[0] + v[1];
  } else {
    typedef T Half __attribute__((vector_size(kBytes / 2)));
    Half lo;
    Half hi;
    std::memcpy(&lo, &v, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return hsum_tree<T, kBytes / 2>(lo + hi);
  }
}

template <typename V>
TBN_INLINE auto hsum(V v) {
  using T = std::remove_reference_t<decltype(v[0])>;
  return hsum_tree<T, static_cast<int64_t>(sizeof(V))>(v);
}

// Lanes below `k` from a, the others from b.
template <typename V>
TBN_INLINE V select_below(int64_t k, V a, V b) {
  using T = std::remove_reference_t<decltype(a[0])>;
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  typedef I Ix __attribute__((vector_size(sizeof(V))));
  Ix lane;
  for (int64_t i = 0; i < static_cast<int64_t>(sizeof(V) / sizeof(T)); ++i) {
    lane[i] = static_cast<I>(i);
  }
  // Bitwise, as `?:` on GNU vectors needs GCC or Clang 10 and later.
  const Ix take_a = lane < static_cast<I>(k);  // all ones in the lanes taken from a
  Ix ia;
  Ix ib;
  std::memcpy(&ia, &a, sizeof(V));
  std::memcpy(&ib, &b, sizeof(V));
  const Ix r = (ia & take_a) | (ib & ~take_a);
  V v;
  std::memcpy(&v, &r, sizeof(V));
  return v;
}

// v with lanes below `from` set to zero.
template <typename V>
TBN_INLINE V zero_lanes_below(V v, int64_t from) {
  return select_below(from, V{}, v);
}

// Visits [0, len): body4(i) for 4 vectors at a time, body1(i, 0) for one vector; the last
// len % L values, when len >= L, as the vector ending at len with its first lanes
// (already visited) masked: body1(len - L, lanes_to_skip); else tail(i) for each value.
template <typename acc_t, typename Body4, typename Body1, typename Tail>
TBN_INLINE void vec_loop(int64_t len, Body4 body4, Body1 body1, Tail tail) {
  constexpr int64_t L = Vec<acc_t>::kLanes;
  int64_t i = 0;
  for (; i + 4 * L <= len; i += 4 * L) {
    body4(i);
  }
  for (; i + L <= len; i += L) {
    body1(i, int64_t{0});
  }
  if (i < len) {
    if (len >= L) {
      body1(len - L, L - (len - i));
    } else {
      for (; i < len; ++i) {
        tail(i);
      }
    }
  }
}

template <size_t k>
using Set = std::integral_constant<size_t, k>;

// Visits the values of `spans` runs of `len` values, run s at offset s * stride, for a
// reduction into four sets of vector accumulators, so that its adds do not wait on each
// other: body(set, off, skip) adds the vector at offset `off`, its first `skip` lanes
// masked (visited already), into set `set` (Set<0> to Set<3>); rotate() turns the sets
// (a, b, c, d) into (b, c, d, a); tail(off) adds the value at `off` of a run narrower
// than a vector. A run gives four vectors at a time to the four sets, and its last few
// vectors (see vec_loop) to the first set, rotated after each. Runs shorter than four
// vectors (7x7 planes) go four at a time instead, each into a set of its own: rotated
// through the sets, their few vectors each cost the rotations too ([8, 256, 7, 7] float32,
// 1 thread: backward 47-52 us rotated, 43-50 us four runs at a time; forward 43-44, 37-41).
template <typename acc_t, typename Body, typename Rotate, typename Tail>
TBN_INLINE void span_vectors(
    int64_t spans, int64_t len, int64_t stride, Body body, Rotate rotate, Tail tail) {
  constexpr int64_t L = Vec<acc_t>::kLanes;
  int64_t s = 0;
  if (len < 4 * L) {
    for (; s + 4 <= spans; s += 4) {
      const int64_t off = s * stride;
      vec_loop<acc_t>(
          len,
          [](int64_t) {},
          [&](int64_t i, int64_t skip) {
            body(Set<0>{}, off + i, skip);
            body(Set<1>{}, off + stride + i, skip);
            body(Set<2>{}, off + 2 * stride + i, skip);
            body(Set<3>{}, off + 3 * stride + i, skip);
          },
          [&](int64_t i) {
            for (int64_t r = 0; r < 4; ++r) {
              tail(off + r * stride + i);
            }
          });
    }
  }
  for (; s < spans; ++s) {
    const int64_t off = s * stride;
    vec_loop<acc_t>(
        len,
        [&](int64_t i) {
          body(Set<0>{}, off + i, int64_t{0});
          body(Set<1>{}, off + i + L, int64_t{0});
          body(Set<2>{}, off + i + 2 * L, int64_t{0});
          body(Set<3>{}, off + i + 3 * L, int64_t{0});
        },
        [&](int64_t i, int64_t skip) {
          body(Set<0>{}, off + i, skip);
          rotate();
        },
        [&](int64_t i) { tail(off + i); });
  }
}

// Four vector accumulators, the sets of span_vectors. Named members, not an array: GCC
// kept an array of them in memory, a store per add.
template <typename V>
struct Sets {
  V a{}, b{}, c{}, d{};

  template <size_t k>
  TBN_INLINE V& operator[](Set<k>) {
    if constexpr (k == 0) {
      return a;
    } else if constexpr (k == 1) {
      return b;
    } else if constexpr (k == 2) {
      return c;
    } else {
      return d;
    }
  }
  // (a, b, c, d) = (b, c, d, a): single vectors added to a, then rotated, spread over the
  // four instead of waiting on one. (Register renames, no data moves.)
  TBN_INLINE void rotate() {
    const V t = a;
    a = b;
    b = c;
    c = d;
    d = t;
  }
  // Their sum, in a fixed order.
  TBN_INLINE auto sum() const {
    return hsum((a + b) + (c + d));
  }
};

// Elementwise loops need no accumulators. Each output depends only on inputs at its own
// index and never aliases them, so a run whose length is not a multiple of the vector
// width ends with one vector overlapping the previous one (its first lanes are written
// twice, with the same values) instead of a scalar tail.
template <typename acc_t, int64_t kBytes, typename Body1, typename Tail>
TBN_INLINE void vec_map(int64_t len, Body1 body1, Tail tail) {
  constexpr int64_t L = Vec<acc_t, kBytes>::kLanes;
  int64_t i = 0;
  for (; i + 2 * L <= len; i += 2 * L) {
    body1(i);
    body1(i + L);
  }
  for (; i + L <= len; i += L) {
    body1(i);
  }
  if (i < len) {
    if (len >= L) {
      body1(len - L);
    } else {
      for (; i < len; ++i) {
        tail(i);
      }
    }
  }
}

// vec_map for an output written with streaming stores: whole cache lines are streamed,
// the partial lines at either end (shared with the neighbouring runs) written value by
// value with ordinary stores.
template <typename acc_t, int64_t kBytes, typename scalar_t, typename VecFn, typename Tail>
TBN_INLINE void stream_map(scalar_t* q, int64_t len, VecFn vec, Tail tail) {
  constexpr int64_t L = Vec<acc_t, kBytes>::kLanes;
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  static_assert(kLine % L == 0, "a cache line holds whole vectors");
  int64_t i = 0;
  for (; i < len && reinterpret_cast<uintptr_t>(q + i) % 64 != 0; ++i) {
    tail(i);
  }
  for (; i + kLine <= len; i += kLine) {
    for (int64_t j = 0; j < kLine; j += L) {
      vstream(q + i + j, vec(i + j));
    }
  }
  for (; i < len; ++i) {
    tail(i);
  }
}

// The elementwise loop over one run: stream_map when `stream`, else vec_map.
template <typename acc_t, int64_t kBytes, typename scalar_t, typename VecFn, typename Tail>
TBN_INLINE void map_run(scalar_t* q, int64_t len, bool stream, VecFn vec, Tail tail) {
  if (kStreams<scalar_t, kBytes> && stream) {
    stream_map<acc_t, kBytes>(q, len, vec, tail);
  } else {
    vec_map<acc_t, kBytes>(len, [&](int64_t i) { vstore(q + i, vec(i)); }, tail);
  }
}

// Row-blocked loops over channels-last data: body(r, kRows) handles rows r..r+kRows-1,
// four at a time when `by_four` (the last rows % 4 one at a time), else one at a time.
// Four rows share each load and store of a per-channel value: a reduction's sums, the
// coefficients of an elementwise pass. Reductions take rows of any length four at a
// time (float32 [32, 2048, 7, 7] statistics, 1 thread: 860 us one row at a time, 660 us
// four); elementwise passes where map_by_four says.
template <typename Body>
TBN_INLINE void row_blocks(int64_t rows, bool by_four, Body body) {
  int64_t r = 0;
  if (by_four) {
    for (; r + 4 <= rows; r += 4) {
      body(r, std::integral_constant<int64_t, 4>{});
    }
  }
  for (; r < rows; ++r) {
    body(r, std::integral_constant<int64_t, 1>{});
  }
}

// ---------------------------------------------------------------------------------
// Runs of one channel (contiguous NCHW): `spans` runs of `len` values, run s at
// x + s * stride. Callers keep a group small enough to stay in cache between passes.

template <typename scalar_t>
TBN_FLATTEN math::Welford<double> group_stats(const scalar_t* x,
                                              int64_t spans,
                                              int64_t len,
                                              int64_t stride) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  const int64_t count = spans * len;
  if (count == 0) {
    return {};
  }
  // Pass 1: the group mean, used as the shift. It is rounded, and pass 2 corrects it.
  Sets<V> sum;
  acc_t st = 0;
  span_vectors<acc_t>(
      spans,
      len,
      stride,
      [&](auto k, int64_t off, int64_t skip) {
        sum[k] += zero_lanes_below(vload<acc_t>(x + off), skip);
      },
      [&] { sum.rotate(); },
      [&](int64_t off) { st += static_cast<acc_t>(x[off]); });
  const acc_t shift = math::shift_from_mean((sum.sum() + st) / static_cast<acc_t>(count));
  // Pass 2: sums of (x - shift) and its square, over data now in cache.
  Sets<V> dv, qv;
  acc_t dt = 0;
  acc_t qt = 0;
  span_vectors<acc_t>(
      spans,
      len,
      stride,
      [&](auto k, int64_t off, int64_t skip) {
        const V v = zero_lanes_below(vload<acc_t>(x + off) - shift, skip);
        dv[k] += v;
        qv[k] += v * v;
      },
      [&] {
        dv.rotate();
        qv.rotate();
      },
      [&](int64_t off) {
        const acc_t v = static_cast<acc_t>(x[off]) - shift;
        dt += v;
        qt += v * v;
      });
  const acc_t d = dv.sum() + dt;
  const acc_t q = qv.sum() + qt;
  return math::welford_from_shifted_sums<double>(shift, d, q, count);
}

// The elementwise loops over spans of consecutive runs: `spans` spans of `runs` runs of
// `len` values, span s at offset s * stride, run r of channel (c0 + r) % C. One span in
// memory order serves an elementwise pass alone; a block of channels of every batch entry
// serves the fused NCHW passes. Each output is a function of the values at its offset and
// of K per-channel values coef[j][c]: vec(i, v) gives the acc_t vector at offset i, v[j]
// holding coef[j] of each lane's channel; one(i, v) the value at i, v[j] = coef[j][c].
//
// Runs whose length is not a multiple of the vector width are walked as one flat range
// per span, each vector taking the values of the one or two runs it covers (len >= L).
// Run by run, each would end with an overlapping vector: a 7 x 7 run of 49 values takes
// four 16-lane vectors (bfloat16 with AVX-512), not 49 / 16 (evaluation of [32, 512, 7, 7]
// bfloat16: 188 us run by run, 155 us flat). Streamed outputs keep the runs: streaming
// stores want whole lines.
template <typename acc_t, int64_t kBytes, size_t K, typename scalar_t, typename VecFn,
          typename OneFn>
TBN_INLINE void map_runs(
    scalar_t* out, int64_t spans, int64_t stride, int64_t runs, int64_t len, int64_t c0,
    int64_t C, const std::array<const acc_t*, K>& coef, bool stream, VecFn vec, OneFn one) {
  using V = typename Vec<acc_t, kBytes>::type;
  using Lanes = std::array<V, K>;
  constexpr int64_t L = Vec<acc_t, kBytes>::kLanes;
  const auto broadcast = [&](int64_t c) {
    Lanes v;
    for (size_t j = 0; j < K; ++j) {
      // x - 0 is x for every x; 0 + x would turn a -0 coefficient into +0, where the
      // scalar tail keeps it.
      v[j] = coef[j][c] - V{};
    }
    return v;
  };
  const auto next = [&](int64_t c) { return c + 1 == C ? int64_t{0} : c + 1; };
  // Flat unless map_run streams (which kStreams allows for some types and ISAs only).
  const bool flat = !(kStreams<scalar_t, kBytes> && stream) && len >= L && len % L != 0;
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t base = s * stride;
    if (flat) {
      // The vector at i starts in run r, of channel c, which ends at `end`. The next run's
      // values are loaded only where the span has a next run: the channel after its last
      // run may be another thread's, whose values that thread may be writing.
      const int64_t total = runs * len;
      int64_t r = 0;
      int64_t c = c0;
      int64_t end = len;
      Lanes cur = broadcast(c);
      Lanes nxt = runs > 1 ? broadcast(next(c)) : cur;
      int64_t i = 0;
      for (; i + L <= total; i += L) {
        if (i + L <= end) {
          vstore(out + base + i, vec(base + i, cur));
        } else {
          Lanes v;
          for (size_t j = 0; j < K; ++j) {
            v[j] = select_below(end - i, cur[j], nxt[j]);
          }
          vstore(out + base + i, vec(base + i, v));
        }
        if (i + L >= end) {
          ++r;
          c = next(c);
          end += len;
          cur = nxt;
          nxt = r + 1 < runs ? broadcast(next(c)) : cur;
        }
      }
      if (i < total) {
        // The vector ending the span, within its last run (len >= L).
        vstore(out + base + total - L, vec(base + total - L, cur));
      }
      continue;
    }
    int64_t c = c0;
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t off = base + r * len;
      std::array<acc_t, K> values;
      for (size_t j = 0; j < K; ++j) {
        values[j] = coef[j][c];
      }
      const Lanes v = broadcast(c);
      map_run<acc_t, kBytes>(
          out + off,
          len,
          stream,
          [&](int64_t i) { return vec(off + i, v); },
          [&](int64_t i) { out[off + i] = static_cast<scalar_t>(one(off + i, values)); });
      c = next(c);
    }
  }
  if (stream) {
    stream_fence();
  }
}

// y = (x - centre) * scale + shift over spans of runs (map_runs). A null `centre` means no
// centring (evaluation folds the mean into the shift).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void runs_affine(
    const scalar_t* x, scalar_t* y, int64_t spans, int64_t stride, int64_t runs, int64_t len,
    int64_t c0, int64_t C, const acc_t* centre, const acc_t* scale, const acc_t* shift,
    bool stream) {
  constexpr int64_t kBytes = TBN_VEC_BYTES;
  const auto load = [&](int64_t i) { return vload<acc_t, kBytes>(x + i); };
  const auto value = [&](int64_t i) { return static_cast<acc_t>(x[i]); };
  // ch: the per-channel values, in the order of the arrays passed to map_runs.
  if (centre != nullptr) {
    const auto f = [](auto v, const auto& ch) { return (v - ch[0]) * ch[1] + ch[2]; };
    map_runs<acc_t, kBytes>(
        y, spans, stride, runs, len, c0, C, std::array{centre, scale, shift}, stream,
        [&](int64_t i, const auto& ch) { return f(load(i), ch); },
        [&](int64_t i, const auto& ch) { return f(value(i), ch); });
  } else {
    const auto f = [](auto v, const auto& ch) { return v * ch[0] + ch[1]; };
    map_runs<acc_t, kBytes>(
        y, spans, stride, runs, len, c0, C, std::array{scale, shift}, stream,
        [&](int64_t i, const auto& ch) { return f(load(i), ch); },
        [&](int64_t i, const auto& ch) { return f(value(i), ch); });
  }
}

// The sums (GradSums) about `mean`, each accumulated in acc_t lanes (see group_grad_sums).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
TBN_FLATTEN GradSums lane_grad_sums(
    const scalar_t* dy, const scalar_t* x, int64_t spans, int64_t len, int64_t stride, acc_t mean) {
  using V = typename Vec<acc_t>::type;
  Sets<V> g, h, e;
  acc_t gt = 0;
  acc_t ht = 0;
  acc_t et = 0;
  span_vectors<acc_t>(
      spans,
      len,
      stride,
      [&](auto k, int64_t off, int64_t skip) {
        const V a = zero_lanes_below(vload<acc_t>(dy + off), skip);
        const V d = zero_lanes_below(vload<acc_t>(x + off) - mean, skip);
        g[k] += a;
        h[k] += a * d;
        e[k] += d;
      },
      [&] {
        g.rotate();
        h.rotate();
        e.rotate();
      },
      [&](int64_t off) {
        const acc_t a = static_cast<acc_t>(dy[off]);
        const acc_t d = static_cast<acc_t>(x[off]) - mean;
        gt += a;
        ht += a * d;
        et += d;
      });
  return {static_cast<double>(g.sum() + gt),
          static_cast<double>(h.sum() + ht),
          static_cast<double>(e.sum() + et)};
}

// Values a reduction of gradient sums takes into its acc_t lanes before it adds them to its
// double totals: 64 adds into each of its 4 * L lanes. sum(dy * (x - mean)) can be small
// next to its terms (evaluation, about a running mean the batch does not have: 1e-4 of the
// sum of their magnitudes), and each add into a lane rounds by a unit of the lane's partial
// sum, which grows with the lane's length. With whole groups (16384 values) in the lanes,
// float32 weight gradients of [64, 1, 3, 4, 16] inputs were 3.2e-7 of their size off
// float64 in the median of 40 batches with AVX-512, torch's 1.1e-7 (it sums each plane of
// 192 values alone); 64 adds a lane (4096 values), 1.5e-7 at the same speed (16 adds: 1.2e-7,
// but 3-10% slower backward passes). Counted in adds rather than values, so that narrower
// vectors keep lanes as short.
template <typename acc_t>
constexpr int64_t kGradPiece = 64 * 4 * Vec<acc_t>::kLanes;

// The sums (GradSums) about `mean`, in pieces of about kGradPiece values: whole runs, or
// parts of longer ones.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
GradSums group_grad_sums(
    const scalar_t* dy, const scalar_t* x, int64_t spans, int64_t len, int64_t stride,
    acc_t mean) {
  constexpr int64_t piece = kGradPiece<acc_t>;
  GradSums total;
  if (len >= piece) {
    for (int64_t s = 0; s < spans; ++s) {
      for (int64_t i = 0; i < len; i += piece) {
        const int64_t off = s * stride + i;
        total += lane_grad_sums(dy + off, x + off, 1, std::min(piece, len - i), stride, mean);
      }
    }
    return total;
  }
  const int64_t per_piece = (piece + len - 1) / len;
  for (int64_t s = 0; s < spans; s += per_piece) {
    const int64_t off = s * stride;
    total += lane_grad_sums(dy + off, x + off, std::min(per_piece, spans - s), len, stride, mean);
  }
  return total;
}

// dx = a * dy + b * (x - mean) + k (training), or a * dy (evaluation: x is not read) over
// spans of runs (map_runs).
template <bool kUsesInput, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void runs_grad_input(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t spans, int64_t stride,
    int64_t runs, int64_t len, int64_t c0, int64_t C, const acc_t* mean, const acc_t* a,
    const acc_t* b, const acc_t* k, bool stream) {
  constexpr int64_t kBytes = TBN_VEC_BYTES;
  const auto load = [&](const scalar_t* p, int64_t i) { return vload<acc_t, kBytes>(p + i); };
  const auto value = [&](const scalar_t* p, int64_t i) { return static_cast<acc_t>(p[i]); };
  // ch: the per-channel values, in the order of the arrays passed to map_runs.
  if constexpr (kUsesInput) {
    const auto f = [](auto g, auto v, const auto& ch) {
      return ch[0] * g + (ch[1] * (v - ch[2]) + ch[3]);
    };
    map_runs<acc_t, kBytes>(
        dx, spans, stride, runs, len, c0, C, std::array{a, b, mean, k}, stream,
        [&](int64_t i, const auto& ch) { return f(load(dy, i), load(x, i), ch); },
        [&](int64_t i, const auto& ch) { return f(value(dy, i), value(x, i), ch); });
  } else {
    map_runs<acc_t, kBytes>(
        dx, spans, stride, runs, len, c0, C, std::array{a}, stream,
        [&](int64_t i, const auto& ch) { return ch[0] * load(dy, i); },
        [&](int64_t i, const auto& ch) { return ch[0] * value(dy, i); });
  }
}

// ---------------------------------------------------------------------------------
// Rows of C channels (channels-last and 2D): per-channel arrays, vectorised along C.

// Visits channels [0, C) of one row: body(c, 0) for each whole vector of channels. The
// last C % L channels of a row at least a vector wide are the vector ending at C,
// body(C - L, skip), whose first `skip` lanes were visited already: reductions mask them,
// elementwise loops write them again with the same values. (A scalar tail costs as much
// per channel as a whole vector: channels-last [32, 24, 112, 112] float32 took 38.0 ms
// for training fwd+bwd with one, 32.2 ms with the overlapping vector.) Rows narrower than
// a vector: tail(c) per channel.
template <typename acc_t, typename Body, typename Tail>
TBN_INLINE void channel_loop(int64_t C, Body body, Tail tail) {
  constexpr int64_t L = Vec<acc_t>::kLanes;
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    body(c, int64_t{0});
  }
  if (c == C) {
    return;
  }
  if (C >= L) {
    body(C - L, L - (C - c));
    return;
  }
  for (; c < C; ++c) {
    tail(c);
  }
}

// Vectors of channels held in per-channel arrays.
template <typename V, typename T>
TBN_INLINE V aload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
TBN_INLINE void astore(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Narrow rows: channels-last data with fewer channels than a vector has lanes (an RGB
// input, a [N, 3] batch), on which the channel loops would run their scalar tail only.
// Dense rows are then taken as one flat array: the vector at flat offset i holds channels
// (i + l) % C in its lanes l, a pattern that repeats every lcm(C, L) values (the period,
// a multiple of L). Per-channel values are spread over a period of lanes, and each sum
// keeps a period of accumulator lanes, folded by channel at the end (in lane order).
template <typename acc_t>
struct NarrowRows {
  static constexpr int64_t L = Vec<acc_t>::kLanes;
  // A bound on lcm(C, L) <= C * L for C < L.
  static constexpr int64_t kMaxPeriod = L * L;
  using Lanes = std::array<acc_t, kMaxPeriod>;

  // Rows of C values, row r at + r * ld.
  static bool applies(int64_t C, int64_t ld) {
    return C < L && ld == C;
  }

  explicit NarrowRows(int64_t channels)
      : C(channels), period(channels / std::gcd(channels, L) * L) {}

  // lanes[j] = per_channel[j % C] over one period.
  void spread(const acc_t* per_channel, acc_t* lanes) const {
    for (int64_t j = 0; j < period; ++j) {
      lanes[j] = per_channel[j % C];
    }
  }

  // per_channel[c] = the sum of channel c's lanes.
  void fold(const acc_t* lanes, acc_t* per_channel) const {
    std::fill(per_channel, per_channel + C, acc_t(0));
    for (int64_t j = 0; j < period; ++j) {
      per_channel[j % C] += lanes[j];
    }
  }

  // Visits n values period by period: vec(i, j) for the vector at flat offset i, which
  // starts at lane j of the period; then tail(i, j) for each of the last n % period.
  template <typename VecFn, typename Tail>
  TBN_INLINE void visit(int64_t n, VecFn vec, Tail tail) const {
    int64_t i = 0;
    for (; i + period <= n; i += period) {
      for (int64_t j = 0; j < period; j += L) {
        vec(i + j, j);
      }
    }
    for (int64_t j = 0; i + j < n; ++j) {
      tail(i + j, j);
    }
  }

  int64_t C;
  int64_t period;
};

// rows_stats' two passes over a block of nb rows of C channels at x (row r at x + r * ld):
// the block's mean as shift[C], and the sums d[C] of x - shift and q[C] of its squares
// (zero on entry).
template <typename scalar_t, typename acc_t>
void block_stats(
    const scalar_t* x, int64_t nb, int64_t C, int64_t ld, acc_t* shift, acc_t* d, acc_t* q) {
  using V = typename Vec<acc_t>::type;
  row_blocks(nb, /*by_four=*/true, [&](int64_t r, auto rows_const) {
    constexpr int64_t R = decltype(rows_const)::value;
    const scalar_t* row = x + r * ld;
    channel_loop<acc_t>(
        C,
        [&](int64_t c, int64_t skip) {
          V s = aload<V>(shift + c);
          for (int64_t j = 0; j < R; ++j) {
            s += zero_lanes_below(vload<acc_t>(row + j * ld + c), skip);
          }
          astore(shift + c, s);
        },
        [&](int64_t c) {
          for (int64_t j = 0; j < R; ++j) {
            shift[c] += static_cast<acc_t>(row[j * ld + c]);
          }
        });
  });
  const acc_t inv_nb = acc_t(1) / static_cast<acc_t>(nb);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = math::shift_from_mean(shift[c] * inv_nb);
  }
  row_blocks(nb, /*by_four=*/true, [&](int64_t r, auto rows_const) {
    constexpr int64_t R = decltype(rows_const)::value;
    const scalar_t* row = x + r * ld;
    channel_loop<acc_t>(
        C,
        [&](int64_t c, int64_t skip) {
          const V sh = aload<V>(shift + c);
          V dv = aload<V>(d + c);
          V qv = aload<V>(q + c);
          for (int64_t j = 0; j < R; ++j) {
            const V v = zero_lanes_below(vload<acc_t>(row + j * ld + c) - sh, skip);
            dv += v;
            qv += v * v;
          }
          astore(d + c, dv);
          astore(q + c, qv);
        },
        [&](int64_t c) {
          for (int64_t j = 0; j < R; ++j) {
            const acc_t v = static_cast<acc_t>(row[j * ld + c]) - shift[c];
            d[c] += v;
            q[c] += v * v;
          }
        });
  });
}

// block_stats over a block of nb dense narrow rows at x.
template <typename scalar_t, typename acc_t>
void narrow_block_stats(
    const NarrowRows<acc_t>& nr, const scalar_t* x, int64_t nb, acc_t* shift, acc_t* d,
    acc_t* q) {
  using V = typename Vec<acc_t>::type;
  const int64_t n = nb * nr.C;
  alignas(64) typename NarrowRows<acc_t>::Lanes a{};
  nr.visit(
      n, [&](int64_t i, int64_t j) { astore(&a[j], aload<V>(&a[j]) + vload<acc_t>(x + i)); },
      [&](int64_t i, int64_t j) { a[j] += static_cast<acc_t>(x[i]); });
  nr.fold(a.data(), shift);
  const acc_t inv_nb = acc_t(1) / static_cast<acc_t>(nb);
  for (int64_t c = 0; c < nr.C; ++c) {
    shift[c] = math::shift_from_mean(shift[c] * inv_nb);
  }
  alignas(64) typename NarrowRows<acc_t>::Lanes sh;
  alignas(64) typename NarrowRows<acc_t>::Lanes b{};
  nr.spread(shift, sh.data());
  a.fill(acc_t(0));
  nr.visit(
      n,
      [&](int64_t i, int64_t j) {
        const V v = vload<acc_t>(x + i) - aload<V>(&sh[j]);
        astore(&a[j], aload<V>(&a[j]) + v);
        astore(&b[j], aload<V>(&b[j]) + v * v);
      },
      [&](int64_t i, int64_t j) {
        const acc_t v = static_cast<acc_t>(x[i]) - sh[j];
        a[j] += v;
        b[j] += v * v;
      });
  nr.fold(a.data(), d);
  nr.fold(b.data(), q);
}

// Calls body(r0, nb, first) on the blocks of rows_per_block rows of `rows` (at least one)
// in order: block [r0, r0 + nb), `first` a std::bool_constant, true for the block at row 0.
// The row reductions' first block starts their per-channel totals instead of adding to
// them, so that their callers need not zero arrays of C doubles: with few rows and many
// channels those arrays are larger than the input (float32 [2, 16384]: 393 KB of sums for a
// backward that reads 256 KB).
template <typename Body>
TBN_INLINE void for_each_row_block(int64_t rows, int64_t rows_per_block, Body body) {
  body(int64_t{0}, std::min(rows_per_block, rows), std::true_type{});
  for (int64_t r0 = rows_per_block; r0 < rows; r0 += rows_per_block) {
    body(r0, std::min(rows_per_block, rows - r0), std::false_type{});
  }
}

// Statistics (mean, m2; overwritten) of C channels over `rows` rows (at least one), row r
// at x + r * ld, block by block: each block of rows_per_block rows is taken in two passes
// while it is in cache (its mean as the shift, then the shifted sums), then merged (Chan
// et al.; every channel has the same count, so the merge needs no division per channel).
// `scratch`: 3 * C acc_t.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void rows_stats(
    const scalar_t* x, int64_t rows, int64_t C, int64_t ld, int64_t rows_per_block,
    double* mean, double* m2, acc_t* scratch) {
  acc_t* shift = scratch;
  acc_t* d = scratch + C;
  acc_t* q = scratch + 2 * C;
  const bool narrow = NarrowRows<acc_t>::applies(C, ld);
  for_each_row_block(rows, rows_per_block, [&](int64_t r0, int64_t nb, auto first) {
    const scalar_t* xb = x + r0 * ld;
    std::fill(scratch, scratch + 3 * C, acc_t(0));
    if (narrow) {
      narrow_block_stats(NarrowRows<acc_t>(C), xb, nb, shift, d, q);
    } else {
      block_stats(xb, nb, C, ld, shift, d, q);
    }
    // Merge the block (mean_b = shift + d / nb, m2_b = q - d^2 / nb) into the total.
    const int64_t n_a = r0;
    const int64_t n = n_a + nb;
    const double frac = static_cast<double>(nb) / static_cast<double>(n);
    const double weight = static_cast<double>(n_a) * frac;
    const double inv_nb_d = 1.0 / static_cast<double>(nb);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double dc = static_cast<double>(d[c]);
      const double corr = dc * inv_nb_d;
      double m2_b = static_cast<double>(q[c]) - dc * corr;
      m2_b = m2_b < 0 ? 0 : m2_b;
      const double mean_b = static_cast<double>(shift[c]) + corr;
      if constexpr (decltype(first)::value) {
        mean[c] = mean_b;
        m2[c] = m2_b;
      } else {
        const double delta = mean_b - mean[c];
        mean[c] = math::merged_mean(mean[c], mean_b, frac);
        m2[c] += m2_b + math::merge_m2_term(delta, weight);
      }
    }
  });
}

// Elementwise loops take short rows (below 128 bytes) four at a time, and long rows too
// where the `arrays` per-channel coefficient arrays they read (C acc_t each) add up to
// L1's size or more: four rows at a time then load each coefficient from L2 once instead
// of four times. (1 thread, one row at a time / four: float32 [256, 4096] training
// forward, three arrays of 16 KiB, 744-759 / 706-722 us, backward, four, 1003-1036 /
// 930-974 us; bfloat16 [64, 16384] evaluation, two of 64 KiB, 278-295 / 234-240 us. Where
// they fit, four rows at a time were slower: bfloat16 [256, 4096] evaluation, two of 16
// KiB, 187-197 / 207-214 us; float32 [512, 2048] training forward, three of 8 KiB,
// 622-636 / 658-676 us.) Outputs written with streaming stores take long rows one at a
// time: four rows at a time write four output lines by halves (a bfloat16 vector is half
// a line), and partly written lines of streaming stores are flushed early. (bfloat16
// channels-last [32, 512, 28, 28] evaluation, 1 thread: 0.74x -> 1.21x torch's speed
// one row at a time.)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
constexpr bool map_by_four(int64_t C, int64_t arrays, bool streams) {
  constexpr int64_t kL1Bytes = int64_t{48} << 10;  // the benchmark machine's L1d per core
  return C * static_cast<int64_t>(sizeof(scalar_t)) < 128 ||
      (!streams && arrays * C * static_cast<int64_t>(sizeof(acc_t)) >= kL1Bytes);
}

// Vectors stored at y + a multiple of the vector width take streaming stores when `y` is
// aligned to this many bytes.
template <typename scalar_t>
constexpr int64_t kStreamAlign = Vec<float>::kLanes * static_cast<int64_t>(sizeof(scalar_t));

// Whether rows of C values starting at y can take streaming stores: every vector of
// channels then starts on a vector boundary.
template <typename scalar_t>
bool rows_stream(const scalar_t* y, int64_t C, bool stream) {
  return stream && kStreams<scalar_t, TBN_VEC_BYTES> &&
      reinterpret_cast<uintptr_t>(y) % kStreamAlign<scalar_t> == 0 &&
      (C * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlign<scalar_t> == 0;
}

// The elementwise loop over n values of dense narrow rows: out[i] = vec(i, j) vector by
// vector, scalar(i, j) for the values past the last whole period. (Vectors start at
// multiples of the vector width from out, so an aligned out can take streaming stores.)
template <typename acc_t, typename scalar_t, typename VecFn, typename ScalarFn>
void narrow_map(
    const NarrowRows<acc_t>& nr, scalar_t* out, int64_t n, bool stream, VecFn vec,
    ScalarFn scalar) {
  const bool streams = stream && kStreams<scalar_t, TBN_VEC_BYTES> &&
      reinterpret_cast<uintptr_t>(out) % kStreamAlign<scalar_t> == 0;
  nr.visit(
      n, [&](int64_t i, int64_t j) { vput(out + i, vec(i, j), streams); },
      [&](int64_t i, int64_t j) { out[i] = static_cast<scalar_t>(scalar(i, j)); });
  if (streams) {
    stream_fence();
  }
}

// rows_affine over narrow rows. (No centre is a centre of zero: x - 0 is x.)
template <typename scalar_t, typename acc_t>
void narrow_affine(
    const NarrowRows<acc_t>& nr, const scalar_t* x, scalar_t* y, int64_t rows,
    const acc_t* centre, const acc_t* scale, const acc_t* shift, bool stream) {
  using V = typename Vec<acc_t>::type;
  alignas(64) typename NarrowRows<acc_t>::Lanes ce{};
  alignas(64) typename NarrowRows<acc_t>::Lanes sc;
  alignas(64) typename NarrowRows<acc_t>::Lanes sh;
  if (centre != nullptr) {
    nr.spread(centre, ce.data());
  }
  nr.spread(scale, sc.data());
  nr.spread(shift, sh.data());
  narrow_map(
      nr, y, rows * nr.C, stream,
      [&](int64_t i, int64_t j) {
        return (vload<acc_t>(x + i) - aload<V>(&ce[j])) * aload<V>(&sc[j]) + aload<V>(&sh[j]);
      },
      [&](int64_t i, int64_t j) { return (static_cast<acc_t>(x[i]) - ce[j]) * sc[j] + sh[j]; });
}

// rows_grad_input over narrow rows.
template <bool kUsesInput, typename scalar_t, typename acc_t>
void narrow_grad_input(
    const NarrowRows<acc_t>& nr, const scalar_t* dy, const scalar_t* x, scalar_t* dx,
    int64_t rows, const acc_t* mean, const acc_t* a, const acc_t* b, const acc_t* k,
    bool stream) {
  using V = typename Vec<acc_t>::type;
  alignas(64) typename NarrowRows<acc_t>::Lanes al;
  alignas(64) typename NarrowRows<acc_t>::Lanes bl;
  alignas(64) typename NarrowRows<acc_t>::Lanes kl;
  alignas(64) typename NarrowRows<acc_t>::Lanes ml;
  nr.spread(a, al.data());
  if constexpr (kUsesInput) {
    nr.spread(b, bl.data());
    nr.spread(k, kl.data());
    nr.spread(mean, ml.data());
  }
  narrow_map(
      nr, dx, rows * nr.C, stream,
      [&](int64_t i, int64_t j) {
        V v = aload<V>(&al[j]) * vload<acc_t>(dy + i);
        if constexpr (kUsesInput) {
          v += aload<V>(&bl[j]) * (vload<acc_t>(x + i) - aload<V>(&ml[j])) + aload<V>(&kl[j]);
        }
        return v;
      },
      [&](int64_t i, int64_t j) {
        acc_t v = al[j] * static_cast<acc_t>(dy[i]);
        if constexpr (kUsesInput) {
          v += bl[j] * (static_cast<acc_t>(x[i]) - ml[j]) + kl[j];
        }
        return v;
      });
}

// y = (x - centre[c]) * scale[c] + shift[c]; a null `centre` means no centring.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void rows_affine(
    const scalar_t* x, scalar_t* y, int64_t rows, int64_t C, const acc_t* centre,
    const acc_t* scale, const acc_t* shift, bool stream) {
  if (NarrowRows<acc_t>::applies(C, C)) {
    narrow_affine(NarrowRows<acc_t>(C), x, y, rows, centre, scale, shift, stream);
    return;
  }
  using V = typename Vec<acc_t>::type;
  const bool streams = rows_stream(y, C, stream);
  const auto put = [&](scalar_t* q, V v) { vput(q, v, streams); };
  const auto all_rows = [&](auto centred) {
    constexpr bool kCentre = decltype(centred)::value;
    const bool by_four = map_by_four<scalar_t>(C, kCentre ? 3 : 2, streams);
    row_blocks(rows, by_four, [&](int64_t r, auto rows_const) {
      constexpr int64_t R = decltype(rows_const)::value;
      const scalar_t* p = x + r * C;
      scalar_t* o = y + r * C;
      channel_loop<acc_t>(
          C,
          [&](int64_t c, int64_t /*skip: rewritten alike*/) {
            const V s = aload<V>(scale + c);
            const V b = aload<V>(shift + c);
            if constexpr (kCentre) {
              const V m = aload<V>(centre + c);
              for (int64_t j = 0; j < R; ++j) {
                put(o + j * C + c, (vload<acc_t>(p + j * C + c) - m) * s + b);
              }
            } else {
              for (int64_t j = 0; j < R; ++j) {
                put(o + j * C + c, vload<acc_t>(p + j * C + c) * s + b);
              }
            }
          },
          [&](int64_t c) {
            for (int64_t j = 0; j < R; ++j) {
              const acc_t v = static_cast<acc_t>(p[j * C + c]);
              o[j * C + c] = static_cast<scalar_t>(
                  (kCentre ? (v - centre[c]) : v) * scale[c] + shift[c]);
            }
          });
    });
  };
  if (centre != nullptr) {
    all_rows(std::true_type{});
  } else {
    all_rows(std::false_type{});
  }
  if (streams) {
    stream_fence();
  }
}

// rows_grad_sums over a block of nb rows of C channels (row r of dy and x at + r * ld):
// g[C] += sum(dy), h[C] += sum(dy * (x - mean)) and e[C] += sum(x - mean).
template <typename scalar_t, typename acc_t>
void block_grad_sums(
    const scalar_t* dy, const scalar_t* x, int64_t nb, int64_t C, int64_t ld, const acc_t* mean,
    acc_t* g, acc_t* h, acc_t* e) {
  using V = typename Vec<acc_t>::type;
  row_blocks(nb, /*by_four=*/true, [&](int64_t r, auto rows_const) {
    constexpr int64_t R = decltype(rows_const)::value;
    const scalar_t* pg = dy + r * ld;
    const scalar_t* px = x + r * ld;
    channel_loop<acc_t>(
        C,
        [&](int64_t c, int64_t skip) {
          const V m = aload<V>(mean + c);
          V gv = aload<V>(g + c);
          V hv = aload<V>(h + c);
          V ev = aload<V>(e + c);
          for (int64_t j = 0; j < R; ++j) {
            const V a = zero_lanes_below(vload<acc_t>(pg + j * ld + c), skip);
            const V d = zero_lanes_below(vload<acc_t>(px + j * ld + c) - m, skip);
            gv += a;
            hv += a * d;
            ev += d;
          }
          astore(g + c, gv);
          astore(h + c, hv);
          astore(e + c, ev);
        },
        [&](int64_t c) {
          for (int64_t j = 0; j < R; ++j) {
            const acc_t a = static_cast<acc_t>(pg[j * ld + c]);
            const acc_t d = static_cast<acc_t>(px[j * ld + c]) - mean[c];
            g[c] += a;
            h[c] += a * d;
            e[c] += d;
          }
        });
  });
}

// block_grad_sums over a block of nb dense narrow rows (g, h and e are overwritten).
template <typename scalar_t, typename acc_t>
void narrow_block_grad_sums(
    const NarrowRows<acc_t>& nr, const scalar_t* dy, const scalar_t* x, int64_t nb,
    const acc_t* mean, acc_t* g, acc_t* h, acc_t* e) {
  using V = typename Vec<acc_t>::type;
  alignas(64) typename NarrowRows<acc_t>::Lanes m;
  alignas(64) typename NarrowRows<acc_t>::Lanes gl{};
  alignas(64) typename NarrowRows<acc_t>::Lanes hl{};
  alignas(64) typename NarrowRows<acc_t>::Lanes el{};
  nr.spread(mean, m.data());
  nr.visit(
      nb * nr.C,
      [&](int64_t i, int64_t j) {
        const V a = vload<acc_t>(dy + i);
        const V d = vload<acc_t>(x + i) - aload<V>(&m[j]);
        astore(&gl[j], aload<V>(&gl[j]) + a);
        astore(&hl[j], aload<V>(&hl[j]) + a * d);
        astore(&el[j], aload<V>(&el[j]) + d);
      },
      [&](int64_t i, int64_t j) {
        const acc_t a = static_cast<acc_t>(dy[i]);
        const acc_t d = static_cast<acc_t>(x[i]) - m[j];
        gl[j] += a;
        hl[j] += a * d;
        el[j] += d;
      });
  nr.fold(gl.data(), g);
  nr.fold(hl.data(), h);
  nr.fold(el.data(), e);
}

// The sums (GradSums) about `mean` of C channels over `rows` rows (at least one; row r of
// dy and x at + r * ld) into sum_dy[C], sum_dy_xmu[C] and sum_xmu[C] (overwritten),
// accumulating blocks of rows_per_block rows in acc_t. `scratch`: 3 * C acc_t.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void rows_grad_sums(
    const scalar_t* dy, const scalar_t* x, int64_t rows, int64_t C, int64_t ld,
    int64_t rows_per_block, const acc_t* mean, double* sum_dy, double* sum_dy_xmu,
    double* sum_xmu, acc_t* scratch) {
  acc_t* g = scratch;
  acc_t* h = scratch + C;
  acc_t* e = scratch + 2 * C;
  const bool narrow = NarrowRows<acc_t>::applies(C, ld);
  for_each_row_block(rows, rows_per_block, [&](int64_t r0, int64_t nb, auto first) {
    std::fill(scratch, scratch + 3 * C, acc_t(0));
    if (narrow) {
      narrow_block_grad_sums(NarrowRows<acc_t>(C), dy + r0 * C, x + r0 * C, nb, mean, g, h, e);
    } else {
      block_grad_sums(dy + r0 * ld, x + r0 * ld, nb, C, ld, mean, g, h, e);
    }
    constexpr bool kFirst = decltype(first)::value;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] = (kFirst ? 0.0 : sum_dy[c]) + static_cast<double>(g[c]);
      sum_dy_xmu[c] = (kFirst ? 0.0 : sum_dy_xmu[c]) + static_cast<double>(h[c]);
      sum_xmu[c] = (kFirst ? 0.0 : sum_xmu[c]) + static_cast<double>(e[c]);
    }
  });
}

// dx = a[c] * dy + b[c] * (x - mean[c]) + k[c] (training), or a[c] * dy (evaluation).
template <bool kUsesInput, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void rows_grad_input(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t C,
    const acc_t* mean, const acc_t* a, const acc_t* b, const acc_t* k, bool stream) {
  if (NarrowRows<acc_t>::applies(C, C)) {
    narrow_grad_input<kUsesInput>(NarrowRows<acc_t>(C), dy, x, dx, rows, mean, a, b, k, stream);
    return;
  }
  using V = typename Vec<acc_t>::type;
  const bool streams = rows_stream(dx, C, stream);
  const auto put = [&](scalar_t* q, V v) { vput(q, v, streams); };
  const bool by_four = map_by_four<scalar_t>(C, kUsesInput ? 4 : 1, streams);
  row_blocks(rows, by_four, [&](int64_t r, auto rows_const) {
    constexpr int64_t R = decltype(rows_const)::value;
    const scalar_t* pg = dy + r * C;
    const scalar_t* px = x + r * C;
    scalar_t* o = dx + r * C;
    channel_loop<acc_t>(
        C,
        [&](int64_t c, int64_t /*skip: rewritten alike*/) {
          const V av = aload<V>(a + c);
          if constexpr (kUsesInput) {
            const V bv = aload<V>(b + c);
            const V kv = aload<V>(k + c);
            const V m = aload<V>(mean + c);
            for (int64_t j = 0; j < R; ++j) {
              const int64_t i = j * C + c;
              put(o + i, av * vload<acc_t>(pg + i) + (bv * (vload<acc_t>(px + i) - m) + kv));
            }
          } else {
            for (int64_t j = 0; j < R; ++j) {
              put(o + j * C + c, av * vload<acc_t>(pg + j * C + c));
            }
          }
        },
        [&](int64_t c) {
          for (int64_t j = 0; j < R; ++j) {
            const int64_t i = j * C + c;
            acc_t v = a[c] * static_cast<acc_t>(pg[i]);
            if constexpr (kUsesInput) {
              v += b[c] * (static_cast<acc_t>(px[i]) - mean[c]) + k[c];
            }
            o[i] = static_cast<scalar_t>(v);
          }
        });
  });
  if (streams) {
    stream_fence();
  }
}

// ---------------------------------------------------------------------------------
// Per-channel arrays

// Loops::grad_coeffs, in one loop compiled for training and for evaluation, so that
// neither tests `training` per channel (with it a run-time value, the loop once divided by
// the count for every channel, behind the branch on it). Vectorised: no branch in it (the
// math's selects, the callers' scratch arrays for gradients not asked for) and no check
// for overlap between its arrays (TBN_INDEPENDENT_ITERATIONS).
template <typename acc_t>
void grad_coeffs(const double* sum_dy,
                 const double* sum_dy_xmu,
                 const double* sum_xmu,
                 int64_t C,
                 int64_t total,
                 bool training,
                 const acc_t* invstd,
                 const acc_t* w,
                 acc_t* gw,
                 acc_t* gb,
                 acc_t* a,
                 acc_t* b,
                 acc_t* k) {
  const auto finish = [&](auto is_training) {
    constexpr bool kTraining = decltype(is_training)::value;
    TBN_INDEPENDENT_ITERATIONS
    for (int64_t c = 0; c < C; ++c) {
      // Training: about the batch mean, not save_mean's float32 rounding of it.
      const auto centred = kTraining
                               ? math::centre_grad_sums(sum_dy[c], sum_dy_xmu[c], sum_xmu[c], total)
                               : math::CentredGradSums<double>{sum_dy_xmu[c], 0.0};
      gw[c] = static_cast<acc_t>(centred.sum_dy_xmu) * invstd[c];
      gb[c] = static_cast<acc_t>(sum_dy[c]);
      const auto coeffs = math::grad_input_coeffs<acc_t>(w[c],
                                                         invstd[c],
                                                         static_cast<acc_t>(sum_dy[c]),
                                                         static_cast<acc_t>(centred.sum_dy_xmu),
                                                         total,
                                                         kTraining,
                                                         static_cast<acc_t>(centred.residual));
      a[c] = coeffs.a;
      b[c] = coeffs.b;
      k[c] = coeffs.c;
    }
  };
  if (training) {
    finish(std::true_type{});
  } else {
    finish(std::false_type{});
  }
}

template <typename scalar_t>
Loops<scalar_t> make_loops() {
  Loops<scalar_t> l;
  l.group_stats = &group_stats<scalar_t>;
  l.runs_affine = &runs_affine<scalar_t>;
  l.group_grad_sums = &group_grad_sums<scalar_t>;
  l.runs_grad_input = &runs_grad_input<true, scalar_t>;
  l.runs_grad_input_eval = &runs_grad_input<false, scalar_t>;
  l.rows_stats = &rows_stats<scalar_t>;
  l.rows_affine = &rows_affine<scalar_t>;
  l.rows_grad_sums = &rows_grad_sums<scalar_t>;
  l.rows_grad_input = &rows_grad_input<true, scalar_t>;
  l.rows_grad_input_eval = &rows_grad_input<false, scalar_t>;
  l.grad_coeffs = &grad_coeffs<at::opmath_type<scalar_t>>;
  return l;
}

#undef TBN_FLATTEN
#undef TBN_INLINE

// NOLINTEND(cppcoreguidelines-*, readability-*)
