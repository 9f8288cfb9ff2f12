// moequant CPU kernels for GGUF block tensors (formats/kquant.py: the exact bytes of ggml's block_* structs).
//
//   gguf_dequant(blocks [N, B * block_bytes] uint8, type_id, K)             -> w [N, K] float32
//   gguf_linear(x [..., K] float32, blocks, type_id, K, bias?, gemv_max_rows) -> y [..., N] float32
//
// Decoding is ggml's arithmetic, value for value (codecs/kquant.py: grid_decode): with u the unsigned code,
// s and m the sub-block's scale and offset as single fp32 products (d * sc, dmin * mn),
//   "sym"    (Q2_K..Q8_0 without a min): (u - offset) * s
//   "min"    (Q2_K, Q4_K, Q5_K):           u * s - m   (two roundings: never fused into one FMA)
//   "affine" (Q5_1):                       u * s + m   (likewise)
//   "lut"    (IQ4_NL):                     LUT[u] * s
// so gguf_dequant is bit-identical to the reference decode. Per block, the codes are first unpacked to one
// byte per weight (plain byte loops over fixed spans, which the compiler vectorises), then turned into floats
// 8 at a time (AVX2) or one at a time (other builds).
//
// gguf_linear: up to gemv_max_rows rows of x, a GEMV over 4 rows of x at a time: per sub-block, the integer
// levels (as floats, in registers) dotted with x, times the sub-block scale, and the offset kinds' m times the
// sub-block's sum of x: y = sum_i (s_i sum q x -/+ m_i sum x) (fp32; the reference's value times x, factored
// and summed in another order). More rows: tiles of rows of W are decoded (as gguf_dequant) and multiplied by BLAS into
// their columns of y. Rows of W run in parallel (at::parallel_for).
#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// Weights of W per parallel task (as qgemv.cpp): a small matrix stays on the calling thread.
constexpr int64_t kGrainWeights = 1 << 15;

enum Kind { kSym, kMin, kAffine, kLut };

struct Type {
  int id;  // ggml_type
  int block, bytes, sub;
  Kind kind;
  int offset;  // "sym": level = u - offset
};

// The types decoded here (ggml type ids as codecs/kquant.py's TYPES).
constexpr Type kTypes[] = {
    {10, 256, 84, 16, kMin, 0},      // Q2_K
    {11, 256, 110, 16, kSym, 4},     // Q3_K
    {12, 256, 144, 32, kMin, 0},     // Q4_K
    {13, 256, 176, 32, kMin, 0},     // Q5_K
    {14, 256, 210, 16, kSym, 32},    // Q6_K
    {2, 32, 18, 32, kSym, 8},        // Q4_0
    {6, 32, 22, 32, kSym, 16},       // Q5_0
    {7, 32, 24, 32, kAffine, 0},     // Q5_1
    {8, 32, 34, 32, kSym, 128},      // Q8_0
    {20, 32, 18, 32, kLut, 0},       // IQ4_NL
};

