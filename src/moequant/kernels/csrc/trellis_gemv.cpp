// moequant CPU kernels for the bitshift-trellis format ``trellis-packed`` (codecs/trellis.py has the math).
//
// decode(words, scale, lut, cfg) -> float32 [N, K], bit-identical to moequant::trellis_dequant:
//   w[r, c] = code(s)[v] * scale[r] in float32, s the state of the step covering (r, c).
// gemv(x [M, K], words, scale, lut, bias, cfg) -> float32 [M, N]: y = x W^T (+ bias) without the
//   matrix: per tile row, each tile is decoded into a stack buffer of its tile² code values and
//   multiplied into per-row accumulators; the row scale is applied once at the end.
//
// Stream: a tile's bits, MSB first, word i's bit 15 first. We copy it into big-endian bytes ``be``
// (byte b = stream bits [8b, 8b + 8)), extended past its end cyclically (tail-biting) or with zeros,
// so state t = the L bits from stream bit t·kv is one unaligned 64-bit big-endian read and a shift.
// Codes: hyb looks up a [2^(Q+1), 2] float table whose top index bit is the hash's bit 15 (the
// sign of component 0 folded in); 1mad sums the four bytes; 3inst adds two fp16 halves, rounded to
// fp16 as torch's half add does. The AVX2 paths compute 8 states per vector; every other geometry
// takes the scalar path (same arithmetic, same results).

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MQ_AVX2 1
#endif

