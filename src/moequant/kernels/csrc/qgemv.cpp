// moequant CPU kernels for the uniform int-k and 4-bit LUT (NF4 / FP4) packed formats, reading the stored
// layout as it is (formats/bitpack.py: little-endian chunks, code i at bits [b*i, b*(i+1)) of its chunk).
//
//   y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] * v(q[n, k]) - z[n, g] * sum_{k in g} x[m, k])
//
// with v(q) = q and z the zero point (uniform: integer zero, 2^(b-1) midtread, (2^b-1)/2 midrise), or
// v(q) = LUT[q], z = 0 and s = the block absmax (LUT formats).
//
// Two paths, chosen by the caller by the number of rows M of x:
//   - GEMV (small M): every weight is decoded once per pass of up to 4 rows of x (one row of x: two rows
//     of W per pass) and multiplied in fp32 registers; nothing of size N x K is written.
//   - dequant + GEMM (large M): tiles of rows of W are decoded to fp32 (bit-identical to the reference
//     decode) and multiplied by BLAS into their columns of y.
// 4-bit codes have a third, opt-in path (`uniform_linear_q8`, MOEQUANT_INT4=q8): a GEMV against x quantized to
// int8 per 32 columns, with integer dot products (its own section below).
//
// The vector path decodes a "step" of U consecutive codes of a row into U/8 vectors of 8 codes (AVX2). The
// vectors hold the codes in the order the bits fall out of the bytes (4-bit: the even columns, then the
// odd ones), not in column order; instead of shuffling the codes back, x is permuted the same way once per
// call (column permutation within each step, `step_source`). The dequant kernel writes its matrix in that
// order too and the GEMM uses the permuted x. The vector path applies when every group starts on a step
// boundary (gs % U == 0, or one group per row); columns past the last whole step, and every other
// geometry, run a scalar loop over single codes in column order. The uniform GEMV converts masked, not
// shifted, bit planes (`permute_row`: x absorbs the powers of two); LUT codes are looked up with vpshufb
// (`lut_step`). Without AVX2 (the build's flags) everything runs the scalar loops.
#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// Rows of W per parallel task: at least this many weights each. at::parallel_for is header code: under
// torch's OpenMP backend it runs in parallel only when this file is compiled with -fopenmp (checked: it then
// binds to torch's own libgomp); without the flag every loop runs on the calling thread.
constexpr int64_t kGrainWeights = 1 << 15;

// ---------------------------------------------------------------------------------------------------
// geometry
// ---------------------------------------------------------------------------------------------------

int64_t packed_len(int64_t n, int64_t bits) {
  int64_t g = 1;
  for (int64_t d = 1; d <= 8; ++d)
    if (bits % d == 0 && 8 % d == 0) g = d;
  const int64_t per = 8 / g, nbytes = bits / g;
  return (n + per - 1) / per * nbytes;
}

// Codes per vector step for `bits` (0: no vector path for this width or this build).
int64_t step_codes(int64_t bits) {
#ifdef __AVX2__
  switch (bits) {
    case 2: return 32;  // 8 bytes -> 4 planes x 8 lanes
    case 3: return 64;  // 24 bytes = 8 chunks of 8 codes -> 8 planes x 8 lanes
    case 4: return 32;  // 2 x 8 bytes -> (low, high nibble) x 8 lanes each
    case 8: return 32;  // 4 x 8 bytes
    case 1: case 5: case 6: case 7: return 32;  // 4 x (8 codes in b bytes), lanes in column order
    default: return 0;
  }
#else
  (void)bits;
  return 0;
#endif
}

// Planes per sub-unit of a step (a sub-unit is what one 8-byte (3-bit: 24-byte) load covers).
int64_t step_planes(int64_t bits) {
  switch (bits) {
    case 2: return 4;
    case 3: return 8;
    case 4: return 2;
    default: return 1;
  }
}

// Column (within the step) whose code lands at position i = 8 * t + j of the decoded step.
// Uniform codes: vector t of sub-unit s = t / P, plane p = t % P, lane j holds code s * 8P + P * j + p.
// 4-bit LUT codes (`lut_step`): byte position pos = (j < 4 ? 0 : 16) + 4t + j % 4 of [low nibbles of the 16
// bytes | high nibbles], i.e. code 2 pos (pos < 16) or 2 (pos - 16) + 1.
int64_t step_source(int64_t bits, int64_t i, bool lut) {
  const int64_t t = i / 8, j = i % 8;
  if (lut) {
    const int64_t pos = (j < 4 ? 0 : 16) + 4 * t + j % 4;
    return pos < 16 ? 2 * pos : 2 * (pos - 16) + 1;
  }
  const int64_t P = step_planes(bits);
  return (t / P) * 8 * P + P * j + t % P;
}

struct Geometry {
  int64_t bits, N, K, gs, G, row_bytes, U;  // U = 0: scalar path only
  int64_t full_end;                         // columns [0, full_end) are whole vector steps
  bool lut;                                 // 4-bit LUT codes (their own step order)
};

Geometry make_geometry(int64_t bits, int64_t N, int64_t K, int64_t gs, bool lut = false) {
  Geometry g{bits, N, K, gs, (K + gs - 1) / gs, packed_len(K, bits), step_codes(bits), 0, lut};
  if (g.U && !(g.G == 1 || gs % g.U == 0)) g.U = 0;
  g.full_end = g.U ? K / g.U * g.U : 0;
  return g;
}

// x [K] (column order) -> xp [K] in the decode order of the vector path (identity outside whole steps).
//
// telescoped: the uniform GEMV does not shift codes out of their byte / word, it masks the low bits:
// c_p = v & (2^(b(p+1)) - 1) = sum_{i<=p} 2^(b i) q_i (the last plane is v itself), so
// sum_p x_p q_p = sum_p c_p (x_p / 2^(b p) - x_{p+1} / 2^(b(p+1))) with x_P = 0: one masked plane is
// converted and multiplied per 8 codes, one shift fewer than q_p = (v >> b p) & (2^b - 1). xp then holds
// those coefficients (exact power-of-two scalings, one rounding in the difference).
void permute_row(const Geometry& g, const int64_t* src, const float* x, float* xp, bool telescoped) {
  const int64_t P = step_planes(g.bits);
  float fac[9];  // 2^(-b p), p = 0 .. P (fac[P] multiplies the absent plane P)
  for (int64_t p = 0; p <= P; ++p) fac[p] = std::ldexp(1.0f, static_cast<int>(-g.bits * p));
  for (int64_t k0 = 0; k0 < g.full_end; k0 += g.U) {
    float* o = xp + k0;
    for (int64_t i = 0; i < g.U; ++i) o[i] = x[k0 + src[i]];
    if (!telescoped || P == 1) continue;
    for (int64_t sub = 0; sub < g.U / (8 * P); ++sub) {
      float* q = o + sub * 8 * P;  // planes p = 0 .. P-1 of one sub-unit, 8 lanes each
      for (int64_t p = 0; p + 1 < P; ++p)  // plane p + 1 is read before it is rewritten
        for (int64_t j = 0; j < 8; ++j) q[8 * p + j] = q[8 * p + j] * fac[p] - q[8 * (p + 1) + j] * fac[p + 1];
      for (int64_t j = 0; j < 8; ++j) q[8 * (P - 1) + j] *= fac[P - 1];
    }
  }
  std::memcpy(xp + g.full_end, x + g.full_end, sizeof(float) * (g.K - g.full_end));
}

std::vector<int64_t> step_sources(const Geometry& g) {
  std::vector<int64_t> src(std::max<int64_t>(g.U, 1));
  for (int64_t i = 0; i < g.U; ++i) src[i] = step_source(g.bits, i, g.lut);
  return src;
}

// Code i of a packed row (any width 1..8; the chunk holding code i lies inside the row).
inline uint32_t code_at(const uint8_t* row, int64_t i, int64_t bits) {
  const int64_t bit = i * bits, byte = bit >> 3;
  const int off = static_cast<int>(bit & 7);
  uint32_t w = row[byte];
  if (off + bits > 8) w |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (w >> off) & ((1u << bits) - 1u);
}

// ---------------------------------------------------------------------------------------------------
// per-row group parameters: s[g] (scale / absmax) and z[g] (zero point; unused by LUT formats)
// ---------------------------------------------------------------------------------------------------

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

