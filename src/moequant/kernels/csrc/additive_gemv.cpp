// moequant CPU kernels for the AQLM additive format `additive-packed` (formats/additive.py has the layout,
// codecs/additive.py the math). One 2-D matrix W [N, K] of G = K/g groups per row, M codebooks C_m [2^B, g]:
//
//   W[n, jg + e] = s[n] * sum_m C_m[b[n, j, m], e]               (fp32, codewords added m = 0 .. M-1)
//   y[t, n]      = s[n] * sum_j sum_m x[t, jg:(j+1)g] . C_m[b[n, j, m]]   (+ bias[n])
//
// Codes: each row's G*M codes in the order (group, codebook), their low min(B, 8) bits packed at that width,
// then (B > 8) their high B - 8 bits. A bitpack chunk of `per` codes fills its bytes exactly, so each part is
// one little-endian bit stream: code i sits at bits [i*b, (i+1)*b). Codes are read from the stored bytes inside
// the kernels (`row_codes`); nothing is unpacked ahead of a call.
//
// Paths, by the number of rows T of x (`additive_linear`; the measurements are in kernels/additive.py):
//   - table GEMV (T <= gemv_max_rows where `table_pays`): per block of up to 8 rows of x, the table
//     P[j, m, c, t] = x[t, jg:(j+1)g] . C_m[c] of every input group against every codeword, fp32, built a chunk of
//     (group, codebook) slots at a time (kTableFloats: L2-resident) and swept over every row of W; each output is
//     s[n] times the sum of the G*M entries its codes pick. T*K*M*2^B multiply-adds for the table, G*M loads
//     (one vector of the T rows each) per output row; no weight is ever formed.
//   - codeword GEMV (T <= gemv_max_rows otherwise, e.g. 1x16: a table of 2^16 codewords costs ~40x a dense
//     GEMV): per output row, each group's codewords summed in registers (the decode) and multiplied into per-row
//     partial sums.
//   - dequant + GEMM (more rows): tiles of rows decoded to fp32, bit-identical to codecs.additive.reconstruct,
//     and multiplied by BLAS into their columns of y; never the whole matrix at once.
// The GEMVs add in another order than the reference (decode, then F.linear): float32 reordering only.
// Codebooks are read as stored (fp16; fp32 / bf16 accepted). The AVX2 paths: the codeword GEMV and the decode
// for g a multiple of 8, the table for any geometry; the rest (and builds without AVX2) run scalar loops.
#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MQ_AVX2 1
#endif