namespace {

enum Code { HYB = 0, MAD = 1, INST = 2 };

constexpr int kTail = 16;  // extension bytes after the stream: one 16-byte read from any group start

struct Geo {
  int bits, L, V, tile, Q, code;
  bool tb;
  int kv, S, T, W, tile_bits, be_len;  // S steps, T = tile², W words, be_len bytes of the extended stream
  uint32_t mask;
};

Geo make_geo(int64_t bits, int64_t L, int64_t V, int64_t tile, const std::string& code, int64_t Q, bool tb) {
  Geo g{};
  g.bits = (int)bits; g.L = (int)L; g.V = (int)V; g.tile = (int)tile; g.Q = (int)Q; g.tb = tb;
  TORCH_CHECK(code == "hyb" || code == "1mad" || code == "3inst", "trellis: unknown code ", code);
  g.code = code == "hyb" ? HYB : (code == "1mad" ? MAD : INST);
  TORCH_CHECK(bits >= 1 && bits <= 4 && (V == 1 || V == 2), "trellis: bits 1-4 and V 1-2, got ", bits, ", ", V);
  g.kv = g.bits * g.V;
  TORCH_CHECK(g.kv < g.L && g.L <= 24, "trellis: L must exceed bits*V and be at most 24, got ", L);
  TORCH_CHECK(tile > 0 && (tile * tile) % V == 0, "trellis: bad tile ", tile);
  if (g.code == HYB) {
    TORCH_CHECK(V == 2 && Q >= 1 && Q <= 15, "trellis: hyb needs V=2 and 1 <= Q <= 15");
  } else {
    TORCH_CHECK(V == 1, "trellis: 1mad/3inst need V=1");
  }
  g.T = g.tile * g.tile;
  g.S = g.T / g.V;
  TORCH_CHECK((int64_t)g.S * g.kv >= g.L, "trellis: tile too short for the state");
  g.tile_bits = g.S * g.kv + (tb ? 0 : g.L - g.kv);
  g.W = (g.tile_bits + 15) / 16;
  g.be_len = 2 * g.W + kTail;
  g.mask = (1u << g.L) - 1u;
  return g;
}

// --- stream ---------------------------------------------------------------------------------------
// words [W] -> be [be_len]: the stream as big-endian bytes, extended cyclically (tail-biting) or by zeros.
inline void make_stream(const uint16_t* w, const Geo& g, uint8_t* be) {
  const int nb = 2 * g.W;
  if (g.tb && g.tile_bits % 16) {  // the cycle ends inside a word: build the extension bit by bit
    std::memset(be, 0, g.be_len);
    for (int i = 0; i < g.be_len * 8; ++i) {
      const int src = i % g.tile_bits;
      const int bit = (w[src >> 4] >> (15 - (src & 15))) & 1;
      be[i >> 3] |= (uint8_t)(bit << (7 - (i & 7)));
    }
    return;
  }
  int i = 0;
#ifdef MQ_AVX2
  const __m128i swap = _mm_setr_epi8(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  for (; i + 8 <= g.W; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(be + 2 * i), _mm_shuffle_epi8(v, swap));
  }
#endif
  for (; i < g.W; ++i) {
    be[2 * i] = (uint8_t)(w[i] >> 8);
    be[2 * i + 1] = (uint8_t)(w[i] & 0xFF);
  }
  if (g.tb && nb >= kTail) {
    std::memcpy(be + nb, be, kTail);
  } else if (g.tb) {
    for (int b = nb; b < g.be_len; ++b) be[b] = be[b % nb];
  } else {
    std::memset(be + nb, 0, g.be_len - nb);
  }
}

// the L-bit state starting at stream bit p
inline uint32_t state_at(const uint8_t* be, int p, const Geo& g) {
  uint64_t v;
  std::memcpy(&v, be + (p >> 3), 8);
  v = __builtin_bswap64(v);
  return (uint32_t)(v >> (64 - g.L - (p & 7))) & g.mask;
}

// --- codes (scalar) -------------------------------------------------------------------------------
inline uint32_t hyb_index(uint32_t s, int Q) {  // (Q+1)-bit index: hash bit 15 (the sign), then Q bits
  const uint32_t h = s * (s + 1u);  // mod 2^32
  return (h >> (15 - Q)) & ((2u << Q) - 1u);
}

inline float mad_value(uint32_t s) {
  const uint32_t x = s * 34038481u + 76625530u;
  const int y = (int)((x & 255u) + ((x >> 8) & 255u) + ((x >> 16) & 255u) + (x >> 24));
  return (float)(y - 510) / 147.800537109375f;
}

inline float inst_value(uint32_t s) {
  const uint32_t x = s * 89226354u + 64248484u;
  const uint32_t y = (x & 0x8FFF8FFFu) ^ 0x3B603B60u;
  const c10::Half hi((uint16_t)(y >> 16), c10::Half::from_bits());
  const c10::Half lo((uint16_t)(y & 0xFFFFu), c10::Half::from_bits());
  return (float)(c10::Half)(hi + lo);  // fp16 add: float add, rounded to fp16 (nearest even)
}

// hyb table [2^(Q+1), 2] from the fp16-exact LUT [2^Q, 2]: entries with the top bit set negate component 0
std::vector<float> hyb_table(const float* lut, int Q) {
  const int n = 1 << Q;
  std::vector<float> t(4 * n);
  for (int i = 0; i < n; ++i) {
    t[2 * i] = lut[2 * i];
    t[2 * i + 1] = lut[2 * i + 1];
    t[2 * (n + i)] = lut[2 * i] * -1.0f;
    t[2 * (n + i) + 1] = lut[2 * i + 1];
  }
  return t;
}

// --- one tile's code values ------------------------------------------------------------------------
void decode_scalar(const uint8_t* be, const Geo& g, const float* table, float* out /* [T] */) {
  for (int t = 0; t < g.S; ++t) {
    const uint32_t s = state_at(be, t * g.kv, g);
    if (g.code == HYB) {
      const uint32_t i = hyb_index(s, g.Q);
      out[2 * t] = table[2 * i];
      out[2 * t + 1] = table[2 * i + 1];
    } else {
      out[t] = g.code == MAD ? mad_value(s) : inst_value(s);
    }
  }
}

#ifdef MQ_AVX2
// Per 8-state group: the 16 stream bytes from byte grp·kv (a group starts on a byte: 8·kv bits; its 8
// states span 7·kv + L <= 80 bits). Lane k takes the 4 bytes from (k·kv)/8, big-endian, then shifts by
// 32 − L − (k·kv mod 8).
struct Lanes {
  __m256i pattern, shift, mask;
};

Lanes make_lanes(const Geo& g) {
  alignas(32) int8_t pat[32];
  alignas(32) int32_t sh[8];
  for (int k = 0; k < 8; ++k) {
    const int b = (k * g.kv) >> 3;
    for (int j = 0; j < 4; ++j) pat[4 * k + j] = (int8_t)(b + 3 - j);  // little-endian lane <- big-endian bytes
    sh[k] = 32 - g.L - ((k * g.kv) & 7);
  }
  // _mm256_shuffle_epi8 indexes within each 128-bit half; both halves hold the same broadcast bytes
  Lanes l;
  l.pattern = _mm256_load_si256(reinterpret_cast<const __m256i*>(pat));
  l.shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
  l.mask = _mm256_set1_epi32((int)g.mask);
  return l;
}

inline __m256i states8(const uint8_t* be, int group, int kv, __m256i pattern, __m256i shift, __m256i mask) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(be + group * kv));
  const __m256i v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), pattern);
  return _mm256_and_si256(_mm256_srlv_epi32(v, shift), mask);
}