void load_row_f32(const void* base, at::ScalarType dt, int64_t offset, int64_t count, float* out) {
  switch (dt) {
    case at::kFloat:
      std::memcpy(out, static_cast<const float*>(base) + offset, sizeof(float) * count);
      break;
    case at::kHalf: {
      const auto* p = static_cast<const c10::Half*>(base) + offset;
      int64_t i = 0;
#ifdef __F16C__
      for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
      for (; i < count; ++i) out[i] = to_f32(p[i]);
      break;
    }
    case at::kBFloat16: {
      const auto* p = static_cast<const c10::BFloat16*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = to_f32(p[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "moequant qgemv: unsupported scale dtype");
  }
}

// Double-quantized absmax, as codecs.lut.dq_dequantize computes it: (c - 128) * scale[i / dq] + offset,
// rounded after the product and after the sum (the volatile keeps the compiler from fusing them into one
// multiply-add, so the result is bit-identical).
void dq_absmax_row(const uint8_t* codes, const float* dscale, float offset, int64_t first, int64_t count,
                   int64_t dq_block, float* out) {
  for (int64_t b = 0; b < count; ++b) {
    const int64_t i = first + b;
    volatile float prod = (static_cast<float>(codes[i]) - 128.0f) * dscale[i / dq_block];
    out[b] = prod + offset;
  }
}

struct UniformParams {
  const void* scale;
  at::ScalarType scale_dtype;
  const uint8_t* zero;  // packed [N, zero_bytes] or nullptr (symmetric)
  int64_t zero_bytes;
  float zconst;  // symmetric grid's zero point

  // s[r, g] = scale, z[r, g] = zero point of the groups of rows n0 .. n0 + count - 1.
  void rows(const Geometry& g, int64_t n0, int64_t count, float* s, float* z) const {
    load_row_f32(scale, scale_dtype, n0 * g.G, count * g.G, s);
    for (int64_t r = 0; r < count; ++r) zeros(g, n0 + r, z + r * g.G);
  }

  void zeros(const Geometry& g, int64_t n, float* z) const {
    if (zero) {
      const uint8_t* zr = zero + n * zero_bytes;
      if (g.bits == 4) {
        for (int64_t i = 0; i < g.G / 2; ++i) {
          z[2 * i] = static_cast<float>(zr[i] & 15);
          z[2 * i + 1] = static_cast<float>(zr[i] >> 4);
        }
        if (g.G % 2) z[g.G - 1] = static_cast<float>(zr[g.G / 2] & 15);
      } else if (g.bits == 8) {
        for (int64_t i = 0; i < g.G; ++i) z[i] = static_cast<float>(zr[i]);
      } else {
        for (int64_t i = 0; i < g.G; ++i) z[i] = static_cast<float>(code_at(zr, i, g.bits));
      }
    } else {
      for (int64_t i = 0; i < g.G; ++i) z[i] = zconst;
    }
  }
};

struct LutParams {
  const void* absmax;  // [N, NB] fp16 / fp32, or nullptr (double quant)
  at::ScalarType absmax_dtype;
  const uint8_t* dq_codes;  // [N, NB]
  const float* dq_scale;    // [D]
  float dq_offset;
  int64_t dq_block;

  // s[r, g] = absmax of the blocks of rows n0 .. n0 + count - 1 (z is not used).
  void rows(const Geometry& g, int64_t n0, int64_t count, float* s, float* /*z*/) const {
    if (absmax)
      load_row_f32(absmax, absmax_dtype, n0 * g.G, count * g.G, s);
    else
      dq_absmax_row(dq_codes, dq_scale, dq_offset, n0 * g.G, count * g.G, dq_block, s);
  }
};

// ---------------------------------------------------------------------------------------------------
// scalar path (any width, any group size): column order
// ---------------------------------------------------------------------------------------------------

template <bool LUT>
inline float code_value(uint32_t c, const float* lut) {
  if constexpr (LUT)
    return lut[c];
  else
    return static_cast<float>(c);
}

// out[m] = sum_g s[g] * (sum_{k in g} x[m, k] v(q[k]) - z[g] sx[m, g]) for one row of W, rows m of x (column
// order, stride K).
template <bool LUT>
void row_dot_scalar(const Geometry& g, const uint8_t* row, const float* x, int64_t M, const float* sx,
                    const float* s, const float* z, const float* lut, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * g.K;
    float y = 0.0f;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const int64_t k0 = gi * g.gs, k1 = std::min(g.K, k0 + g.gs);
      float acc = 0.0f;
      for (int64_t k = k0; k < k1; ++k) acc += xm[k] * code_value<LUT>(code_at(row, k, g.bits), lut);
      y += LUT ? s[gi] * acc : s[gi] * (acc - z[gi] * sx[m * g.G + gi]);
    }
    out[m] = y;
  }
}

template <bool LUT>
void row_dequant_scalar(const Geometry& g, const uint8_t* row, const float* s, const float* z, const float* lut,
                        float* w) {
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t k0 = gi * g.gs, k1 = std::min(g.K, k0 + g.gs);
    for (int64_t k = k0; k < k1; ++k) {
      const uint32_t c = code_at(row, k, g.bits);
      w[k] = LUT ? lut[c] * s[gi] : (static_cast<float>(c) - z[gi]) * s[gi];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// AVX2 path
// ---------------------------------------------------------------------------------------------------
#ifdef __AVX2__

template <int I>
using Idx = std::integral_constant<int, I>;

inline __m256i load8_u8_to_i32(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// One step of BITS-bit codes, loaded into registers (`load_step`), and its planes: `plane<BITS, MASKED, t>`
// = 8 int32 lanes, t = 0 .. U/8 - 1: the codes of plane t (MASKED = false), or the telescoped planes c_t
// of `permute_row` (MASKED = true: low bits masked, no shift). Widths without a layout of their own (1, 5,
// 6, 7 bits) take 8 codes = b bytes per plane, lane i = code i (`chunk8`; nothing to telescope).
template <int BITS>
constexpr bool kGeneric = !(BITS == 2 || BITS == 3 || BITS == 4 || BITS == 8);

template <int BITS>
constexpr int kStep = BITS == 3 ? 64 : 32;  // codes per step (step_codes)

struct StepWords {
  __m256i a, b;
};

struct StepPtr {
  const uint8_t* p;  // planes are loaded one by one
};

template <int BITS>
using StepBits = std::conditional_t<BITS == 8 || kGeneric<BITS>, StepPtr, StepWords>;

// vpshufb control and shifts of `chunk8`: lane i takes bytes b i / 8 and b i / 8 + 1, shifted by b i % 8.
template <int BITS>
struct Chunk8Layout {
  alignas(32) int8_t ctrl[32];
  alignas(32) int32_t shift[8];
  constexpr Chunk8Layout() : ctrl{}, shift{} {
    for (int i = 0; i < 8; ++i) {
      ctrl[4 * i] = static_cast<int8_t>(BITS * i / 8);
      ctrl[4 * i + 1] = static_cast<int8_t>(BITS * i / 8 + 1);
      ctrl[4 * i + 2] = ctrl[4 * i + 3] = -128;  // zero
      shift[i] = BITS * i % 8;
    }
  }
};

template <int BITS>
inline constexpr Chunk8Layout<BITS> kChunk8{};

// 8 codes of BITS bits (BITS bytes at q; reads 8 bytes) -> 8 int32 lanes in column order.
template <int BITS>
inline __m256i chunk8(const uint8_t* q) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  const __m256i ctrl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kChunk8<BITS>.ctrl));
  const __m256i shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(kChunk8<BITS>.shift));
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, ctrl), shift), _mm256_set1_epi32((1 << BITS) - 1));
}

template <int BITS>
inline StepBits<BITS> load_step(const uint8_t* p) {
  if constexpr (BITS == 4) {
    return {load8_u8_to_i32(p), load8_u8_to_i32(p + 8)};  // lane j: byte j (codes 2j, 2j + 1)
  } else if constexpr (BITS == 2) {
    return {load8_u8_to_i32(p), _mm256_setzero_si256()};  // lane j: byte j (codes 4j .. 4j + 3)
  } else if constexpr (BITS == 3) {
    // 24 bytes = 8 chunks of 3 bytes; lane c gets chunk c's 24-bit word (codes 8c .. 8c + 7). Low half from
    // bytes 0..15 (chunks 0-3 = bytes 0..11), high half from bytes 8..23 (chunks 4-7 = its bytes 4..15).
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
    const __m256i shuf = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,  //
                                          4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    return {_mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), shuf), _mm256_setzero_si256()};
  } else {
    return {p};
  }
}