const Type& type_of(int64_t id) {
  for (const Type& t : kTypes)
    if (t.id == id) return t;
  TORCH_CHECK(false, "gguf kernels: no decoder for ggml type ", id);
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// One block unpacked: u[i] the code of weight i, then (levels()) q[i] its integer level: u - offset ("sym"),
// LUT[u] ("lut"), u itself ("min", "affine"), every one in int8 range; s / m the scale / offset of each
// sub-block. The weight is q * s, q * s - m or q * s + m.
struct Unpacked {
  alignas(32) uint8_t u[256];
  alignas(32) int8_t q[256];
  float s[16];
  float m[16];
};

constexpr int8_t kIq4nlLevels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

void levels(const Type& t, Unpacked& o) {
  if (t.kind == kLut) {
    for (int l = 0; l < t.block; ++l) o.q[l] = kIq4nlLevels[o.u[l] & 15];
  } else {
    const int off = t.kind == kSym ? t.offset : 0;
    for (int l = 0; l < t.block; ++l) o.q[l] = static_cast<int8_t>(static_cast<int>(o.u[l]) - off);
  }
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 scale bytes (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& mn) {
  if (j < 4) {
    sc = q[j] & 63;
    mn = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The 2-bit fields of Q2_K / Q3_K qs[64]: byte 32h + l holds u[128h + 32j + l] at bits 2j.
inline void crumbs(const uint8_t* qs, uint8_t* u) {
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) u[128 * h + 32 * j + l] = (qs[32 * h + l] >> (2 * j)) & 3;
}

// Q4_0 / IQ4_NL / Q5_0 / Q5_1: qs[16] nib(u[l], u[l + 16]); Q5_x: bit i of the LE uint32 qh is bit 4 of u[i].
inline void nibbles32(const uint8_t* qs, uint8_t* u) {
  for (int l = 0; l < 16; ++l) {
    u[l] = qs[l] & 15;
    u[l + 16] = qs[l] >> 4;
  }
}

inline void high_bits32(const uint8_t* qh, uint8_t* u) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  for (int i = 0; i < 32; ++i) u[i] |= ((h >> i) & 1) << 4;
}

void unpack(const Type& t, const uint8_t* b, Unpacked& o) {
  switch (t.id) {
    case 8: {  // Q8_0: d; qs[32] int8 = u - 128
      o.s[0] = half_at(b);
      for (int l = 0; l < 32; ++l) o.u[l] = b[2 + l] ^ 0x80;
      break;
    }
    case 2:
    case 20:  // Q4_0, IQ4_NL: d; qs[16]
      o.s[0] = half_at(b);
      nibbles32(b + 2, o.u);
      break;
    case 6:  // Q5_0: d; qh[4]; qs[16]
      o.s[0] = half_at(b);
      nibbles32(b + 6, o.u);
      high_bits32(b + 2, o.u);
      break;
    case 7:  // Q5_1: d, m; qh[4]; qs[16]
      o.s[0] = half_at(b);
      o.m[0] = half_at(b + 2);
      nibbles32(b + 8, o.u);
      high_bits32(b + 4, o.u);
      break;
    case 12:
    case 13: {  // Q4_K: d, dmin, scales[12], qs[128]; Q5_K: d, dmin, scales[12], qh[32], qs[128]
      const float d = half_at(b), dmin = half_at(b + 2);
      const uint8_t* sc = b + 4;
      for (int j = 0; j < 8; ++j) {
        int s, m;
        scale_min_k4(j, sc, s, m);
        o.s[j] = d * static_cast<float>(s);
        o.m[j] = dmin * static_cast<float>(m);
      }
      const uint8_t* qs = b + (t.id == 12 ? 16 : 48);
      for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
          o.u[64 * c + l] = qs[32 * c + l] & 15;
          o.u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
      if (t.id == 13) {
        const uint8_t* qh = b + 16;  // bit j of byte l is bit 4 of u[32j + l]
        for (int j = 0; j < 8; ++j)
          for (int l = 0; l < 32; ++l) o.u[32 * j + l] |= ((qh[l] >> j) & 1) << 4;
      }
      break;
    }
    case 14: {  // Q6_K: ql[128], qh[64], scales[16] int8, d
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const float d = half_at(b + 208);
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 64; ++l) {
          o.u[128 * h + l] = ql[64 * h + l] & 15;
          o.u[128 * h + 64 + l] = ql[64 * h + l] >> 4;
        }
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 32; ++l) o.u[128 * h + 32 * j + l] |= ((qh[32 * h + l] >> (2 * j)) & 3) << 4;
      for (int i = 0; i < 16; ++i) o.s[i] = d * static_cast<float>(static_cast<int8_t>(b[192 + i]));
      break;
    }
    case 10: {  // Q2_K: scales[16] (sc | mn << 4), qs[64], d, dmin
      const float d = half_at(b + 80), dmin = half_at(b + 82);
      crumbs(b + 16, o.u);
      for (int i = 0; i < 16; ++i) {
        o.s[i] = d * static_cast<float>(b[i] & 15);
        o.m[i] = dmin * static_cast<float>(b[i] >> 4);
      }
      break;
    }
    case 11: {  // Q3_K: hmask[32], qs[64], scales[12], d
      const uint8_t* hm = b;
      const uint8_t* sc = b + 96;
      const float d = half_at(b + 108);
      crumbs(b + 32, o.u);
      for (int j = 0; j < 8; ++j)  // bit j of byte l is bit 2 of u[32j + l]
        for (int l = 0; l < 32; ++l) o.u[32 * j + l] |= ((hm[l] >> j) & 1) << 2;
      int v[16];
      for (int i = 0; i < 8; ++i) {
        v[i] = sc[i] & 15;
        v[i + 8] = sc[i] >> 4;
      }
      for (int k = 0; k < 4; ++k)  // byte 8 + i holds v[4k + i] >> 4 at bits 2k
        for (int i = 0; i < 4; ++i) v[4 * k + i] |= ((sc[8 + i] >> (2 * k)) & 3) << 4;
      for (int i = 0; i < 16; ++i) o.s[i] = d * static_cast<float>(v[i] - 32);
      break;
    }
    default:
      TORCH_CHECK(false, "gguf kernels: no decoder for ggml type ", t.id);
  }
}