// the loop invariants of a producer as locals: the callers store through __m256 pointers, which may alias
// anything, so fields read through references would be reloaded after every store
#define MQ_LANES_LOCAL(g, l)                                                              \
  const int kv = (g).kv;                                                                  \
  const __m256i pattern = (l).pattern, shift = (l).shift, smask = (l).mask

// --- codes, 8 states at a time (s: 8 states in 32-bit lanes) ---
// hyb: 8 states -> 16 values (lo: states 0-3, hi: 4-7). Indices by vector; lookups by 8-byte (value 0,
// value 1) broadcast loads blended into place, the addresses moved out of the vector two at a time
// (64-bit extracts). Measured on Zen 3 (16x16 tiles, 4096x4096, M = 1): 4.0 ms against 4.5 ms for 32-bit
// extracts with load/loadh pairs, 4.5 ms for extracts of packed 16-bit indices, 5.6 ms for two 4-wide
// gathers or one 8-wide gather of fp16 pairs, 5.4-5.9 ms for scalar states with tables indexed by state,
// 4.8-8 ms through a store and reloads.
struct HybConsts {
  __m256i imask;
  __m128i qshift;
  const double* tab;  // [2^(Q+1)] (value 0, value 1) pairs
};

inline HybConsts hyb_consts(const Geo& g, const float* table) {
  return {_mm256_set1_epi32((2 << g.Q) - 1), _mm_cvtsi32_si128(15 - g.Q), reinterpret_cast<const double*>(table)};
}

inline void hyb8(__m256i s, __m256i imask, __m128i qshift, const double* tab, __m256& lo, __m256& hi) {
  const __m256i h = _mm256_mullo_epi32(s, _mm256_add_epi32(s, _mm256_set1_epi32(1)));
  const __m256i idx = _mm256_and_si256(_mm256_srl_epi32(h, qshift), imask);
  const __m128i i03 = _mm256_castsi256_si128(idx), i47 = _mm256_extracti128_si256(idx, 1);
  const uint64_t a = (uint64_t)_mm_cvtsi128_si64(i03), b = (uint64_t)_mm_extract_epi64(i03, 1);
  const uint64_t c = (uint64_t)_mm_cvtsi128_si64(i47), d = (uint64_t)_mm_extract_epi64(i47, 1);
  const __m256d p0 = _mm256_broadcast_sd(tab + (uint32_t)a), p1 = _mm256_broadcast_sd(tab + (a >> 32));
  const __m256d p2 = _mm256_broadcast_sd(tab + (uint32_t)b), p3 = _mm256_broadcast_sd(tab + (b >> 32));
  const __m256d p4 = _mm256_broadcast_sd(tab + (uint32_t)c), p5 = _mm256_broadcast_sd(tab + (c >> 32));
  const __m256d p6 = _mm256_broadcast_sd(tab + (uint32_t)d), p7 = _mm256_broadcast_sd(tab + (d >> 32));
  lo = _mm256_castpd_ps(_mm256_blend_pd(_mm256_blend_pd(p0, p1, 2), _mm256_blend_pd(p2, p3, 8), 12));
  hi = _mm256_castpd_ps(_mm256_blend_pd(_mm256_blend_pd(p4, p5, 2), _mm256_blend_pd(p6, p7, 8), 12));
}

inline __m256 mad8(__m256i s) {
  const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(34038481)), _mm256_set1_epi32(76625530));
  // byte sums, exact: pairs to 16 bits, then pairs of those to 32 bits
  const __m256i y = _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
  const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(y, _mm256_set1_epi32(510)));
  return _mm256_div_ps(f, _mm256_set1_ps(147.800537109375f));  // IEEE division, as torch's
}

// 3inst without fp16 instructions (1.3x faster than cvtph/hadd/cvtps_ph here): each half is normal with
// exponent field 011xx, so its float is (sign, exponent and mantissa moved down 3 bits) + the exponent bias
// difference (112 << 23); the two floats add exactly (multiples of 2^-13 below 4); the sum is rounded to
// fp16's 11 significant bits by adding and subtracting 1.5 · 2^(e + 13) (e its exponent), which rounds to
// nearest even at fp16's ulp 2^(e - 10). Equal to the fp16 add (cvtph_ps, add, cvtps_ph) on all 2^26 pairs
// of halves the code can produce (checked once, exhaustively, when this was written).
inline __m256 inst8(__m256i s) {
  const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(89226354)), _mm256_set1_epi32(64248484));
  const __m256i y = _mm256_xor_si256(_mm256_and_si256(x, _mm256_set1_epi32((int)0x8FFF8FFFu)),
                                     _mm256_set1_epi32(0x3B603B60));
  const __m256i keep = _mm256_set1_epi32((int)0x8FFFE000u), bias = _mm256_set1_epi32(0x38000000);
  const __m256i hi = _mm256_add_epi32(_mm256_and_si256(_mm256_srai_epi32(y, 3), keep), bias);
  const __m256i lo = _mm256_add_epi32(_mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(y, 16), 3), keep), bias);
  const __m256 v = _mm256_add_ps(_mm256_castsi256_ps(hi), _mm256_castsi256_ps(lo));
  const __m256 c = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(_mm256_castps_si256(v),
                                                                          _mm256_set1_epi32(0x7F800000)),
                                                         _mm256_set1_epi32((13 << 23) | 0x00400000)));
  return _mm256_sub_ps(_mm256_add_ps(v, c), c);
}