template <int BITS, bool MASKED, int T>
inline __m256i plane(const StepBits<BITS>& st) {
  const auto mask = [](int bits) { return _mm256_set1_epi32((1 << bits) - 1); };
  if constexpr (BITS == 8) {
    return load8_u8_to_i32(st.p + 8 * T);
  } else if constexpr (kGeneric<BITS>) {
    return chunk8<BITS>(st.p + BITS * T);
  } else {
    constexpr int P = BITS == 4 ? 2 : BITS == 2 ? 4 : 8;  // planes per loaded word
    const __m256i w = BITS == 4 && T >= 2 ? st.b : st.a;
    constexpr int p = T % P;
    if constexpr (p == P - 1) {
      return MASKED ? w : _mm256_srli_epi32(w, BITS * p);  // the top plane needs no mask
    } else if constexpr (MASKED) {
      return _mm256_and_si256(w, mask(BITS * (p + 1)));
    } else {
      return _mm256_and_si256(p ? _mm256_srli_epi32(w, BITS * p) : w, mask(BITS));
    }
  }
}

template <int BITS, bool MASKED, class F, int... T>
inline void decode_step_impl(const uint8_t* p, F&& f, std::integer_sequence<int, T...>) {
  const StepBits<BITS> st = load_step<BITS>(p);
  (f(Idx<T>{}, plane<BITS, MASKED, T>(st)), ...);
}

// One step of BITS-bit codes at p -> f(Idx<t>, plane t) for t = 0 .. U/8 - 1.
template <int BITS, bool MASKED, class F>
inline void decode_step(const uint8_t* p, F&& f) {
  decode_step_impl<BITS, MASKED>(p, f, std::make_integer_sequence<int, kStep<BITS> / 8>{});
}


// The 16 fp32 table entries as 4 byte planes (byte p of entry c at position c of both 128-bit lanes), for
// vpshufb lookups that rebuild exact fp32 bit patterns.
struct LutTables {
  __m256i b[4];
};

inline LutTables make_tables(const float* lut) {
  LutTables t;
  for (int p = 0; p < 4; ++p) {
    alignas(32) uint8_t bytes[32];
    for (int c = 0; c < 16; ++c) {
      uint32_t bits;
      std::memcpy(&bits, lut + c, 4);
      bytes[c] = bytes[16 + c] = static_cast<uint8_t>(bits >> (8 * p));
    }
    t.b[p] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes));
  }
  return t;
}

// 32 4-bit LUT codes (16 bytes) -> 4 vectors of 8 fp32 table values, in the order of `step_source(.., lut)`:
// the nibbles become byte indices [low nibbles | high nibbles], 4 vpshufb fetch the value bytes, two rounds
// of unpacks assemble them into floats.
inline void lut_step(const uint8_t* p, const LutTables& t, __m256* v) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m256i idx = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
  const __m256i b0 = _mm256_shuffle_epi8(t.b[0], idx), b1 = _mm256_shuffle_epi8(t.b[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.b[2], idx), b3 = _mm256_shuffle_epi8(t.b[3], idx);
  const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
  v[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
  v[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
  v[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  v[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

// One step at p -> f(Idx<t>, 8 fp32 multiplicands): telescoped planes (uniform GEMV) or table values (LUT).
template <int BITS, bool LUT, class F>
inline void step_vectors(const uint8_t* p, const LutTables& tab, F&& f) {
  if constexpr (LUT) {
    static_assert(BITS == 4, "LUT codes are 4-bit");
    __m256 v[4];
    lut_step(p, tab, v);
    f(Idx<0>{}, v[0]);
    f(Idx<1>{}, v[1]);
    f(Idx<2>{}, v[2]);
    f(Idx<3>{}, v[3]);
  } else {
    decode_step<BITS, true>(p, [&](auto t, __m256i q) { f(t, _mm256_cvtepi32_ps(q)); });
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MR rows of x against one row of W. xp: permuted x rows (stride K) for whole steps, xn: column order,
// sx: the rows' group sums of x [MR, G] (stride G; unused by LUT formats), s / z: the row's groups.
// out[m] = sum_g s[g] * (sum_{k in g} x[m, k] v(q[k]) - z[g] sx[m, g]).
template <int BITS, bool LUT, int MR>
inline void row_dot_vec(const Geometry& g, const uint8_t* row, const float* xp, const float* xn, const float* sx,
                        const float* s, const float* z, const LutTables& tab, const float* lut, float* out) {
  constexpr int U = kStep<BITS>;
  constexpr int SB = U / 8 * BITS;  // bytes per step
  // Independent accumulators per row of x (the FMA latency), vector t of a step into accumulator t % NA.
  // Group sums fold into `tot` with the group's scale: one row of x keeps a running total per accumulator
  // pair (no serial reduction per group); more rows sum theirs first (registers).
  constexpr int NA = MR == 1 ? 4 : 2;
  constexpr int NT = MR == 1 ? 2 : 1;
  const int64_t K = g.K, G = g.G;
  const int64_t spg = G == 1 ? g.full_end / U : g.gs / U;  // whole steps per group (the last: fewer)
  __m256 tot[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < NT; ++a) tot[m][a] = _mm256_setzero_ps();
  const uint8_t* p = row;
  const float* xq = xp;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t steps = gi + 1 < G ? spg : (xp + g.full_end - xq) / U;
    __m256 acc[MR][NA];
    for (int m = 0; m < MR; ++m) {
      // lane 0 of the first accumulator starts at -z sx: the group's scale then multiplies it with the rest
      acc[m][0] = LUT ? _mm256_setzero_ps() : _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, -z[gi] * sx[m * G + gi]);
      for (int a = 1; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < steps; ++i, p += SB, xq += U)
      step_vectors<BITS, LUT>(p, tab, [&](auto t, __m256 w) {
        constexpr int T = decltype(t)::value;
        for (int m = 0; m < MR; ++m)
          acc[m][T % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xq + m * K + 8 * T), acc[m][T % NA]);
      });
    const __m256 sv = _mm256_set1_ps(s[gi]);
    for (int m = 0; m < MR; ++m) {
      if constexpr (NT > 1) {
        for (int a = 0; a < NT; ++a)
          tot[m][a] = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[m][a], acc[m][a + NT]), tot[m][a]);
      } else {
        __m256 a = acc[m][0];
        for (int j = 1; j < NA; ++j) a = _mm256_add_ps(a, acc[m][j]);
        tot[m][0] = _mm256_fmadd_ps(sv, a, tot[m][0]);
      }
    }
  }
  float tail[MR];
  for (int m = 0; m < MR; ++m) tail[m] = 0.0f;
  for (int64_t k = g.full_end; k < K; ++k) {  // past the last whole step: inside the last group
    const float v = code_value<LUT>(code_at(row, k, BITS), lut);
    for (int m = 0; m < MR; ++m) tail[m] += xn[m * K + k] * v;
  }
  for (int m = 0; m < MR; ++m) {
    __m256 t = tot[m][0];
    for (int a = 1; a < NT; ++a) t = _mm256_add_ps(t, tot[m][a]);
    out[m] = hsum(t) + s[G - 1] * tail[m];
  }
}

template <int BITS, int NA, int... T>
inline void pair_step(const StepBits<BITS>& st_a, const StepBits<BITS>& st_b, const float* xq, __m256* acc_a,
                      __m256* acc_b, std::integer_sequence<int, T...>) {
  const auto one = [&](auto t) {
    constexpr int I = decltype(t)::value;
    const __m256 xv = _mm256_loadu_ps(xq + 8 * I);
    acc_a[I % NA] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(plane<BITS, true, I>(st_a)), xv, acc_a[I % NA]);
    acc_b[I % NA] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(plane<BITS, true, I>(st_b)), xv, acc_b[I % NA]);
  };
  (one(Idx<T>{}), ...);
}

// One row of x against two rows a, b of uniform codes (one x load feeds both, loop and group control shared):
// out[0], out[1] as row_dot_vec<BITS, false, 1> computes them.
template <int BITS>
inline void row_pair_dot_vec(const Geometry& g, const uint8_t* ra, const uint8_t* rb, const float* xp,
                             const float* xn, const float* sx, const float* sa, const float* za, const float* sb,
                             const float* zb, float* out) {
  constexpr int U = kStep<BITS>;
  constexpr int SB = U / 8 * BITS;
  constexpr int TV = U / 8;
  constexpr int NA = 4;
  const int64_t G = g.G;
  const int64_t spg = G == 1 ? g.full_end / U : g.gs / U;
  __m256 tot_a = _mm256_setzero_ps(), tot_b = _mm256_setzero_ps();
  const uint8_t* pa = ra;
  const uint8_t* pb = rb;
  const float* xq = xp;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t steps = gi + 1 < G ? spg : (xp + g.full_end - xq) / U;
    __m256 acc_a[NA], acc_b[NA];
    acc_a[0] = _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, -za[gi] * sx[gi]);  // the zero-point term (row_dot_vec)
    acc_b[0] = _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, -zb[gi] * sx[gi]);
    for (int a = 1; a < NA; ++a) acc_a[a] = acc_b[a] = _mm256_setzero_ps();
    for (int64_t i = 0; i < steps; ++i, pa += SB, pb += SB, xq += U) {
      const StepBits<BITS> st_a = load_step<BITS>(pa), st_b = load_step<BITS>(pb);
      pair_step<BITS, NA>(st_a, st_b, xq, acc_a, acc_b, std::make_integer_sequence<int, TV>{});
    }
    tot_a = _mm256_fmadd_ps(_mm256_set1_ps(sa[gi]),
                            _mm256_add_ps(_mm256_add_ps(acc_a[0], acc_a[1]), _mm256_add_ps(acc_a[2], acc_a[3])), tot_a);
    tot_b = _mm256_fmadd_ps(_mm256_set1_ps(sb[gi]),
                            _mm256_add_ps(_mm256_add_ps(acc_b[0], acc_b[1]), _mm256_add_ps(acc_b[2], acc_b[3])), tot_b);
  }
  float tail_a = 0.0f, tail_b = 0.0f;
  for (int64_t k = g.full_end; k < g.K; ++k) {
    tail_a += xn[k] * static_cast<float>(code_at(ra, k, BITS));
    tail_b += xn[k] * static_cast<float>(code_at(rb, k, BITS));
  }
  out[0] = hsum(tot_a) + sa[G - 1] * tail_a;
  out[1] = hsum(tot_b) + sb[G - 1] * tail_b;
}