namespace {

constexpr int64_t kGrainWork = 1 << 15;      // multiply-adds (or loads) per parallel task, at least
constexpr int64_t kMaxBlock = 8;             // rows of x per GEMV pass (the table's innermost dim, padded)
constexpr int64_t kTableFloats = 1 << 15;    // one table chunk: 128 KiB of fp32 (L2-resident; measured)

// ---------------------------------------------------------------------------------------------------
// geometry and code reading
// ---------------------------------------------------------------------------------------------------

int64_t packed_len(int64_t n, int64_t bits) {
  int64_t g = 1;
  for (int64_t d = 1; d <= 8; ++d)
    if (bits % d == 0 && 8 % d == 0) g = d;
  return (n + 8 / g - 1) / (8 / g) * (bits / g);
}

struct Geometry {
  int64_t N, K, M, B, g, G, C, GM, low_bytes, row_bytes;
};

Geometry make_geometry(int64_t N, int64_t K, int64_t M, int64_t B, int64_t g) {
  TORCH_CHECK(M >= 1 && M <= 8 && B >= 1 && B <= 16 && g >= 1 && g <= 64, "additive: M 1-8, B 1-16, g 1-64, got ",
              M, "x", B, " g", g);
  TORCH_CHECK(K >= 1 && K % g == 0, "additive: K=", K, " is not a multiple of the group size ", g);
  Geometry geo{N, K, M, B, g, K / g, int64_t{1} << B, 0, 0, 0};
  geo.GM = geo.G * M;
  geo.low_bytes = packed_len(geo.GM, std::min<int64_t>(B, 8));
  geo.row_bytes = geo.low_bytes + (B > 8 ? packed_len(geo.GM, B - 8) : 0);
  return geo;
}

// Code i of a little-endian stream of b-bit codes (b <= 8: at most two bytes, both inside the stream).
inline uint32_t stream_code(const uint8_t* p, int64_t i, int64_t b) {
  const int64_t bit = i * b, byte = bit >> 3, sh = bit & 7;
  uint32_t v = p[byte];
  if (sh + b > 8) v |= static_cast<uint32_t>(p[byte + 1]) << 8;
  return (v >> sh) & ((1u << b) - 1u);
}

// Codes [i0, i1) of a row -> out[i - i0] = code[i] * unit (unit 1: the codes; a table's entry width: offsets).
void row_codes(const Geometry& geo, const uint8_t* row, int64_t i0, int64_t i1, int64_t unit, uint32_t* out) {
  const int64_t lb = std::min<int64_t>(geo.B, 8);
  if (lb == 8) {
    for (int64_t i = i0; i < i1; ++i) out[i - i0] = static_cast<uint32_t>(row[i]);
  } else {
    for (int64_t i = i0; i < i1; ++i) out[i - i0] = stream_code(row, i, lb);
  }
  if (geo.B > 8) {
    const uint8_t* hi = row + geo.low_bytes;
    const int64_t hb = geo.B - 8;
    for (int64_t i = i0; i < i1; ++i)
      out[i - i0] |= (hb == 8 ? static_cast<uint32_t>(hi[i]) : stream_code(hi, i, hb)) << 8;
  }
  if (unit != 1)
    for (int64_t i = 0; i < i1 - i0; ++i) out[i] *= static_cast<uint32_t>(unit);
}

// ---------------------------------------------------------------------------------------------------
// reading codebook values
// ---------------------------------------------------------------------------------------------------

inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }

#ifdef MQ_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// scale (any float dtype) -> fp32 [N]
std::vector<float> scales_f32(const at::Tensor& scale) {
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const float* p = s.data_ptr<float>();
  return std::vector<float>(p, p + s.numel());
}

// ---------------------------------------------------------------------------------------------------
// table GEMV
// ---------------------------------------------------------------------------------------------------