// Each producer calls f(q, v) for q = 0, 1, ... with the tile's values 8 at a time in position order (v:
// __m256, unscaled; positions [8q, 8q + 8)). NG: groups of 8 states per tile when known at compile time
// (0: S / 8 at run time), so that a 16x16 tile's loop unrolls and q is a constant.
template <int NG, class F>
inline void hyb_vectors(const uint8_t* be, const Geo& g, const Lanes& l, const HybConsts& hc, F&& f) {
  MQ_LANES_LOCAL(g, l);
  const __m256i imask = hc.imask;
  const __m128i qshift = hc.qshift;
  const double* tab = hc.tab;
  const int ng = NG ? NG : g.S / 8;
#pragma GCC unroll 16
  for (int grp = 0; grp < ng; ++grp) {
    __m256 lo, hi;
    hyb8(states8(be, grp, kv, pattern, shift, smask), imask, qshift, tab, lo, hi);
    f(2 * grp, lo);
    f(2 * grp + 1, hi);
  }
}

template <int NG, class F>
inline void mad_vectors(const uint8_t* be, const Geo& g, const Lanes& l, F&& f) {
  MQ_LANES_LOCAL(g, l);
  const int ng = NG ? NG : g.S / 8;
#pragma GCC unroll 32
  for (int grp = 0; grp < ng; ++grp) f(grp, mad8(states8(be, grp, kv, pattern, shift, smask)));
}

template <int NG, class F>
inline void inst_vectors(const uint8_t* be, const Geo& g, const Lanes& l, F&& f) {
  MQ_LANES_LOCAL(g, l);
  const int ng = NG ? NG : g.S / 8;
#pragma GCC unroll 32
  for (int grp = 0; grp < ng; ++grp) f(grp, inst8(states8(be, grp, kv, pattern, shift, smask)));
}
#endif

struct Decoder {
  Geo g;
  std::vector<float> table;  // hyb only: [2^(Q+1), 2]
#ifdef MQ_AVX2
  Lanes lanes;
#endif
  bool simd = false;  // vector producers apply (8 | S)
  bool rows8 = false;  // and every 8 consecutive values lie in one tile row (8 | tile)

  Decoder(const Geo& geo, const float* lut) : g(geo) {
    if (g.code == HYB) table = hyb_table(lut, g.Q);
#ifdef MQ_AVX2
    lanes = make_lanes(g);
    simd = g.S % 8 == 0;
    rows8 = simd && g.tile % 8 == 0;
#endif
  }

#ifdef MQ_AVX2
  // the tile's values 8 at a time, f(q, __m256); requires simd. NG: S / 8 when known (16x16 tiles), else 0
  template <int NG, class F>
  inline void vectors(const uint8_t* be, F&& f) const {
    if (g.code == HYB) hyb_vectors<NG>(be, g, lanes, hyb_consts(g, table.data()), f);
    else if (g.code == MAD) mad_vectors<NG>(be, g, lanes, f);
    else inst_vectors<NG>(be, g, lanes, f);
  }
#endif

  // one tile's words [W] -> code values [T] (unscaled), be: scratch [be_len]
  void tile(const uint16_t* words, uint8_t* be, float* out) const {
    make_stream(words, g, be);
#ifdef MQ_AVX2
    if (simd) {
      vectors<0>(be, [&](int q, __m256 v) { _mm256_storeu_ps(out + 8 * q, v); });
      return;
    }
#endif
    decode_scalar(be, g, table.data(), out);
  }
};

// --- x·w accumulation for one tile (buffer path: any tile) -------------------------------------------
// acc [M, tile, 8] (partial sums per row; this path uses lane 0), vals [tile, tile], x rows from column j·tile
inline void accumulate(const float* vals, const float* x, int64_t ldx, int M, int tile, float* acc) {
  for (int m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float* am = acc + (int64_t)m * tile * 8;
    for (int r = 0; r < tile; ++r) {
      float a = 0.f;
      for (int c = 0; c < tile; ++c) a += vals[r * tile + c] * xm[c];
      am[8 * r] += a;
    }
  }
}