// unpack + levels, with the byte shuffling of the two types of K-quant tables (Q6_K heads, Q4_K embeddings) in
// AVX2 registers, 32 weights per step; the other types through the plain loops.
void load_block(const Type& t, const uint8_t* b, Unpacked& o) {
#ifdef __AVX2__
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  if (t.id == 14) {  // Q6_K: q = (ql nibble | qh crumb << 4) - 32
    const __m256i m0 = _mm256_set1_epi8(0x03), m1 = _mm256_set1_epi8(0x0C), m2 = _mm256_set1_epi8(0x30),
                  m3 = _mm256_set1_epi8(static_cast<char>(0xC0)), k32 = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
      const __m256i a_hi = _mm256_and_si256(_mm256_srli_epi16(a, 4), lo4), c_hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), lo4);
      const __m256i v0 = _mm256_or_si256(_mm256_and_si256(a, lo4), _mm256_slli_epi16(_mm256_and_si256(qh, m0), 4));
      const __m256i v1 = _mm256_or_si256(_mm256_and_si256(c, lo4), _mm256_slli_epi16(_mm256_and_si256(qh, m1), 2));
      const __m256i v2 = _mm256_or_si256(a_hi, _mm256_and_si256(qh, m2));
      const __m256i v3 = _mm256_or_si256(c_hi, _mm256_srli_epi16(_mm256_and_si256(qh, m3), 2));
      int8_t* q = o.q + 128 * h;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_sub_epi8(v0, k32));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32), _mm256_sub_epi8(v1, k32));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 64), _mm256_sub_epi8(v2, k32));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 96), _mm256_sub_epi8(v3, k32));
    }
    const float d = half_at(b + 208);
    for (int i = 0; i < 16; ++i) o.s[i] = d * static_cast<float>(static_cast<int8_t>(b[192 + i]));
    return;
  }
  if (t.id == 12) {  // Q4_K: q = u (a "min" type), qs byte 32c + l = nib(u[64c + l], u[64c + 32 + l])
    const float d = half_at(b), dmin = half_at(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      scale_min_k4(j, b + 4, sc, mn);
      o.s[j] = d * static_cast<float>(sc);
      o.m[j] = dmin * static_cast<float>(mn);
    }
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.q + 64 * c), _mm256_and_si256(v, lo4));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.q + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4));
    }
    return;
  }
#endif
  unpack(t, b, o);
  levels(t, o);
}

// Keep a product rounded on its own (no FMA contraction with the following add/sub).
template <class T>
inline void rounded(T& v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__ volatile("" : "+x"(v));
#else
  volatile T t = v;
  v = t;
#endif
}

inline float value_scalar(Kind kind, int q, float s, float m) {
  if (kind == kSym || kind == kLut) return static_cast<float>(q) * s;
  float p = static_cast<float>(q) * s;
  rounded(p);
  return kind == kMin ? p - m : p + m;
}

// The block's values, in order, into w[block] (the reference's arithmetic: q * s, then - m or + m).
void block_values(const Type& t, const Unpacked& o, float* w) {
  const int subs = t.block / t.sub;
  const bool offset = t.kind == kMin || t.kind == kAffine;
  for (int i = 0; i < subs; ++i) {
    const float s = o.s[i], m = offset ? o.m[i] : 0.0f;
    const int8_t* q = o.q + i * t.sub;
    float* out = w + i * t.sub;
    int l = 0;
#ifdef __AVX2__
    const __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(m);
    for (; l + 8 <= t.sub; l += 8) {
      __m256 p = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + l)))), sv);
      if (offset) {
        rounded(p);
        p = t.kind == kMin ? _mm256_sub_ps(p, mv) : _mm256_add_ps(p, mv);
      }
      _mm256_storeu_ps(out + l, p);
    }