// TP consecutive fp32 values as one register (TP = 1, 2, 4, 8 with AVX2; an array otherwise): the table's
// entries for the rows of x are contiguous, so one lookup is one load.
template <int TP>
struct Lanes {
  float v[TP];
  static Lanes zero() { Lanes r; for (int t = 0; t < TP; ++t) r.v[t] = 0.0f; return r; }
  static Lanes load(const float* p) { Lanes r; for (int t = 0; t < TP; ++t) r.v[t] = p[t]; return r; }
  static Lanes bcast(float a) { Lanes r; for (int t = 0; t < TP; ++t) r.v[t] = a; return r; }
  Lanes add(const Lanes& o) const { Lanes r; for (int t = 0; t < TP; ++t) r.v[t] = v[t] + o.v[t]; return r; }
  Lanes fma(const Lanes& a, const Lanes& b) const {  // this + a * b
    Lanes r; for (int t = 0; t < TP; ++t) r.v[t] = v[t] + a.v[t] * b.v[t]; return r;
  }
  Lanes mul(const Lanes& o) const { Lanes r; for (int t = 0; t < TP; ++t) r.v[t] = v[t] * o.v[t]; return r; }
  void store(float* p) const { for (int t = 0; t < TP; ++t) p[t] = v[t]; }
};
#ifdef MQ_AVX2
template <>
struct Lanes<8> {
  __m256 v;
  static Lanes zero() { return {_mm256_setzero_ps()}; }
  static Lanes load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Lanes bcast(float a) { return {_mm256_set1_ps(a)}; }
  Lanes add(const Lanes& o) const { return {_mm256_add_ps(v, o.v)}; }
  Lanes fma(const Lanes& a, const Lanes& b) const { return {_mm256_fmadd_ps(a.v, b.v, v)}; }
  Lanes mul(const Lanes& o) const { return {_mm256_mul_ps(v, o.v)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
template <>
struct Lanes<4> {
  __m128 v;
  static Lanes zero() { return {_mm_setzero_ps()}; }
  static Lanes load(const float* p) { return {_mm_loadu_ps(p)}; }
  static Lanes bcast(float a) { return {_mm_set1_ps(a)}; }
  Lanes add(const Lanes& o) const { return {_mm_add_ps(v, o.v)}; }
  Lanes fma(const Lanes& a, const Lanes& b) const { return {_mm_fmadd_ps(a.v, b.v, v)}; }
  Lanes mul(const Lanes& o) const { return {_mm_mul_ps(v, o.v)}; }
  void store(float* p) const { _mm_storeu_ps(p, v); }
};
template <>
struct Lanes<2> {  // the low half of an xmm register
  __m128 v;
  static Lanes zero() { return {_mm_setzero_ps()}; }
  static Lanes load(const float* p) { return {_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))}; }
  static Lanes bcast(float a) { return {_mm_set1_ps(a)}; }
  Lanes add(const Lanes& o) const { return {_mm_add_ps(v, o.v)}; }
  Lanes fma(const Lanes& a, const Lanes& b) const { return {_mm_fmadd_ps(a.v, b.v, v)}; }
  Lanes mul(const Lanes& o) const { return {_mm_mul_ps(v, o.v)}; }
  void store(float* p) const { _mm_store_sd(reinterpret_cast<double*>(p), _mm_castps_pd(v)); }
};
#endif

// The codebooks as fp32 [M, C, g] (`rows`, for tables of several rows of x) or transposed to [M, g, C] (`cols`,
// one row of x: 8 codewords' e-th values per vector).
template <class CB>
std::vector<float> books_f32(const Geometry& geo, const CB* books, bool transposed) {
  const int64_t C = geo.C, g = geo.g, n = geo.M * C * g;
  std::vector<float> rows(n);
  int64_t i = 0;
#ifdef MQ_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(rows.data() + i, load8(books + i));
#endif
  for (; i < n; ++i) rows[i] = to_f32(books[i]);
  if (!transposed) return rows;
  std::vector<float> cols(n);
  for (int64_t m = 0; m < geo.M; ++m)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t e = 0; e < g; ++e) cols[(m * g + e) * C + c] = rows[(m * C + c) * g + e];
  return cols;
}

// Table entries of slots [i0, i1) (slot i = group i / M, codebook i % M) for the TP rows of x:
// tab[(i - i0) * C * TP + c * TP + t] = x[t, jg:(j+1)g] . C_m[c], the products added in e order.
// TP = 1: x [K] and `cols` [M, g, C], 8 codewords per vector. TP > 1: xt [G, g, TP] (x transposed per group,
// rows past T zero) and `rows` [M, C, g], the TP rows of x per vector (the entries land in table order).
template <int TP>
void build_table(const Geometry& geo, const float* books, const float* xs, int64_t i0, int64_t i1, float* tab) {
  const int64_t C = geo.C, g = geo.g, M = geo.M;
  at::parallel_for(i0, i1, std::max<int64_t>(1, kGrainWork / (C * g * TP)), [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i) {
      const int64_t j = i / M;
      const float* cb = books + (i % M) * C * g;  // cols [g, C] or rows [C, g] of codebook i % M
      float* dst = tab + (i - i0) * C * TP;
      if constexpr (TP == 1) {
        const float* xg = xs + j * g;
        int64_t c = 0;
#ifdef MQ_AVX2
        for (; c + 8 <= C; c += 8) {
          __m256 acc = _mm256_mul_ps(_mm256_set1_ps(xg[0]), _mm256_loadu_ps(cb + c));
          for (int64_t e = 1; e < g; ++e)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(xg[e]), _mm256_loadu_ps(cb + e * C + c), acc);
          _mm256_storeu_ps(dst + c, acc);
        }
#endif
        for (; c < C; ++c) {
          float acc = xg[0] * cb[c];
          for (int64_t e = 1; e < g; ++e) acc += xg[e] * cb[e * C + c];
          dst[c] = acc;
        }
      } else {
        using L = Lanes<TP>;
        const float* xt = xs + j * g * TP;  // [g, TP]
        for (int64_t c = 0; c < C; ++c) {
          const float* w = cb + c * g;
          L acc = L::bcast(w[0]).mul(L::load(xt));
          for (int64_t e = 1; e < g; ++e) acc = acc.fma(L::bcast(w[e]), L::load(xt + e * TP));
          acc.store(dst + c * TP);
        }
      }
    }
  });
}