#ifdef MQ_AVX2
// fused: tile (i, j) decoded 8 values at a time straight into acc [MM, tile] of __m256 (8 | tile);
// x: the MM activation rows from column j·tile (row stride ldx)
template <int MM>
inline void tile_gemv(const Decoder& d, const uint8_t* be, const float* x, int64_t ldx, __m256* acc) {
  const int tile = d.g.tile;
  if (tile == 16) {  // the common tile: 2 vectors a row, loops unrolled, x in registers
    __m256 xv[MM][2];
    for (int m = 0; m < MM; ++m) {
      xv[m][0] = _mm256_loadu_ps(x + m * ldx);
      xv[m][1] = _mm256_loadu_ps(x + m * ldx + 8);
    }
    auto f = [&](int q, __m256 v) {
      for (int m = 0; m < MM; ++m) acc[m * 16 + (q >> 1)] = _mm256_fmadd_ps(v, xv[m][q & 1], acc[m * 16 + (q >> 1)]);
    };
    if (d.g.code == HYB) d.vectors<16>(be, f);
    else d.vectors<32>(be, f);
    return;
  }
  int r = 0, c = 0;
  d.vectors<0>(be, [&](int, __m256 v) {
    for (int m = 0; m < MM; ++m)
      acc[m * tile + r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * ldx + c), acc[m * tile + r]);
    c += 8;
    if (c == tile) { c = 0; ++r; }
  });
}

// tile (i, j) decoded and scaled into out: dst = its first weight, ldo = K, srow = its rows' scales (8 | tile)
inline void tile_decode(const Decoder& d, const uint8_t* be, float* dst, int64_t ldo, const float* srow) {
  const int tile = d.g.tile;
  if (tile == 16) {
    auto f = [&](int q, __m256 v) {
      _mm256_storeu_ps(dst + (q >> 1) * ldo + (q & 1) * 8, _mm256_mul_ps(v, _mm256_broadcast_ss(srow + (q >> 1))));
    };
    if (d.g.code == HYB) d.vectors<16>(be, f);
    else d.vectors<32>(be, f);
    return;
  }
  int r = 0, c = 0;
  d.vectors<0>(be, [&](int, __m256 v) {
    _mm256_storeu_ps(dst + r * ldo + c, _mm256_mul_ps(v, _mm256_broadcast_ss(srow + r)));
    c += 8;
    if (c == tile) { c = 0; ++r; }
  });
}
#endif

struct Prepared {
  Geo g;
  at::Tensor words, scale, lut;  // contiguous: uint16-sized words, float32 scale and lut
  int64_t NT, KT, N, K;
};

Prepared prepare(const at::Tensor& words, const at::Tensor& scale, const c10::optional<at::Tensor>& lut,
                 int64_t bits, int64_t L, int64_t V, int64_t tile, const std::string& code, int64_t Q, bool tb) {
  Prepared p;
  p.g = make_geo(bits, L, V, tile, code, Q, tb);
  TORCH_CHECK(words.device().is_cpu() && words.dim() == 3 && words.element_size() == 2,
              "trellis: words must be a CPU 16-bit tensor [N/tile, K/tile, W]");
  TORCH_CHECK(words.size(2) == p.g.W, "trellis: ", words.size(2), " words per tile, the config stores ", p.g.W);
  p.words = words.contiguous();
  p.NT = words.size(0);
  p.KT = words.size(1);
  p.N = p.NT * tile;
  p.K = p.KT * tile;
  TORCH_CHECK(scale.numel() == p.N, "trellis: scale has ", scale.numel(), " rows, expected ", p.N);
  p.scale = scale.to(at::kFloat).contiguous();
  if (p.g.code == HYB) {
    TORCH_CHECK(lut.has_value() && lut->numel() == (2 << Q), "trellis: hyb needs a [2^Q, 2] LUT");
    p.lut = lut->to(at::kFloat).contiguous();
  }
  return p;
}

inline const uint16_t* words_ptr(const Prepared& p) {
  return reinterpret_cast<const uint16_t*>(p.words.data_ptr());
}

int64_t grain_rows(const Prepared& p) {  // tile rows per task: at least ~64k weights of work each
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, p.K * p.g.tile));
}