#endif
    for (; l < t.sub; ++l) out[l] = value_scalar(t.kind, q[l], s, m);
  }
}

// One row of W (K / block blocks) -> w[K].
void decode_row(const Type& t, const uint8_t* row, int64_t K, float* w, Unpacked& scratch) {
  for (int64_t b = 0; b < K / t.block; ++b) {
    load_block(t, row + b * t.bytes, scratch);
    block_values(t, scratch, w + b * t.block);
  }
}

struct Geometry {
  const Type* t;
  int64_t N, K, row_bytes;
};

// GEMV: y[r] = sum over sub-blocks i of (s_i * sum_{l in i} q_l x[r][l]  -/+  m_i * xs[r][i]), the codes turned
// into floats in registers and never stored; xs[r][i] the sum of x[r] over sub-block i (offset kinds only).
template <int R>
void row_dot(const Geometry& g, const uint8_t* row, const float* x, const float* xs, float* out, Unpacked& o) {
  const Type& t = *g.t;
  const int subs = t.block / t.sub;
  const int64_t K = g.K, S = K / t.sub;
  const bool offset = t.kind == kMin || t.kind == kAffine;
  float off_acc[R] = {};
#ifdef __AVX2__
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
#else
  float acc[R] = {};
#endif
  for (int64_t b = 0; b < K / t.block; ++b) {
    load_block(t, row + b * t.bytes, o);
    for (int i = 0; i < subs; ++i) {
      const int64_t k0 = b * t.block + i * t.sub;
      const int8_t* q = o.q + i * t.sub;
#ifdef __AVX2__
      __m256 tv[R];
      for (int r = 0; r < R; ++r) tv[r] = _mm256_setzero_ps();
      for (int l = 0; l < t.sub; l += 8) {
        const __m256 qf =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + l))));
        for (int r = 0; r < R; ++r) tv[r] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(x + r * K + k0 + l), tv[r]);
      }
      const __m256 sv = _mm256_set1_ps(o.s[i]);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(sv, tv[r], acc[r]);
#else
      for (int r = 0; r < R; ++r) {
        float ts = 0.0f;
        for (int l = 0; l < t.sub; ++l) ts += static_cast<float>(q[l]) * x[r * K + k0 + l];
        acc[r] += o.s[i] * ts;
      }
#endif
      if (offset)
        for (int r = 0; r < R; ++r) off_acc[r] += o.m[i] * xs[r * S + b * subs + i];
    }
  }
  const float sign = t.kind == kMin ? -1.0f : 1.0f;
  for (int r = 0; r < R; ++r) {
#ifdef __AVX2__
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    const float a = _mm_cvtss_f32(h);
#else
    const float a = acc[r];
#endif
    out[r] = offset ? a + sign * off_acc[r] : a;
  }
}

Geometry check(const at::Tensor& blocks, int64_t type_id, int64_t K) {
  const Type& t = type_of(type_id);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.device().is_cpu(), "blocks must be a contiguous uint8 CPU tensor [N, bytes], got ",
              blocks.sizes());
  TORCH_CHECK(K > 0 && K % t.block == 0, "K = ", K, " is not a multiple of the ", t.block, "-weight block");
  TORCH_CHECK(blocks.size(1) == K / t.block * t.bytes, "blocks must have ", K / t.block * t.bytes,
              " bytes per row for K = ", K, ", got ", blocks.size(1));
  return Geometry{&t, blocks.size(0), K, blocks.size(1)};
}

int64_t grain_rows(const Geometry& g) { return std::max<int64_t>(1, kGrainWeights / g.K); }

void dequant_rows(const Geometry& g, const uint8_t* raw, int64_t r0, int64_t r1, float* w) {
  at::parallel_for(r0, r1, grain_rows(g), [&](int64_t n0, int64_t n1) {
    Unpacked scratch;
    for (int64_t n = n0; n < n1; ++n) decode_row(*g.t, raw + n * g.row_bytes, g.K, w + (n - r0) * g.K, scratch);
  });
}