// acc[n * TP + t] += the entries of slots [i0, i1) (tab as build_table) that row n's codes pick.
template <int TP>
void table_sums(const Geometry& geo, const uint8_t* codes, const float* tab, int64_t i0, int64_t i1, float* acc) {
  const int64_t step = geo.C * TP, len = i1 - i0;
  at::parallel_for(0, geo.N, std::max<int64_t>(1, kGrainWork / len), [&](int64_t n0, int64_t n1) {
    std::vector<uint32_t> off(len);
    for (int64_t n = n0; n < n1; ++n) {
      row_codes(geo, codes + n * geo.row_bytes, i0, i1, TP, off.data());  // code * TP
      const uint32_t* o = off.data();
      const float* p = tab;  // the entries of slot i0 + i
      using L = Lanes<TP>;
      L a0 = L::zero(), a1 = L::zero(), a2 = L::zero(), a3 = L::zero();
      int64_t i = 0;
      for (; i + 4 <= len; i += 4, p += 4 * step) {
        a0 = a0.add(L::load(p + o[i]));
        a1 = a1.add(L::load(p + step + o[i + 1]));
        a2 = a2.add(L::load(p + 2 * step + o[i + 2]));
        a3 = a3.add(L::load(p + 3 * step + o[i + 3]));
      }
      for (; i < len; ++i, p += step) a0 = a0.add(L::load(p + o[i]));
      L::load(acc + n * TP).add(a0.add(a1).add(a2.add(a3))).store(acc + n * TP);
    }
  });
}

// Slots per table chunk: at most kTableFloats entries (at least one slot).
int64_t table_chunk(const Geometry& geo, int64_t TP) { return std::max<int64_t>(1, kTableFloats / (geo.C * TP)); }

// y [T, N] = s * x W^T for T <= TP rows of x [T, K]: tables of chunks of slots, each swept over every row.
template <int TP, class CB>
void table_gemv(const Geometry& geo, const uint8_t* codes, const CB* books, const float* sc, const float* x, int64_t T,
                float* y) {
  const std::vector<float> cb = books_f32(geo, books, TP == 1);
  std::vector<float> xt(TP == 1 ? 0 : geo.K * TP, 0.0f);  // [G, g, TP] = x transposed per group
  for (int64_t t = 0; t < T && TP > 1; ++t)
    for (int64_t k = 0; k < geo.K; ++k) xt[k * TP + t] = x[t * geo.K + k];
  const float* xs = TP == 1 ? x : xt.data();
  const int64_t chunk = table_chunk(geo, TP);
  std::vector<float> tab(std::min(chunk, geo.GM) * geo.C * TP);  // [slots, C, TP]
  std::vector<float> acc(geo.N * TP, 0.0f);                       // [N, TP]
  for (int64_t i0 = 0; i0 < geo.GM; i0 += chunk) {
    const int64_t i1 = std::min(geo.GM, i0 + chunk);
    build_table<TP>(geo, cb.data(), xs, i0, i1, tab.data());
    table_sums<TP>(geo, codes, tab.data(), i0, i1, acc.data());
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < geo.N; ++n) y[t * geo.N + n] = sc[n] * acc[n * TP + t];
}

// table_gemv for up to kMaxBlock rows of x, the table's row count padded to 1, 2, 4 or 8.
template <class CB>
void table_block(const Geometry& geo, const uint8_t* codes, const CB* books, const float* sc, const float* x,
                 int64_t T, float* y) {
  if (T <= 1) return table_gemv<1>(geo, codes, books, sc, x, T, y);
  if (T <= 2) return table_gemv<2>(geo, codes, books, sc, x, T, y);
  if (T <= 4) return table_gemv<4>(geo, codes, books, sc, x, T, y);
  table_gemv<8>(geo, codes, books, sc, x, T, y);
}