template <int BITS, bool LUT>
void row_dot_vec_all(const Geometry& g, const uint8_t* row, const float* xp, const float* xn, int64_t M,
                     const float* sx, const float* s, const float* z, const LutTables& tab, const float* lut,
                     float* out) {
  const int64_t K = g.K, G = g.G;
  int64_t m = 0;
#define MOEQUANT_ROWS(mr) \
  row_dot_vec<BITS, LUT, mr>(g, row, xp + m * K, xn + m * K, sx + m * G, s, z, tab, lut, out + m)
  for (; m + 4 <= M; m += 4) MOEQUANT_ROWS(4);
  switch (M - m) {
    case 3: MOEQUANT_ROWS(3); break;
    case 2: MOEQUANT_ROWS(2); break;
    case 1: MOEQUANT_ROWS(1); break;
    default: break;
  }
#undef MOEQUANT_ROWS
}

// One row of W in the permuted column order (whole steps) / column order (the rest).
template <int BITS, bool LUT>
void row_dequant_vec(const Geometry& g, const uint8_t* row, const float* s, const float* z, const LutTables& tab,
                     const float* lut, float* w) {
  constexpr int U = kStep<BITS>;
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t k0 = gi * g.gs, k1 = std::min(g.K, k0 + g.gs);
    const __m256 sv = _mm256_set1_ps(s[gi]);
    const __m256 zv = _mm256_set1_ps(LUT ? 0.0f : z[gi]);
    int64_t k = k0;
    for (; k + U <= k1; k += U) {
      const uint8_t* p = row + k / 8 * BITS;
      if constexpr (LUT) {
        __m256 v[4];
        lut_step(p, tab, v);
        for (int t = 0; t < 4; ++t) _mm256_storeu_ps(w + k + 8 * t, _mm256_mul_ps(v[t], sv));
      } else {
        decode_step<BITS, false>(p, [&](auto t, __m256i q) {
          constexpr int T = decltype(t)::value;
          _mm256_storeu_ps(w + k + 8 * T, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zv), sv));
        });
      }
    }
    for (; k < k1; ++k) {
      const uint32_t c = code_at(row, k, BITS);
      w[k] = LUT ? lut[c] * s[gi] : (static_cast<float>(c) - z[gi]) * s[gi];
    }
  }
}

#endif  // __AVX2__

// ---------------------------------------------------------------------------------------------------
// drivers
// ---------------------------------------------------------------------------------------------------

int64_t grain_rows(const Geometry& g) { return std::max<int64_t>(1, kGrainWeights / std::max<int64_t>(g.K, 1)); }

#ifdef __AVX2__
// f(Idx<b>{}) for the vector path's width b (LUT codes: 4 only); false when there is none.
template <bool LUT, class F>
inline bool with_bits(int64_t bits, F&& f) {
  if constexpr (LUT) {
    if (bits != 4) return false;
    f(Idx<4>{});
    return true;
  } else {
    switch (bits) {
      case 1: f(Idx<1>{}); return true;
      case 2: f(Idx<2>{}); return true;
      case 3: f(Idx<3>{}); return true;
      case 4: f(Idx<4>{}); return true;
      case 5: f(Idx<5>{}); return true;
      case 6: f(Idx<6>{}); return true;
      case 7: f(Idx<7>{}); return true;
      case 8: f(Idx<8>{}); return true;
      default: return false;
    }
  }
}
#endif

// Row n of the codes. The vector path of the widths without a layout of their own reads up to 8 bytes past a
// step; on the last row that could leave the tensor, so that row is read from a padded copy (`pad`).
inline const uint8_t* row_at(const Geometry& g, const uint8_t* codes, int64_t n, std::vector<uint8_t>& pad) {
  const uint8_t* row = codes + n * g.row_bytes;
  const bool generic = !(g.bits == 2 || g.bits == 3 || g.bits == 4 || g.bits == 8);
  if (!(g.U && generic && n == g.N - 1)) return row;
  pad.assign(g.row_bytes + 8, 0);
  std::memcpy(pad.data(), row, g.row_bytes);
  return pad.data();
}

// GEMV: x [M, K] fp32 -> y [M, N] fp32 (+ bias), one decode of W per pass of up to 4 rows of x.
template <bool LUT, class Params>
at::Tensor gemv(const Geometry& g, const uint8_t* codes, const Params& params, const float* lut,
                const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = g.K, N = g.N, G = g.G;
  const float* xn = x.data_ptr<float>();
  // Permuted copy of x for the vector path; per-group sums of x for the zero-point term.
  std::vector<float> xperm(g.U ? M * K : 0);
  if (g.U) {
    const std::vector<int64_t> src = step_sources(g);
    for (int64_t m = 0; m < M; ++m) permute_row(g, src.data(), xn + m * K, xperm.data() + m * K, !LUT);
  }
  const float* xp = g.U ? xperm.data() : xn;
  std::vector<float> sx(LUT ? 0 : M * G);  // [M, G]
  if (!LUT)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t gi = 0; gi < G; ++gi) {
        double acc = 0.0;
        for (int64_t k = gi * g.gs; k < std::min(K, (gi + 1) * g.gs); ++k) acc += xn[m * K + k];
        sx[m * G + gi] = static_cast<float>(acc);
      }
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
#ifdef __AVX2__
  LutTables tab{};
  if (LUT) tab = make_tables(lut);