// tile rows [i0, i1) decoded and scaled into o: float32 [(i1 - i0)·tile, K], row-major
void decode_rows(const Prepared& p, const Decoder& dec, int64_t i0, int64_t i1, float* o) {
  const Geo& g = p.g;
  const float* sc = p.scale.data_ptr<float>();
  const uint16_t* w = words_ptr(p);
  std::vector<uint8_t> be(g.be_len);
  std::vector<float> vals(g.T);
  for (int64_t i = i0; i < i1; ++i) {
    const float* srow = sc + i * g.tile;
    for (int64_t j = 0; j < p.KT; ++j) {
      float* dst = o + (i - i0) * g.tile * p.K + j * g.tile;  // tile (i, j)'s first weight
#ifdef MQ_AVX2
      if (dec.rows8) {
        make_stream(w + (i * p.KT + j) * g.W, g, be.data());
        tile_decode(dec, be.data(), dst, p.K, srow);
        continue;
      }
#endif
      dec.tile(w + (i * p.KT + j) * g.W, be.data(), vals.data());
      for (int r = 0; r < g.tile; ++r)
        for (int c = 0; c < g.tile; ++c) dst[r * p.K + c] = vals[r * g.tile + c] * srow[r];
    }
  }
}

// the whole matrix, float32 [N, K]
at::Tensor decode_all(const Prepared& p, const Decoder& dec) {
  at::Tensor out = at::empty({p.N, p.K}, p.words.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, p.NT, grain_rows(p), [&](int64_t i0, int64_t i1) {
    decode_rows(p, dec, i0, i1, o + i0 * p.g.tile * p.K);
  });
  return out;
}

// x [M, K] float32 -> x W^T + bias [M, N] float32 for many rows, a block of weight rows at a time: the block
// (<= 16 MiB) is decoded by all threads into a scratch buffer, then multiplied into its columns of the output
// by at::mm_out (threaded as torch's GEMM is). The full matrix never exists: a fresh [N, K] buffer per call
// cost more in page faults than the decode itself (4096x4096, M = 512, 1 thread: decode 44 ms of which
// ~40 page faults; the whole-matrix path ran at 0.82x fp32, this one at 0.98-1.01x). Smaller blocks
// (256 rows of 4096) were as fast with 1 thread but slower with 2 (more decode/GEMM barriers), as was one
// task per block with a single-threaded GEMM each.
at::Tensor linear_blocked(const Prepared& p, const Decoder& dec, const at::Tensor& x,
                          const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0);
  const int64_t rows = std::max<int64_t>(1, (1 << 22) / (p.K * p.g.tile));  // tile rows per block
  at::Tensor out = at::empty({M, p.N}, x.options());
  at::Tensor scratch = at::empty({std::min(rows, p.NT) * p.g.tile, p.K}, x.options());
  float* sp = scratch.data_ptr<float>();
  for (int64_t b0 = 0; b0 < p.NT; b0 += rows) {
    const int64_t b1 = std::min(p.NT, b0 + rows);
    at::parallel_for(b0, b1, 1, [&](int64_t i0, int64_t i1) {
      decode_rows(p, dec, i0, i1, sp + (i0 - b0) * p.g.tile * p.K);
    });
    const int64_t n0 = b0 * p.g.tile, nr = (b1 - b0) * p.g.tile;
    at::Tensor dst = out.narrow(1, n0, nr);  // [M, nr], row stride N
    at::Tensor wb = scratch.narrow(0, 0, nr);  // [nr, K]
    if (bias.has_value()) {
      at::addmm_out(dst, bias->narrow(0, n0, nr), x, wb.t());
    } else {
      at::mm_out(dst, x, wb.t());
    }
  }
  return out;
}

struct GemvArgs {
  const float* x;  // [M, K]
  const float* scale;  // [N]
  const float* bias;  // [N] or null
  float* out;  // [M, N]
  int64_t M;
};