// ---------------------------------------------------------------------------------------------------
// codeword GEMV and decode
// ---------------------------------------------------------------------------------------------------

#ifdef MQ_AVX2
// sum_m C_m[code_m][e : e + 8] in fp32, added m = 0 .. M-1; off[m] = code_m * g, mstride = 2^B * g.
template <class CB>
inline __m256 codeword_sum8(const CB* books, const uint32_t* off, int64_t M, int64_t mstride, int64_t e) {
  __m256 v = load8(books + off[0] + e);
  for (int64_t m = 1; m < M; ++m) v = _mm256_add_ps(v, load8(books + m * mstride + off[m] + e));
  return v;
}

// out[t] = sum_j x[t, group j] . (sum_m C_m[code]) for one row and T rows of x (g a multiple of 8).
template <int T, class CB>
void row_dot_vec(const Geometry& geo, const uint32_t* off, const CB* books, const float* x, float* out) {
  const int64_t g = geo.g, M = geo.M, ms = geo.C * geo.g, K = geo.K;
  __m256 a0[T], a1[T];  // two accumulators per row of x, alternate vectors: two dependency chains
  for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
  int64_t v = 0;  // vector index along the row
  for (int64_t j = 0; j < geo.G; ++j) {
    const uint32_t* oj = off + j * M;
    for (int64_t e = 0; e < g; e += 8, ++v) {
      const __m256 w = codeword_sum8(books, oj, M, ms, e);
      const float* xe = x + j * g + e;
      if (v & 1) {
        for (int t = 0; t < T; ++t) a1[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + t * K), w, a1[t]);
      } else {
        for (int t = 0; t < T; ++t) a0[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + t * K), w, a0[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = hsum(_mm256_add_ps(a0[t], a1[t]));
}
#endif

template <class CB>
void row_dot(const Geometry& geo, const uint32_t* off, const CB* books, const float* x, int64_t T, float* out) {
  const int64_t g = geo.g, M = geo.M, ms = geo.C * geo.g, K = geo.K;
#ifdef MQ_AVX2
  if (g % 8 == 0) {
    switch (T) {
      case 1: return row_dot_vec<1>(geo, off, books, x, out);
      case 2: return row_dot_vec<2>(geo, off, books, x, out);
      case 3: return row_dot_vec<3>(geo, off, books, x, out);
      case 4: return row_dot_vec<4>(geo, off, books, x, out);
      case 5: return row_dot_vec<5>(geo, off, books, x, out);
      case 6: return row_dot_vec<6>(geo, off, books, x, out);
      case 7: return row_dot_vec<7>(geo, off, books, x, out);
      default: return row_dot_vec<8>(geo, off, books, x, out);
    }
  }
#endif
  float w[64];
  for (int64_t t = 0; t < T; ++t) out[t] = 0.0f;
  for (int64_t j = 0; j < geo.G; ++j) {
    const uint32_t* oj = off + j * M;
    for (int64_t e = 0; e < g; ++e) {
      float v = to_f32(books[oj[0] + e]);
      for (int64_t m = 1; m < M; ++m) v += to_f32(books[m * ms + oj[m] + e]);
      w[e] = v;
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* xg = x + t * K + j * g;
      float s = 0.0f;
      for (int64_t e = 0; e < g; ++e) s += xg[e] * w[e];
      out[t] += s;
    }
  }
}

template <class CB>
void codeword_gemv(const Geometry& geo, const uint8_t* codes, const CB* books, const float* sc, const float* x,
                   int64_t T, float* y) {
  at::parallel_for(0, geo.N, std::max<int64_t>(1, kGrainWork / (geo.K * geo.M)), [&](int64_t n0, int64_t n1) {
    std::vector<uint32_t> off(geo.GM);
    float out[kMaxBlock];
    for (int64_t n = n0; n < n1; ++n) {
      row_codes(geo, codes + n * geo.row_bytes, 0, geo.GM, geo.g, off.data());
      for (int64_t t0 = 0; t0 < T; t0 += kMaxBlock) {
        const int64_t tb = std::min(kMaxBlock, T - t0);
        row_dot(geo, off.data(), books, x + t0 * geo.K, tb, out);
        for (int64_t t = 0; t < tb; ++t) y[(t0 + t) * geo.N + n] = sc[n] * out[t];
      }
    }
  });
}

// Rows [r0, r1) -> w [r1 - r0, K] fp32: s * (C_0[b] + C_1[b] + ...), as codecs.additive.reconstruct rounds it.
template <class CB>
void decode_rows(const Geometry& geo, const uint8_t* codes, const CB* books, const float* sc, int64_t r0, int64_t r1,
                 float* w) {
  const int64_t g = geo.g, M = geo.M, ms = geo.C * geo.g;
  at::parallel_for(r0, r1, std::max<int64_t>(1, kGrainWork / (geo.K * geo.M)), [&](int64_t n0, int64_t n1) {
    std::vector<uint32_t> off(geo.GM);
    const uint32_t* o = off.data();
    const CB* bk = books;
    const int64_t G = geo.G, K = geo.K;
    for (int64_t n = n0; n < n1; ++n) {
      row_codes(geo, codes + n * geo.row_bytes, 0, geo.GM, g, off.data());
      float* wr = w + (n - r0) * K;
      for (int64_t j = 0; j < G; ++j) {
        const uint32_t* oj = o + j * M;
        float* wj = wr + j * g;
        int64_t e = 0;
#ifdef MQ_AVX2
        const __m256 s8 = _mm256_set1_ps(sc[n]);
        for (; e + 8 <= g; e += 8) _mm256_storeu_ps(wj + e, _mm256_mul_ps(s8, codeword_sum8(bk, oj, M, ms, e)));
#endif
        for (; e < g; ++e) {
          float v = to_f32(bk[oj[0] + e]);
          for (int64_t m = 1; m < M; ++m) v += to_f32(bk[m * ms + oj[m] + e]);
          wj[e] = sc[n] * v;
        }
      }
    }
  });
}

// Many rows of x: tiles of rows of W (common.h's gemm_tile_rows), each decoded to fp32 and multiplied by BLAS
// into its columns of y [T, N].
template <class CB>
void dequant_gemm(const Geometry& geo, const uint8_t* codes, const CB* books, const float* sc, const at::Tensor& x,
                  at::Tensor& y) {
  const int64_t rows = moequant::gemm_tile_rows(geo.N, geo.K);
  at::Tensor w = at::empty({rows, geo.K}, x.options());  // [rows, K], reused per tile
  for (int64_t n0 = 0; n0 < geo.N; n0 += rows) {
    const int64_t r = std::min(rows, geo.N - n0);
    decode_rows(geo, codes, books, sc, n0, n0 + r, w.data_ptr<float>());
    at::Tensor out = y.narrow(1, n0, r);  // [T, r], row stride N
    at::mm_out(out, x, w.narrow(0, 0, r).t());
  }
}

// ---------------------------------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------------------------------

enum Path { kAuto = 0, kTable = 1, kCodeword = 2, kGemm = 3 };

Geometry checked(const at::Tensor& codes, const at::Tensor& books, const at::Tensor& scale, int64_t M, int64_t B,
                 int64_t g, int64_t K) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "additive: codes must be contiguous CPU uint8 [N, R]");
  const Geometry geo = make_geometry(codes.size(0), K, M, B, g);
  TORCH_CHECK(codes.size(1) == geo.row_bytes, "additive: codes rows hold ", codes.size(1), " bytes, expected ",
              geo.row_bytes);
  TORCH_CHECK(books.device().is_cpu() && books.is_contiguous() && books.dim() == 3 && books.size(0) == M &&
                  books.size(1) == geo.C && books.size(2) == g,
              "additive: codebooks must be contiguous CPU [M, 2^B, g]");
  const auto dt = books.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kFloat || dt == at::kBFloat16, "additive: codebooks must be fp16/bf16/fp32");
  TORCH_CHECK(scale.device().is_cpu() && scale.numel() == geo.N && at::isFloatingType(scale.scalar_type()),
              "additive: scale must be a CPU float tensor [N]");
  return geo;
}