at::Tensor gguf_dequant(const at::Tensor& blocks, int64_t type_id, int64_t K) {
  const Geometry g = check(blocks, type_id, K);
  at::Tensor w = at::empty({g.N, K}, at::TensorOptions().dtype(at::kFloat));  // [N, K]
  dequant_rows(g, blocks.data_ptr<uint8_t>(), 0, g.N, w.data_ptr<float>());
  return w;
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t type_id, int64_t K,
                       const c10::optional<at::Tensor>& bias, int64_t gemv_max_rows) {
  const Geometry g = check(blocks, type_id, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == K,
              "x must be a float32 CPU tensor [..., ", K, "], got ", x.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == g.N && bias->is_contiguous(),
                "bias must be a contiguous float32 [", g.N, "]");
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();  // [M, K]
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = g.N;
  const uint8_t* raw = blocks.data_ptr<uint8_t>();
  at::Tensor y;
  if (M > gemv_max_rows) {  // decode tiles of W, BLAS into their columns of y
    y = at::empty({M, g.N}, x2.options());
    const int64_t T = moequant::gemm_tile_rows(g.N, K);
    at::Tensor w = at::empty({std::max<int64_t>(T, 1), K}, x2.options());  // [T, K], reused per tile
    for (int64_t n0 = 0; n0 < g.N; n0 += T) {
      const int64_t rows = std::min(T, g.N - n0);
      dequant_rows(g, raw, n0, n0 + rows, w.data_ptr<float>());
      at::Tensor out = y.narrow(1, n0, rows);  // [M, rows], row stride N
      at::mm_out(out, x2, w.narrow(0, 0, rows).t());
    }
    if (bias.has_value()) y.add_(*bias);
    return y.reshape(out_shape);
  }
  y = at::empty({M, g.N}, x2.options());
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t S = K / g.t->sub;
  std::vector<float> xs(M * S, 0.0f);  // [M, S]: x summed over each sub-block (offset kinds)
  if (g.t->kind == kMin || g.t->kind == kAffine)
    for (int64_t r = 0; r < M; ++r)
      for (int64_t i = 0; i < S; ++i) {
        float a = 0.0f;
        for (int64_t l = 0; l < g.t->sub; ++l) a += xp[r * K + i * g.t->sub + l];
        xs[r * S + i] = a;
      }
  at::parallel_for(0, g.N, grain_rows(g), [&](int64_t n0, int64_t n1) {
    Unpacked scratch;
    float out[4];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = raw + n * g.row_bytes;
      const float b = bp ? bp[n] : 0.0f;
      for (int64_t r0 = 0; r0 < M; r0 += 4) {
        const int64_t R = std::min<int64_t>(4, M - r0);
        const float* xr = xp + r0 * K;
        const float* sr = xs.data() + r0 * S;
        switch (R) {
          case 4: row_dot<4>(g, row, xr, sr, out, scratch); break;
          case 3: row_dot<3>(g, row, xr, sr, out, scratch); break;
          case 2: row_dot<2>(g, row, xr, sr, out, scratch); break;
          default: row_dot<1>(g, row, xr, sr, out, scratch); break;
        }
        for (int64_t r = 0; r < R; ++r) yp[(r0 + r) * g.N + n] = out[r] + b;
      }
    }
  });
  return y.reshape(out_shape);
}

bool supports(int64_t type_id) {
  for (const Type& t : kTypes)
    if (t.id == type_id) return true;
  return false;
}


}  // namespace

// gguf_linear as a dispatcher op too (moequant_ext::gguf_linear), for torch.compile graphs (kernels/cpp_ops.py).
TORCH_LIBRARY_FRAGMENT(moequant_ext, m) {
  m.def("gguf_linear(Tensor x, Tensor blocks, int type_id, int in_features, Tensor? bias, int gemv_max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(moequant_ext, CPU, m) { m.impl("gguf_linear", &gguf_linear); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_dequant", &gguf_dequant, "GGUF blocks [N, bytes] -> float32 [N, K], ggml's decode bit for bit");
  m.def("gguf_linear", &gguf_linear, "x [..., K] float32 times the GGUF block matrix -> [..., N]");
  m.def("supports", &supports, "whether a ggml type id is decoded here");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