#endif
  at::parallel_for(0, N, grain_rows(g), [&](int64_t n0, int64_t n1) {
    // Group parameters of a block of rows at once (contiguous in the scale tensor: vectorised conversion).
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(n1 - n0, 4096 / std::max<int64_t>(G, 1)));
    std::vector<float> s(block * G), z(block * G), out(std::max<int64_t>(M, 2));
    std::vector<uint8_t> pad;
    for (int64_t nb = n0; nb < n1; nb += block) {
      const int64_t rows = std::min(block, n1 - nb);
      params.rows(g, nb, rows, s.data(), z.data());
      int64_t r = 0;
#ifdef __AVX2__
      if constexpr (!LUT) {  // one row of x: two rows of W per pass (uniform codes)
        for (; g.U && M == 1 && r + 2 <= rows; r += 2) {
          const int64_t n = nb + r;
          const uint8_t* ra = row_at(g, codes, n, pad);
          const uint8_t* rb = row_at(g, codes, n + 1, pad);
          const float *sr = s.data() + r * G, *zr = z.data() + r * G;
          with_bits<false>(g.bits, [&](auto b) {
            row_pair_dot_vec<decltype(b)::value>(g, ra, rb, xp, xn, sx.data(), sr, zr, sr + G, zr + G, out.data());
          });
          yp[n] = out[0] + (bp ? bp[n] : 0.0f);
          yp[n + 1] = out[1] + (bp ? bp[n + 1] : 0.0f);
        }
      }
#endif
      for (; r < rows; ++r) {
        const int64_t n = nb + r;
        const uint8_t* row = row_at(g, codes, n, pad);
        const float* sr = s.data() + r * G;
        const float* zr = z.data() + r * G;
        bool done = false;
#ifdef __AVX2__
        if (g.U)
          done = with_bits<LUT>(g.bits, [&](auto b) {
            row_dot_vec_all<decltype(b)::value, LUT>(g, row, xp, xn, M, sx.data(), sr, zr, tab, lut, out.data());
          });
#endif
        if (!done) row_dot_scalar<LUT>(g, row, xn, M, sx.data(), sr, zr, lut, out.data());
        const float b = bp ? bp[n] : 0.0f;
        for (int64_t m = 0; m < M; ++m) yp[m * N + n] = out[m] + b;
      }
    }
  });
  return y;
}

// Rows [r0, r1) of W -> fp32 w [r1 - r0, K] (row stride K), columns in the vector path's order when
// `permuted`, else column order. Parallel over rows.
template <bool LUT, class Params>
void dequant_rows(const Geometry& g, const uint8_t* codes, const Params& params, const float* lut, bool permuted,
                  int64_t r0, int64_t r1, float* w) {
  const std::vector<int64_t> src = step_sources(g);
#ifdef __AVX2__
  LutTables tab{};
  if (LUT) tab = make_tables(lut);
#endif
  at::parallel_for(r0, r1, grain_rows(g), [&](int64_t n0, int64_t n1) {
    std::vector<float> s(g.G), z(g.G), tmp(permuted ? 0 : g.U);
    std::vector<uint8_t> pad;
    for (int64_t n = n0; n < n1; ++n) {
      params.rows(g, n, 1, s.data(), z.data());
      const uint8_t* row = row_at(g, codes, n, pad);
      float* wr = w + (n - r0) * g.K;
      bool done = false;
#ifdef __AVX2__
      if (g.U) {
        done = with_bits<LUT>(g.bits, [&](auto b) {
          row_dequant_vec<decltype(b)::value, LUT>(g, row, s.data(), z.data(), tab, lut, wr);
        });
        if (done && !permuted)  // back to column order, step by step
          for (int64_t k0 = 0; k0 < g.full_end; k0 += g.U) {
            std::memcpy(tmp.data(), wr + k0, sizeof(float) * g.U);
            for (int64_t i = 0; i < g.U; ++i) wr[k0 + src[i]] = tmp[i];
          }
      }
#endif
      if (!done) row_dequant_scalar<LUT>(g, row, s.data(), z.data(), lut, wr);
    }
  });
}

// Whole matrix -> fp32 [N, K] (see dequant_rows).
template <bool LUT, class Params>
at::Tensor dequant(const Geometry& g, const uint8_t* codes, const Params& params, const float* lut, bool permuted) {
  at::Tensor w = at::empty({g.N, g.K}, at::TensorOptions().dtype(at::kFloat));  // [N, K]
  dequant_rows<LUT>(g, codes, params, lut, permuted, 0, g.N, w.data_ptr<float>());
  return w;
}

// Large M: decode a tile of rows of W at a time, multiply it against the identically permuted x
// (y[:, tile] = x_p W_tile^T, BLAS writing into the column slice of y), add the bias at the end.
template <bool LUT, class Params>
at::Tensor dequant_gemm(const Geometry& g, const uint8_t* codes, const Params& params, const float* lut,
                        const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  at::Tensor xp = x;  // [M, K]
  if (g.U) {
    xp = at::empty_like(x);
    const std::vector<int64_t> src = step_sources(g);
    const float* xs = x.data_ptr<float>();
    float* xd = xp.data_ptr<float>();
    at::parallel_for(0, x.size(0), std::max<int64_t>(1, kGrainWeights / g.K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) permute_row(g, src.data(), xs + m * g.K, xd + m * g.K, false);
    });
  }
  at::Tensor y = at::empty({x.size(0), g.N}, x.options());  // [M, N]
  const int64_t T = moequant::gemm_tile_rows(g.N, g.K);
  at::Tensor w = at::empty({T, g.K}, x.options());  // [T, K] decoded rows, reused per tile
  for (int64_t n0 = 0; n0 < g.N; n0 += T) {
    const int64_t rows = std::min(T, g.N - n0);
    dequant_rows<LUT>(g, codes, params, lut, true, n0, n0 + rows, w.data_ptr<float>());
    at::Tensor out = y.narrow(1, n0, rows);  // [M, rows], row stride N
    at::mm_out(out, xp, w.narrow(0, 0, rows).t());
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// 4-bit codes x int8 activations (MOEQUANT_INT4=q8): the GEMV of llama.cpp's Q4 x Q8 dot products
// ---------------------------------------------------------------------------------------------------
//
// x is quantized per block of 32 columns, symmetrically: d_b = max |x_b| / 127, a_k = rint(x_k * (127 /
// max |x_b|)) in [-127, 127] (round half to even; an all-zero block: d = 0, a = 0). Then
//
//   y[n] = sum_g s[g] sum_{b in g} d_b sum_{k in b} q_k a_k  -  sum_g s[g] z[g] XS[g],
//   XS[g] = sum_{b in g} d_b sum_{k in b} a_k  (once per call and row of x)
//
// (sum_k (q_k - z) s d a_k = s d (sum_k q_k a_k - z sum_k a_k)). The integer dot products are vpmaddubsw (u8
// codes x s8 activations -> i16 pairs, at most 2 * 15 * 127) and vpmaddwd (-> i32), converted once per block
// and accumulated in fp32 with the factor s[g] d_b; the zero-point term is a dot product of length G per row
// (8 groups per vector), subtracted at the end.
//
// Two layouts of the int8 x, by the group size:
//   - pairs (group size % 64 == 0, or one group per row): 32 bytes of codes = blocks b, b + 1 in one load; the
//     low nibbles are the even columns of both blocks, the high nibbles the odd ones, so x is stored per pair
//     as [even columns of b | of b + 1 | odd columns of b | of b + 1] (64 bytes) and its scales as 8 floats
//     [d_b x 4 | d_b+1 x 4]: the i16 products of both nibble planes are added (at most 4 * 15 * 127, no
//     saturation) before one vpmaddwd, whose 8 lanes are 4 partial sums of b and 4 of b + 1;
//   - blocks (group size % 64 == 32): 16 bytes of codes per block, unpacked to [low | high nibbles]; x per
//     block [even columns | odd columns], one scale per block.
// A partial last pair / block (K % 64 or K % 32 != 0) reads its codes from a zero-padded copy against
// zero-padded x (d = 0 past the last block). Other geometries, x that is not fp32, more than `gemv_max_rows`
// rows or a build without AVX2 take `uniform_linear`.
#ifdef __AVX2__

constexpr int64_t kQ8Block = 32;
// One row of x: the codes of the pass kQ8Ahead passes (of 4 rows) on are prefetched, where rows are at most
// kQ8PrefetchBytes long. Measured (1 thread, the 210 SmolLM2-135M decoder linears, weights from DRAM): 6.2 ms
// without, 5.1 / 5.0 / 5.1 ms 1 / 2 / 4 passes ahead; a 4096 x 4096 matrix (2 KiB rows): 0.52 ms without,
// 0.61 ms with (the hardware prefetcher does better alone on long rows).
constexpr int64_t kQ8Ahead = 2;
constexpr int64_t kQ8PrefetchBytes = 1024;

// x [M, K] fp32 quantized per 32-block, in the pair or block layout.
struct Q8Acts {
  int64_t M = 0, K = 0, nb = 0, G = 0, bpg = 0;  // rows, columns, blocks per row, groups, blocks per group
  bool pairs = false;
  int64_t units = 0;       // pairs (pair layout, ceil(nb / 2)) or blocks per row
  int64_t unit_bytes = 0;  // 64 or 32
  int64_t unit_scales = 0; // 8 or 1
  std::vector<int8_t> q;   // [M, units, unit_bytes]
  std::vector<float> d;    // [M, units, unit_scales]
  int64_t Gp = 0;          // G rounded up to a multiple of 8
  std::vector<float> xs;   // [M, Gp] XS, zero past G
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// One block of x (len <= 32 columns) -> a[32] (zero past len), returns d; *sum = sum a.
inline float q8_block_quantize(const float* x, int64_t len, int32_t* a, int32_t* sum) {
  alignas(32) float buf[kQ8Block];
  const float* src = x;
  if (len < kQ8Block) {
    std::memset(buf, 0, sizeof(buf));
    std::memcpy(buf, x, sizeof(float) * len);
    src = buf;
  }
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(src + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  const float amax = hmax(mx);
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i s = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // MXCSR rounding: half to even
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 8 * i), q);
    s = _mm256_add_epi32(s, q);
  }
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), s);
  *sum = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
  return amax / 127.0f;
}