inline float sum8(const float* a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

// y[m, n] = sum8(acc[m, r]) * scale[n] + bias[n] for the rows n = i·tile + r of tile row i
inline void finish_rows(const Prepared& p, const GemvArgs& a, int64_t i, const float* acc /* [M, tile, 8] */) {
  for (int64_t m = 0; m < a.M; ++m) {
    for (int r = 0; r < p.g.tile; ++r) {
      const int64_t n = i * p.g.tile + r;
      a.out[m * p.N + n] = sum8(acc + (m * p.g.tile + r) * 8) * a.scale[n] + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

// any geometry, any M: each tile decoded into a buffer, then multiplied
void gemv_buffered(const Prepared& p, const Decoder& dec, const GemvArgs& a) {
  const Geo& g = p.g;
  const uint16_t* w = words_ptr(p);
  at::parallel_for(0, p.NT, grain_rows(p), [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> be(g.be_len);
    std::vector<float> vals(g.T);
    std::vector<float> acc(a.M * g.tile * 8);  // [M, tile, 8]
    for (int64_t i = i0; i < i1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < p.KT; ++j) {
        dec.tile(w + (i * p.KT + j) * g.W, be.data(), vals.data());
        accumulate(vals.data(), a.x + j * g.tile, p.K, (int)a.M, g.tile, acc.data());
      }
      finish_rows(p, a, i, acc.data());
    }
  });
}

#ifdef MQ_AVX2
// 8 | tile and M == MM: values go from the decoder straight into 8-wide accumulators
template <int MM>
void gemv_fused(const Prepared& p, const Decoder& dec, const GemvArgs& a) {
  const Geo& g = p.g;
  const uint16_t* w = words_ptr(p);
  at::parallel_for(0, p.NT, grain_rows(p), [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> be(g.be_len);
    std::vector<__m256> acc(MM * g.tile);  // [M, tile] x 8 lanes
    for (int64_t i = i0; i < i1; ++i) {
      std::fill(acc.begin(), acc.end(), _mm256_setzero_ps());
      for (int64_t j = 0; j < p.KT; ++j) {
        make_stream(w + (i * p.KT + j) * g.W, g, be.data());
        tile_gemv<MM>(dec, be.data(), a.x + j * g.tile, p.K, acc.data());
      }
      finish_rows(p, a, i, reinterpret_cast<const float*>(acc.data()));
    }
  });
}
#endif

// x [M, K] float32, bias [N] or None -> float32 [M, N]
at::Tensor gemv_all(const Prepared& p, const Decoder& dec, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == p.K && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "trellis gemv: x must be CPU float32 [M, ", p.K, "]");
  const at::Tensor xc = x.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == p.N, "trellis gemv: bias has ", bias->numel(), " entries, expected ", p.N);
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({xc.size(0), p.N}, x.options());
  const GemvArgs a{xc.data_ptr<float>(), p.scale.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                   out.data_ptr<float>(), xc.size(0)};
  if (a.M == 0) return out;
#ifdef MQ_AVX2
  if (dec.rows8) {
    switch (a.M) {
      case 1: gemv_fused<1>(p, dec, a); return out;
      case 2: gemv_fused<2>(p, dec, a); return out;
      case 3: gemv_fused<3>(p, dec, a); return out;
      case 4: gemv_fused<4>(p, dec, a); return out;
      case 5: gemv_fused<5>(p, dec, a); return out;
      case 6: gemv_fused<6>(p, dec, a); return out;
      case 7: gemv_fused<7>(p, dec, a); return out;
      case 8: gemv_fused<8>(p, dec, a); return out;
      default: break;
    }
  }
#endif
  gemv_buffered(p, dec, a);
  return out;
}

// One packed matrix, checked and prepared once (float32 scale, the hyb table): the per-call work is the kernel.
class Packed {
 public:
  // words [N/t, K/t, W] (16-bit), scale [N], lut [2^Q, 2] (hyb) or None
  Packed(const at::Tensor& words, const at::Tensor& scale, const c10::optional<at::Tensor>& lut, int64_t bits,
         int64_t L, int64_t V, int64_t tile, const std::string& code, int64_t Q, bool tail_biting)
      : p_(prepare(words, scale, lut, bits, L, V, tile, code, Q, tail_biting)),
        dec_(p_.g, p_.g.code == HYB ? p_.lut.data_ptr<float>() : nullptr) {}

  at::Tensor decode() const { return decode_all(p_, dec_); }
  at::Tensor gemv(const at::Tensor& x, const c10::optional<at::Tensor>& bias) const {
    return gemv_all(p_, dec_, x, bias);
  }
  // x [..., K] -> x W^T + bias [..., N]: float32 x takes the fused GEMV up to max_rows rows, the blocked
  // decode + GEMM above; other dtypes decode the whole matrix and call at::linear in x's dtype (bit-identical
  // to the reference, decode then F.linear)
  at::Tensor linear(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t max_rows) const {
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == p_.K, "trellis linear: x must end in K=", p_.K);
    const int64_t M = x.numel() / p_.K;
    if (x.scalar_type() == at::kFloat && M <= max_rows) {
      std::vector<int64_t> sizes = x.sizes().vec();
      sizes.back() = p_.N;
      return gemv_all(p_, dec_, x.reshape({M, p_.K}), bias).view(sizes);
    }
    if (x.scalar_type() == at::kFloat && (!bias.has_value() || bias->scalar_type() == at::kFloat)) {
      std::vector<int64_t> sizes = x.sizes().vec();
      sizes.back() = p_.N;
      return linear_blocked(p_, dec_, x.reshape({M, p_.K}).contiguous(), bias).view(sizes);
    }
    return at::linear(x, decode().to(x.scalar_type()), bias);
  }
  int64_t out_features() const { return p_.N; }
  int64_t in_features() const { return p_.K; }

 private:
  Prepared p_;
  Decoder dec_;
};