template <class F>
void with_books(const at::Tensor& books, F&& f) {
  switch (books.scalar_type()) {
    case at::kHalf: f(books.data_ptr<c10::Half>()); break;
    case at::kBFloat16: f(books.data_ptr<c10::BFloat16>()); break;
    default: f(books.data_ptr<float>()); break;
  }
}

// Does the table GEMV beat the codeword GEMV for T rows of x? Its table costs T*K*M*2^B multiply-adds and is
// shared by the N rows; measured (kernels/additive.py): with 2*M*2^B <= N it wins at every T <= 8, with
// M*2^B <= 2N at T = 1 only. Codebooks of more than kTableFloats / 8 codewords (1x16) never take it: a chunk
// would hold a single slot, each swept over every row.
bool table_pays(const Geometry& geo, int64_t T) {
  if (geo.C * kMaxBlock > kTableFloats) return false;
  const int64_t books = geo.M * geo.C;
  return T <= 1 ? books <= 2 * geo.N : 2 * books <= geo.N;
}

// x [..., K] any float dtype -> y [..., N] in x's dtype. path: kAuto (dequant + GEMM beyond gemv_max_rows rows,
// else the table GEMV where `table_pays`, else the codeword GEMV) or one forced path.
at::Tensor additive_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& books,
                           const at::Tensor& scale, const c10::optional<at::Tensor>& bias, int64_t M, int64_t B,
                           int64_t g, int64_t K, int64_t gemv_max_rows, int64_t path) {
  const Geometry geo = checked(codes, books, scale, M, B, g, K);
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()) && x.dim() >= 1 && x.size(-1) == K,
              "additive: x must be a CPU float tensor [..., K]");
  at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();  // [T, K]
  const int64_t T = x2.size(0);
  const std::vector<float> sc = scales_f32(scale);
  at::Tensor y = at::empty({T, geo.N}, x2.options());  // [T, N]
  if (path == kAuto) path = T > gemv_max_rows ? kGemm : (table_pays(geo, std::min(T, kMaxBlock)) ? kTable : kCodeword);
  if (T > 0 && geo.N > 0) {
    const uint8_t* c = codes.data_ptr<uint8_t>();
    const float* xp = x2.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    with_books(books, [&](auto* cb) {
      if (path == kGemm) {
        dequant_gemm(geo, c, cb, sc.data(), x2, y);
      } else if (path == kCodeword) {
        codeword_gemv(geo, c, cb, sc.data(), xp, T, yp);
      } else {
        for (int64_t t0 = 0; t0 < T; t0 += kMaxBlock)
          table_block(geo, c, cb, sc.data(), xp + t0 * K, std::min(kMaxBlock, T - t0), yp + t0 * geo.N);
      }
    });
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == geo.N, "additive: bias must have N elements");
    y.add_(bias->to(at::kFloat).reshape({geo.N}));
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = geo.N;
  y = y.view(shape);  // [..., N]
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The whole matrix -> fp32 [N, K], bit-identical to codecs.additive.reconstruct (tests, and for reference).
at::Tensor additive_dequant(const at::Tensor& codes, const at::Tensor& books, const at::Tensor& scale, int64_t M,
                            int64_t B, int64_t g, int64_t K) {
  const Geometry geo = checked(codes, books, scale, M, B, g, K);
  const std::vector<float> sc = scales_f32(scale);
  at::Tensor w = at::empty({geo.N, K}, at::TensorOptions().dtype(at::kFloat));  // [N, K]
  with_books(books, [&](auto* cb) { decode_rows(geo, codes.data_ptr<uint8_t>(), cb, sc.data(), 0, geo.N,
                                                w.data_ptr<float>()); });
  return w;
}


}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("additive_linear", &additive_linear,
        "y = x W^T (+ b) from packed additive codes: table / codeword GEMV or dequant + GEMM (path 0 auto, 1-3 forced)");
  m.def("table_pays", [](int64_t N, int64_t K, int64_t M, int64_t B, int64_t g, int64_t T) {
    return table_pays(make_geometry(N, K, M, B, g), T);
  }, "the automatic choice of the table GEMV for T rows of x");
  m.def("additive_dequant", &additive_dequant, "packed additive codes -> fp32 [N, K] (codecs.additive.reconstruct)");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