Q8Acts q8_quantize(const Geometry& g, const float* x, int64_t M) {
  Q8Acts a;
  a.M = M;
  a.K = g.K;
  a.nb = (g.K + kQ8Block - 1) / kQ8Block;
  a.G = g.G;
  a.bpg = g.G == 1 ? a.nb : g.gs / kQ8Block;
  a.pairs = g.G == 1 || a.bpg % 2 == 0;
  a.units = a.pairs ? (a.nb + 1) / 2 : a.nb;
  a.unit_bytes = a.pairs ? 2 * kQ8Block : kQ8Block;
  a.unit_scales = a.pairs ? 8 : 1;
  a.q.assign(M * a.units * a.unit_bytes, 0);
  a.d.assign(M * a.units * a.unit_scales, 0.0f);
  a.Gp = (a.G + 7) / 8 * 8;
  a.xs.assign(M * a.Gp, 0.0f);
  std::vector<float> dblk(a.nb);
  std::vector<int32_t> bsum(a.nb);
  alignas(32) int32_t v[kQ8Block];
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * g.K;
    int8_t* qm = a.q.data() + m * a.units * a.unit_bytes;
    float* dm = a.d.data() + m * a.units * a.unit_scales;
    for (int64_t b = 0; b < a.nb; ++b) {
      const int64_t k0 = b * kQ8Block;
      dblk[b] = q8_block_quantize(xm + k0, std::min(kQ8Block, g.K - k0), v, &bsum[b]);
      if (a.pairs) {  // [even of 2p | even of 2p + 1 | odd of 2p | odd of 2p + 1]
        int8_t* o = qm + (b / 2) * 64 + (b % 2) * 16;
        for (int i = 0; i < 16; ++i) {
          o[i] = static_cast<int8_t>(v[2 * i]);
          o[32 + i] = static_cast<int8_t>(v[2 * i + 1]);
        }
        for (int i = 0; i < 4; ++i) dm[(b / 2) * 8 + (b % 2) * 4 + i] = dblk[b];
      } else {  // [even | odd]
        int8_t* o = qm + b * 32;
        for (int i = 0; i < 16; ++i) {
          o[i] = static_cast<int8_t>(v[2 * i]);
          o[16 + i] = static_cast<int8_t>(v[2 * i + 1]);
        }
        dm[b] = dblk[b];
      }
    }
    for (int64_t gi = 0; gi < a.G; ++gi) {
      float acc = 0.0f;
      for (int64_t b = gi * a.bpg; b < std::min(a.nb, (gi + 1) * a.bpg); ++b) acc += dblk[b] * static_cast<float>(bsum[b]);
      a.xs[m * a.Gp + gi] = acc;
    }
  }
  return a;
}

// The rows of W one pass reads, and their group parameters.
template <int RW>
struct Q8Rows {
  const uint8_t* code[RW];  // row r's codes
  const uint8_t* tail[RW];  // its zero-padded last unit (tail_u >= 0)
  const float* s[RW];       // its group scales [G] (readable up to a multiple of 8)
  const uint8_t* zero[RW];  // its packed zero points (readable up to 4 bytes per 8 groups), or nullptr
  float zconst;             // the symmetric grid's zero point (zero == nullptr)
};

// Sum of the 8 lanes of each of 4 vectors -> 4 floats.
inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// One unit (a pair or a block) of RW rows of W (codes at p[r], group scales sv[r]) against MR rows of x (the
// unit of row m at xu + m * xstride, its scales at du + m * dstride): acc[r][m] += s d (integer dot product).
template <bool PAIRS, int RW, int MR>
__attribute__((always_inline)) inline void q8_unit(const uint8_t* const* p, const __m256* sv, const int8_t* xu,
                                                   int64_t xstride, const float* du, int64_t dstride,
                                                   __m256 (&acc)[RW][MR]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < RW; ++r) {
    __m256i lo, hi;
    if constexpr (PAIRS) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[r]));
      lo = _mm256_and_si256(raw, m4);
      hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r]));
      lo = hi = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
    }
    for (int m = 0; m < MR; ++m) {
      const int8_t* x = xu + m * xstride;
      const __m256 dv = PAIRS ? _mm256_loadu_ps(du + m * dstride) : _mm256_set1_ps(du[m * dstride]);
      __m256i p16 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
      if constexpr (PAIRS)
        p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
      acc[r][m] = _mm256_fmadd_ps(_mm256_mul_ps(dv, sv[r]), _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), acc[r][m]);
    }
  }
}

// RW rows of W against MR rows of x from row m0 of `a` -> out[r * MR + m] = sum_g s_g sum_{b in g} d_b (q . a)_b
// - sum_g s_g z_g XS_g. PAIRS: the pair layout, else the block layout. UPG > 0: units per group known at
// compile time (the whole groups run unrolled); 0: any. One accumulator per (row of W, row of x), reduced in
// one order: an output sums in the same order in any pass, so it depends neither on how the rows of W are
// split between threads nor on M.
template <bool PAIRS, int UPG, int RW, int MR>
inline void q8_rows(const Q8Acts& a, int64_t m0, const Q8Rows<RW>& w, int64_t tail_u, float* out) {
  constexpr int64_t UB = PAIRS ? 64 : 32;  // x bytes per unit
  constexpr int64_t CB = UB / 2;           // code bytes per unit
  constexpr int64_t US = PAIRS ? 8 : 1;    // scales per unit
  const int64_t units = a.units, G = a.G;
  const int64_t upg = G == 1 ? units : a.bpg / (PAIRS ? 2 : 1);  // units per group
  const int8_t* xq = a.q.data() + m0 * units * UB;
  const float* xd = a.d.data() + m0 * units * US;
  const int64_t xstride = units * UB, dstride = units * US;
  // groups [0, whole) have upg units and no padded tail
  const int64_t whole = UPG > 0 && upg == UPG ? (tail_u >= 0 || G * upg > units ? G - 1 : G) : 0;
  __m256 acc[RW][MR];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const uint8_t* p[RW];
  __m256 sv[RW];
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t u0 = gi * upg, u1 = std::min(units, u0 + upg);
    for (int r = 0; r < RW; ++r) sv[r] = _mm256_set1_ps(w.s[r][gi]);
    if (gi < whole) {
      for (int j = 0; j < (UPG > 0 ? UPG : 1); ++j) {
        for (int r = 0; r < RW; ++r) p[r] = w.code[r] + (u0 + j) * CB;
        q8_unit<PAIRS, RW, MR>(p, sv, xq + (u0 + j) * UB, xstride, xd + (u0 + j) * US, dstride, acc);
      }
    } else {
      for (int64_t u = u0; u < u1; ++u) {
        for (int r = 0; r < RW; ++r) p[r] = u == tail_u ? w.tail[r] : w.code[r] + u * CB;
        q8_unit<PAIRS, RW, MR>(p, sv, xq + u * UB, xstride, xd + u * US, dstride, acc);
      }
    }
  }
  // the zero-point terms sum_g s_g z_g XS_g, 8 groups at a time (XS is zero past G)
  __m256 zt[RW][MR];
  const float* xs = a.xs.data() + m0 * a.Gp;
  for (int r = 0; r < RW; ++r) {
    for (int m = 0; m < MR; ++m) zt[r][m] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      __m256 z;
      if (w.zero[r]) {
        uint32_t word;
        std::memcpy(&word, w.zero[r] + g0 / 2, 4);
        const __m128i b = _mm_cvtsi32_si128(static_cast<int>(word));
        const __m128i m4 = _mm_set1_epi8(0x0F);
        z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
            _mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4))));
      } else {
        z = _mm256_set1_ps(w.zconst);
      }
      const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(w.s[r] + g0), z);
      for (int m = 0; m < MR; ++m) zt[r][m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xs + m * a.Gp + g0), zt[r][m]);
    }
  }
  // every total is reduced in hsum4's order, 4 at a time where there are 4
  if constexpr (MR == 1 && RW % 4 == 0) {
    for (int r = 0; r < RW; r += 4) {
      alignas(16) float o[4];
      _mm_store_ps(o, _mm_sub_ps(hsum4(acc[r][0], acc[r + 1][0], acc[r + 2][0], acc[r + 3][0]),
                                 hsum4(zt[r][0], zt[r + 1][0], zt[r + 2][0], zt[r + 3][0])));
      for (int i = 0; i < 4; ++i) out[r + i] = o[i];
    }
  } else if constexpr (RW == 1 && MR == 4) {
    _mm_storeu_ps(out, _mm_sub_ps(hsum4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]),
                                  hsum4(zt[0][0], zt[0][1], zt[0][2], zt[0][3])));
  } else {
    for (int r = 0; r < RW; ++r)
      for (int m = 0; m < MR; ++m)
        out[r * MR + m] = _mm_cvtss_f32(_mm_sub_ps(hsum4(acc[r][m], acc[r][m], acc[r][m], acc[r][m]),
                                                   hsum4(zt[r][m], zt[r][m], zt[r][m], zt[r][m])));
  }
}