at::Tensor trellis_decode(const at::Tensor& words, const at::Tensor& scale, const c10::optional<at::Tensor>& lut,
                          int64_t bits, int64_t L, int64_t V, int64_t tile, const std::string& code, int64_t Q,
                          bool tail_biting) {
  return Packed(words, scale, lut, bits, L, V, tile, code, Q, tail_biting).decode();
}

at::Tensor trellis_gemv(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& lut, const c10::optional<at::Tensor>& bias, int64_t bits,
                        int64_t L, int64_t V, int64_t tile, const std::string& code, int64_t Q, bool tail_biting) {
  return Packed(words, scale, lut, bits, L, V, tile, code, Q, tail_biting).gemv(x, bias);
}

// code values of the given states (int64 [n]) -> float32 [n, V]: lets tests check every state's value
// code values of the given states (int64 [n]) -> float32 [n, V], by the scalar path or (vector: AVX2
// builds, n a multiple of 8) the vector one: lets tests check every state's value on both
at::Tensor trellis_code_values(const at::Tensor& states, const c10::optional<at::Tensor>& lut, int64_t bits, int64_t L,
                               int64_t V, const std::string& code, int64_t Q, bool vector) {
  const Geo g = make_geo(bits, L, V, 16, code, Q, true);  // a 16x16 tile fits every L
  const at::Tensor s = states.to(at::kLong).contiguous();
  const int64_t n = s.numel();
  at::Tensor lf;
  std::vector<float> table;
  if (g.code == HYB) {
    TORCH_CHECK(lut.has_value() && lut->numel() == (2 << Q), "trellis: hyb needs a [2^Q, 2] LUT");
    lf = lut->to(at::kFloat).contiguous();
    table = hyb_table(lf.data_ptr<float>(), g.Q);
  }
  at::Tensor out = at::empty({n, g.V}, s.options().dtype(at::kFloat));
  const int64_t* sp = s.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  if (vector) {
#ifdef MQ_AVX2
    TORCH_CHECK(n % 8 == 0, "trellis code_values: the vector path takes states 8 at a time");
    const HybConsts hc = g.code == HYB ? hyb_consts(g, table.data()) : HybConsts{};
    alignas(32) uint32_t st[8];
    for (int64_t i = 0; i < n; i += 8) {
      for (int k = 0; k < 8; ++k) st[k] = (uint32_t)sp[i + k] & g.mask;
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(st));
      if (g.code == HYB) {
        __m256 lo, hi;
        hyb8(v, hc.imask, hc.qshift, hc.tab, lo, hi);
        _mm256_storeu_ps(o + 2 * i, lo);
        _mm256_storeu_ps(o + 2 * i + 8, hi);
      } else {
        _mm256_storeu_ps(o + i, g.code == MAD ? mad8(v) : inst8(v));
      }
    }
    return out;
#else
    TORCH_CHECK(false, "trellis code_values: this build has no vector path");
#endif
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t st = (uint32_t)sp[i] & g.mask;
    if (g.code == HYB) {
      const uint32_t k = hyb_index(st, g.Q);
      o[2 * i] = table[2 * k];
      o[2 * i + 1] = table[2 * k + 1];
    } else {
      o[i] = g.code == MAD ? mad_value(st) : inst_value(st);
    }
  }
  return out;
}


}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Packed>(m, "Packed")
      .def(pybind11::init<const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, int64_t,
                          int64_t, int64_t, const std::string&, int64_t, bool>())
      .def("decode", &Packed::decode, "float32 [N, K], bit-identical to trellis_dequant")
      .def("gemv", &Packed::gemv, "x [M, K] float32, bias [N] or None -> x W^T + bias, float32 [M, N]")
      .def("linear", &Packed::linear, "x [..., K], bias [N] or None, max GEMV rows -> x W^T + bias [..., N]")
      .def_property_readonly("out_features", &Packed::out_features)
      .def_property_readonly("in_features", &Packed::in_features);
  m.def("decode", &trellis_decode, "packed trellis words -> float32 [N, K] (bit-identical to trellis_dequant)");
  m.def("gemv", &trellis_gemv, "x [M, K] @ decode(words)^T (+ bias), never the whole matrix");
  m.def("code_values", &trellis_code_values, "the kernels' code value of each state (scalar or vector path)");
  m.def("has_avx2", &moequant::built_with_avx2, "whether the AVX2/FMA/F16C paths were compiled");
}