// GEMV: x [M, K] fp32 -> y [M, N] fp32 (+ bias) from 4-bit codes, x quantized to int8 per 32-block. One row
// of x: RW1 rows of W per pass; more: one row of W per pass of up to 4 rows of x.
template <bool PAIRS, int UPG>
void gemv_q8_rows(const Geometry& g, const uint8_t* codes, const UniformParams& params, const Q8Acts& a,
                  const float* bp, float* yp) {
  constexpr int64_t CB = PAIRS ? 32 : 16;  // code bytes per unit
  constexpr int RW1 = 4;                   // rows of W per pass, one row of x
  const int64_t M = a.M, N = g.N, G = g.G;
  const int64_t tail_off = (a.units - 1) * CB, tail_len = g.row_bytes - tail_off;
  const int64_t tail_u = tail_len < CB ? a.units - 1 : -1;
  const bool prefetch = kQ8Ahead > 0 && g.row_bytes <= kQ8PrefetchBytes;
  at::parallel_for(0, N, grain_rows(g), [&](int64_t n0, int64_t n1) {
    const int64_t block = std::max<int64_t>(RW1, std::min<int64_t>(n1 - n0, 4096 / std::max<int64_t>(G, 1)));
    std::vector<float> s(block * G + 8, 0.0f), outv(std::max<int64_t>(M, RW1));  // s: 8 floats more to read
    float* out = outv.data();
    alignas(32) uint8_t pad[RW1][32];
    const int64_t zread = (G + 7) / 8 * 4;  // zero-point bytes q8_rows reads per row
    std::vector<uint8_t> zpad(RW1 * zread);  // zero points of the last rows, padded
    const auto setup = [&](int64_t nb, int64_t r, auto& w, int rw) {
      for (int i = 0; i < rw; ++i) {
        w.code[i] = codes + (nb + r + i) * g.row_bytes;
        w.s[i] = s.data() + (r + i) * G;
        const int64_t n = nb + r + i;
        w.zconst = params.zconst;
        w.zero[i] = params.zero ? params.zero + n * params.zero_bytes : nullptr;
        if (params.zero && n * params.zero_bytes + zread > N * params.zero_bytes) {  // would read past the tensor
          uint8_t* zp = zpad.data() + i * zread;
          std::memset(zp, 0, zread);
          std::memcpy(zp, w.zero[i], params.zero_bytes);
          w.zero[i] = zp;
        }
        w.tail[i] = pad[i];
        if (tail_u >= 0) {
          std::memset(pad[i], 0, sizeof(pad[i]));
          std::memcpy(pad[i], w.code[i] + tail_off, tail_len);
        }
      }
    };
    for (int64_t nb = n0; nb < n1; nb += block) {
      const int64_t rows = std::min(block, n1 - nb);
      load_row_f32(params.scale, params.scale_dtype, nb * G, rows * G, s.data());
      int64_t r = 0;
      if (M == 1) {
        Q8Rows<RW1> w;
        for (; r + RW1 <= rows; r += RW1) {
          setup(nb, r, w, RW1);
          if (prefetch && nb + r + (kQ8Ahead + 1) * RW1 <= n1) {  // the codes of the pass kQ8Ahead passes on
            const uint8_t* ahead = codes + (nb + r + kQ8Ahead * RW1) * g.row_bytes;
            for (int64_t off = 0; off < RW1 * g.row_bytes; off += 64)
              _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
          }
          q8_rows<PAIRS, UPG, RW1, 1>(a, 0, w, tail_u, out);
          for (int i = 0; i < RW1; ++i) yp[nb + r + i] = out[i] + (bp ? bp[nb + r + i] : 0.0f);
        }
      }
      Q8Rows<1> w1;
      for (; r < rows; ++r) {
        const int64_t n = nb + r;
        setup(nb, r, w1, 1);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) q8_rows<PAIRS, UPG, 1, 4>(a, m, w1, tail_u, out + m);
        switch (M - m) {
          case 3: q8_rows<PAIRS, UPG, 1, 3>(a, m, w1, tail_u, out + m); break;
          case 2: q8_rows<PAIRS, UPG, 1, 2>(a, m, w1, tail_u, out + m); break;
          case 1: q8_rows<PAIRS, UPG, 1, 1>(a, m, w1, tail_u, out + m); break;
          default: break;
        }
        const float bias_n = bp ? bp[n] : 0.0f;
        for (int64_t i = 0; i < M; ++i) yp[i * N + n] = out[i] + bias_n;
      }
    }
  });
}

at::Tensor gemv_q8(const Geometry& g, const uint8_t* codes, const UniformParams& params, const at::Tensor& x,
                   const c10::optional<at::Tensor>& bias) {
  const Q8Acts a = q8_quantize(g, x.data_ptr<float>(), x.size(0));
  at::Tensor y = at::empty({a.M, g.N}, x.options());  // [M, N]
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t upg = a.G == 1 ? 0 : a.bpg / (a.pairs ? 2 : 1);  // units per group (one group: no unrolling)
  if (a.pairs && upg == 2)  // group size 128
    gemv_q8_rows<true, 2>(g, codes, params, a, bp, yp);
  else if (a.pairs && upg == 1)  // 64
    gemv_q8_rows<true, 1>(g, codes, params, a, bp, yp);
  else if (a.pairs && upg == 4)  // 256
    gemv_q8_rows<true, 4>(g, codes, params, a, bp, yp);
  else if (a.pairs)
    gemv_q8_rows<true, 0>(g, codes, params, a, bp, yp);
  else
    gemv_q8_rows<false, 0>(g, codes, params, a, bp, yp);
  return y;
}

#endif  // __AVX2__

// ---------------------------------------------------------------------------------------------------
// argument checks and entry points
// ---------------------------------------------------------------------------------------------------

void check_common(const Geometry& g, const at::Tensor& codes) {
  TORCH_CHECK(g.bits >= 1 && g.bits <= 8, "bits must be in 1..8");
  TORCH_CHECK(g.gs >= 1 && g.K >= 1, "group size and K must be positive");
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2 &&
                  codes.is_contiguous() && codes.size(1) == g.row_bytes,
              "codes must be contiguous CPU uint8 [N, packed_len(K, bits)]");
}

// x [..., K] of any float dtype -> (fp32 contiguous [M, K], fp32 contiguous bias); the result goes back to x's
// leading shape and dtype in `finish`.
std::pair<at::Tensor, c10::optional<at::Tensor>> prepare(const Geometry& g, const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()) && x.dim() >= 1 && x.size(-1) == g.K,
              "x must be a CPU float tensor [..., K]");
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, g.K});  // [M, K]
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  if (!x2.is_contiguous()) x2 = x2.contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == g.N, "bias must have N elements");
    b = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
  }
  return {x2, b};
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  at::Tensor out = y;  // [M, N]
  if (x.dim() != 2) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    out = out.view(shape);  // [..., N]
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

UniformParams uniform_params(const Geometry& g, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                             double zconst) {
  TORCH_CHECK(scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == g.N && scale.size(1) == g.G,
              "scale must be contiguous [N, G]");
  UniformParams p{scale.data_ptr(), scale.scalar_type(), nullptr, 0, static_cast<float>(zconst)};
  if (zero.has_value()) {
    TORCH_CHECK(zero->scalar_type() == at::kByte && zero->is_contiguous() && zero->dim() == 2 &&
                    zero->size(0) == g.N && zero->size(1) == packed_len(g.G, g.bits),
                "zero must be contiguous uint8 [N, packed_len(G, bits)]");
    p.zero = zero->data_ptr<uint8_t>();
    p.zero_bytes = zero->size(1);
  }
  return p;
}

LutParams lut_params(const Geometry& g, const c10::optional<at::Tensor>& absmax,
                     const c10::optional<at::Tensor>& dq_codes, const c10::optional<at::Tensor>& dq_scale,
                     const c10::optional<at::Tensor>& dq_offset, int64_t dq_block) {
  LutParams p{nullptr, at::kFloat, nullptr, nullptr, 0.0f, dq_block};
  if (absmax.has_value()) {
    TORCH_CHECK(absmax->is_contiguous() && absmax->dim() == 2 && absmax->size(0) == g.N && absmax->size(1) == g.G,
                "absmax must be contiguous [N, K / block_size]");
    p.absmax = absmax->data_ptr();
    p.absmax_dtype = absmax->scalar_type();
  } else {
    TORCH_CHECK(dq_codes.has_value() && dq_scale.has_value() && dq_offset.has_value(),
                "absmax or the three double-quant tensors are needed");
    TORCH_CHECK(dq_block >= 1, "dq block size must be positive");
    TORCH_CHECK(dq_codes->scalar_type() == at::kByte && dq_codes->is_contiguous() && dq_codes->numel() == g.N * g.G,
                "absmax_codes must be contiguous uint8 [N, NB]");
    TORCH_CHECK(dq_scale->scalar_type() == at::kFloat && dq_scale->is_contiguous() &&
                    dq_scale->numel() == (g.N * g.G + dq_block - 1) / dq_block,
                "absmax_scale must be contiguous float32 [ceil(N * NB / dq_block)]");
    TORCH_CHECK(dq_offset->scalar_type() == at::kFloat && dq_offset->numel() == 1, "absmax_offset must be fp32 [1]");
    p.dq_codes = dq_codes->data_ptr<uint8_t>();
    p.dq_scale = dq_scale->data_ptr<float>();
    p.dq_offset = dq_offset->data_ptr<float>()[0];
  }
  return p;
}

const float* lut_table(const at::Tensor& lut) {
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.numel() == 16,
              "lut must be contiguous float32 [16]");
  return lut.data_ptr<float>();
}

at::Tensor uniform_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t bits,
                          int64_t group_size, int64_t K, double zconst, int64_t gemv_max_rows) {
  const Geometry g = make_geometry(bits, codes.size(0), K, group_size);
  check_common(g, codes);
  const auto [x2, b] = prepare(g, x, bias);
  const UniformParams p = uniform_params(g, scale, zero, zconst);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Tensor y = x2.size(0) <= gemv_max_rows ? gemv<false>(g, c, p, nullptr, x2, b)
                                                   : dequant_gemm<false>(g, c, p, nullptr, x2, b);  // [M, N]
  return finish(y, x, g.N);
}

// uniform_linear with 4-bit codes against int8-quantized x (`gemv_q8`) where it applies; else uniform_linear.
at::Tensor uniform_linear_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias,
                             int64_t bits, int64_t group_size, int64_t K, double zconst, int64_t gemv_max_rows) {
#ifdef __AVX2__
  const Geometry g = make_geometry(bits, codes.size(0), K, group_size);
  const bool blocks = g.G == 1 || g.gs % kQ8Block == 0;
  if (bits == 4 && blocks && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == K &&
      x.numel() / std::max<int64_t>(K, 1) <= gemv_max_rows) {
    check_common(g, codes);
    const auto [x2, b] = prepare(g, x, bias);
    const UniformParams p = uniform_params(g, scale, zero, zconst);
    return finish(gemv_q8(g, codes.data_ptr<uint8_t>(), p, x2, b), x, g.N);
  }
#endif
  return uniform_linear(x, codes, scale, zero, bias, bits, group_size, K, zconst, gemv_max_rows);
}

bool q8_applies(int64_t bits, int64_t group_size, int64_t K) {
#ifdef __AVX2__
  const int64_t gs = std::min(group_size, K);
  return bits == 4 && K >= 1 && gs >= 1 && (gs >= K || gs % kQ8Block == 0);
#else
  (void)bits, (void)group_size, (void)K;
  return false;
#endif
}

at::Tensor uniform_dequant(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                           int64_t bits, int64_t group_size, int64_t K, double zconst, bool permuted) {
  const Geometry g = make_geometry(bits, codes.size(0), K, group_size);
  check_common(g, codes);
  return dequant<false>(g, codes.data_ptr<uint8_t>(), uniform_params(g, scale, zero, zconst), nullptr, permuted);
}

at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                      const c10::optional<at::Tensor>& absmax, const c10::optional<at::Tensor>& dq_codes,
                      const c10::optional<at::Tensor>& dq_scale, const c10::optional<at::Tensor>& dq_offset,
                      const c10::optional<at::Tensor>& bias, int64_t K, int64_t block_size, int64_t dq_block,
                      int64_t gemv_max_rows) {
  TORCH_CHECK(block_size >= 1 && K % block_size == 0, "block size must divide K");
  const Geometry g = make_geometry(4, codes.size(0), K, block_size, true);
  check_common(g, codes);
  const auto [x2, b] = prepare(g, x, bias);
  const LutParams p = lut_params(g, absmax, dq_codes, dq_scale, dq_offset, dq_block);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Tensor y = x2.size(0) <= gemv_max_rows ? gemv<true>(g, c, p, lut_table(lut), x2, b)
                                                   : dequant_gemm<true>(g, c, p, lut_table(lut), x2, b);  // [M, N]
  return finish(y, x, g.N);
}

at::Tensor lut_dequant(const at::Tensor& codes, const at::Tensor& lut, const c10::optional<at::Tensor>& absmax,
                       const c10::optional<at::Tensor>& dq_codes, const c10::optional<at::Tensor>& dq_scale,
                       const c10::optional<at::Tensor>& dq_offset, int64_t K, int64_t block_size, int64_t dq_block,
                       bool permuted) {
  TORCH_CHECK(block_size >= 1 && K % block_size == 0, "block size must divide K");
  const Geometry g = make_geometry(4, codes.size(0), K, block_size, true);
  check_common(g, codes);
  return dequant<true>(g, codes.data_ptr<uint8_t>(), lut_params(g, absmax, dq_codes, dq_scale, dq_offset, dq_block),
                       lut_table(lut), permuted);
}


}  // namespace

// The linear kernels as dispatcher ops too (moequant_ext::*), so a torch.compile graph calls them without a trip
// through Python (kernels/cpp_ops.py registers their shape functions; eager code calls the pybind functions).
TORCH_LIBRARY_FRAGMENT(moequant_ext, m) {
  m.def("uniform_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? bias, int bits, int group_size, "
        "int in_features, float zconst, int gemv_max_rows) -> Tensor");
  m.def("lut_linear(Tensor x, Tensor codes, Tensor lut, Tensor? absmax, Tensor? dq_codes, Tensor? dq_scale, "
        "Tensor? dq_offset, Tensor? bias, int in_features, int block_size, int dq_block, int gemv_max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(moequant_ext, CPU, m) {
  m.impl("uniform_linear", &uniform_linear);
  m.impl("lut_linear", &lut_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniform_linear", &uniform_linear, "y = x W^T (+ b) from packed uniform int-k codes");
  m.def("uniform_linear_q8", &uniform_linear_q8,
        "uniform_linear; 4-bit codes with fp32 x of at most gemv_max_rows rows: x quantized to int8 per 32 columns");
  m.def("q8_applies", &q8_applies, "uniform_linear_q8 takes the int8 path for these (bits, group size, K)");
  m.def("uniform_dequant", &uniform_dequant, "packed uniform int-k codes -> fp32 [N, K]");
  m.def("lut_linear", &lut_linear, "y = x W^T (+ b) from packed 4-bit LUT codes");
  m.def("lut_dequant", &lut_dequant, "packed 4-bit LUT codes -> fp32 [N, K]");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
