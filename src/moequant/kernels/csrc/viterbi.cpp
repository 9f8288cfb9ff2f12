// moequant CPU kernel for the trellis encoder's Viterbi search (codecs/trellis.py, _viterbi_chunk):
//
//   viterbi_chunk(feats [b, S, F], table [F, 2^L], L, kv, start_high [b] | empty, end_low [b] | empty,
//                 excluded) -> states int64 [b, S]
//
// The same search as the torch loop, step for step, with the same arithmetic:
//   - the emission cost of state s at step t is sum_k feats[t, k] * table[k, s], computed as torch's GEMM
//     computes mm(feats[:, t], table) here: the first product rounded, then one FMA per further feature;
//   - state s = q * m + i (m = 2^kv new bits i, q in [0, r), r = 2^(L - kv)) has the predecessors
//     p = j * r + q, j in [0, m); its cost is emit[s] + min_j cost[p], one float add as in torch;
//   - ties go to the smallest j (the torch path takes the smallest j whose cost equals the minimum), the
//     final state is the first minimum (argmin), start/end constraints set excluded states to `excluded`.
// viterbi_chunk_half(feats [b, S, 2V], values float16 [V, 2^L], ...) is the same search when the table is
// [values²; values] with fp16-exact values (a HYB LUT's codes; codecs.trellis.viterbi builds that table): the
// squares are formed in registers (one float32 multiply, the rounding torch's square() makes), so the costs are
// bit for bit the table path's, while the state values read per step shrink from 4V to 2V bytes (at L = 16,
// V = 2: 256 KiB instead of 1 MiB), and the values and both cost rows fit a 1 MiB L2 together.
// What the kernel saves is the torch loop's GEMM and dozen passes over [b, 2^L] per step (view, amin, sub,
// clamp, mul, add, amin, add) and their Python dispatch: here a tile runs all its steps on two cost rows of
// 2^L floats that stay in cache, two passes per step: the minimum over j along q, contiguous, four independent
// chunks of 8 lanes at a time (one chunk alone waits on its compare-blend chain), then the emissions with the
// best predecessor added (per-feature broadcasts made once per step). Tiles run in parallel (at::parallel_for).
// Speed (benchmarks/viterbi_speed.py, BENCHMARKS "Encoding speed"): at L = 16 the chains, the hoisted
// broadcasts and the fp16 values together made the kernel 2.7-3x faster than its first version, the same
// states bit for bit.
#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif


namespace {

constexpr int64_t kGrainTiles = 4;

// best[q] = min_j ct[j * r + q], back[q] = the smallest j reaching it (strict <: a tie keeps the smaller j).
void best_predecessors(const float* ct, int64_t r, int64_t m, float* best, uint8_t* back) {
  int64_t q0 = 0;
#ifdef __AVX2__
  // kChains independent chunks of 8 per iteration: each chunk's compare-blend chain is serial in j, so one
  // chunk at a time waits on that chain's latency (measured at L = 16: 4 chains 2.5x one chain, 1 thread)
  constexpr int kChains = 4;
  for (; q0 + 8 * kChains <= r; q0 += 8 * kChains) {
    __m256 bv[kChains], av[kChains];
    for (int c = 0; c < kChains; ++c) {
      bv[c] = _mm256_loadu_ps(ct + q0 + 8 * c);
      av[c] = _mm256_setzero_ps();
    }
    for (int64_t j = 1; j < m; ++j) {
      const __m256 jv = _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(j)));
      for (int c = 0; c < kChains; ++c) {
        const __m256 cv = _mm256_loadu_ps(ct + j * r + q0 + 8 * c);
        const __m256 lower = _mm256_cmp_ps(cv, bv[c], _CMP_LT_OQ);
        bv[c] = _mm256_blendv_ps(bv[c], cv, lower);
        av[c] = _mm256_blendv_ps(av[c], jv, lower);
      }
    }
    for (int c = 0; c < kChains; c += 2) {
      _mm256_storeu_ps(best + q0 + 8 * c, bv[c]);
      _mm256_storeu_ps(best + q0 + 8 * c + 8, bv[c + 1]);
      // sixteen int32 indices (< 256) -> sixteen bytes
      const __m256i ai = _mm256_castps_si256(av[c]), wi = _mm256_castps_si256(av[c + 1]);
      const __m128i lo = _mm_packus_epi32(_mm256_castsi256_si128(ai), _mm256_extracti128_si256(ai, 1));
      const __m128i hi = _mm_packus_epi32(_mm256_castsi256_si128(wi), _mm256_extracti128_si256(wi, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(back + q0 + 8 * c), _mm_packus_epi16(lo, hi));
    }
  }
  for (; q0 + 8 <= r; q0 += 8) {
    __m256 bv = _mm256_loadu_ps(ct + q0);
    __m256i av = _mm256_setzero_si256();
    for (int64_t j = 1; j < m; ++j) {
      const __m256 cv = _mm256_loadu_ps(ct + j * r + q0);
      const __m256 lower = _mm256_cmp_ps(cv, bv, _CMP_LT_OQ);
      bv = _mm256_blendv_ps(bv, cv, lower);
      av = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(av),
                                                _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(j))), lower));
    }
    _mm256_storeu_ps(best + q0, bv);
    // eight int32 indices (< 256) -> eight bytes
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(av), _mm256_extracti128_si256(av, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(back + q0), _mm_packus_epi16(w16, w16));
  }
#endif
  for (int64_t q = q0; q < r; ++q) {
    float bq = ct[q];
    int32_t aq = 0;
    for (int64_t j = 1; j < m; ++j) {
      const float v = ct[j * r + q];
      if (v < bq) {
        bq = v;
        aq = int32_t(j);
      }
    }
    best[q] = bq;
    back[q] = uint8_t(aq);
  }
}

// emit[s] = sum_k f[k] * table[k][s] for s in [s0, s0 + len), the way torch's GEMM computed it on the CPUs
// this was written on: the first product rounded, then one fused multiply-add per further feature, in order.
// (The tests compare the kernel's states with the torch loop's, whose emissions are torch.mm's.)
// With `add`: out[i] = emit + plus, the emission rounded first (as torch adds the best predecessor's cost
// to the GEMM's output).
inline void emissions(const float* f, const float* table, int64_t F, int64_t n, int64_t s0, int64_t len,
                      float* out, bool add = false, float plus = 0.f) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 pv = _mm256_set1_ps(plus);
  for (; i + 8 <= len; i += 8) {
    __m256 acc = _mm256_mul_ps(_mm256_set1_ps(f[0]), _mm256_loadu_ps(table + s0 + i));
    for (int64_t k = 1; k < F; ++k)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(f[k]), _mm256_loadu_ps(table + k * n + s0 + i), acc);
    _mm256_storeu_ps(out + i, add ? _mm256_add_ps(acc, pv) : acc);
  }
#endif
  for (; i < len; ++i) {
    float acc = f[0] * table[s0 + i];
    for (int64_t k = 1; k < F; ++k) acc = std::fma(f[k], table[k * n + s0 + i], acc);
    out[i] = add ? acc + plus : acc;
  }
}

inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));  // the same value _mm256_cvtph_ps gives
}

// The emission costs of the table [values²; values] from fp16 values vh [V, n]: feature k < V multiplies
// value_k², feature V + k multiplies value_k, in the table path's order and rounding (the square rounded to
// float32 first, as the table holds it).
inline void emissions_half(const float* f, const uint16_t* vh, int64_t V, int64_t n, int64_t s0, int64_t len,
                           float* out, bool add = false, float plus = 0.f) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  const __m256 pv = _mm256_set1_ps(plus);
  for (; i + 8 <= len; i += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vh + s0 + i)));
    __m256 acc = _mm256_mul_ps(_mm256_set1_ps(f[0]), _mm256_mul_ps(v, v));
    for (int64_t k = 1; k < V; ++k) {
      v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vh + k * n + s0 + i)));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(f[k]), _mm256_mul_ps(v, v), acc);
    }
    for (int64_t k = 0; k < V; ++k) {
      v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vh + k * n + s0 + i)));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(f[V + k]), v, acc);
    }
    _mm256_storeu_ps(out + i, add ? _mm256_add_ps(acc, pv) : acc);
  }
#endif
  for (; i < len; ++i) {
    float v = half_to_float(vh[s0 + i]);
    float acc = f[0] * (v * v);
    for (int64_t k = 1; k < V; ++k) {
      v = half_to_float(vh[k * n + s0 + i]);
      acc = std::fma(f[k], v * v, acc);
    }
    for (int64_t k = 0; k < V; ++k) acc = std::fma(f[V + k], half_to_float(vh[k * n + s0 + i]), acc);
    out[i] = add ? acc + plus : acc;
  }
}

// The two sources of emission costs. row(): emissions of states [s0, s0 + len) (plus a constant). fused(): one
// step's next[q * m + i] = emission + best[q] for every state, m a multiple of 8 (AVX2 builds; the per-feature
// broadcasts made once per step, not once per q).
struct TableEmitter {
  const float* tb;
  int64_t F, n;
  void row(const float* f, int64_t s0, int64_t len, float* out, bool add, float plus) const {
    emissions(f, tb, F, n, s0, len, out, add, plus);
  }
#ifdef __AVX2__
  void fused(const float* f, const float* best, int64_t r, int64_t m, float* next) const {
    __m256 fb[16];
    if (F > 16) {
      for (int64_t q = 0; q < r; ++q) row(f, q * m, m, next + q * m, true, best[q]);
      return;
    }
    for (int64_t k = 0; k < F; ++k) fb[k] = _mm256_set1_ps(f[k]);
    for (int64_t q = 0; q < r; ++q) {
      const __m256 bq = _mm256_set1_ps(best[q]);
      for (int64_t s = q * m; s < (q + 1) * m; s += 8) {
        __m256 acc = _mm256_mul_ps(fb[0], _mm256_loadu_ps(tb + s));
        for (int64_t k = 1; k < F; ++k) acc = _mm256_fmadd_ps(fb[k], _mm256_loadu_ps(tb + k * n + s), acc);
        _mm256_storeu_ps(next + s, _mm256_add_ps(acc, bq));
      }
    }
  }
#endif
};

struct HalfEmitter {
  const uint16_t* vh;
  int64_t V, n;
  void row(const float* f, int64_t s0, int64_t len, float* out, bool add, float plus) const {
    emissions_half(f, vh, V, n, s0, len, out, add, plus);
  }
#if defined(__AVX2__) && defined(__F16C__)
  void fused(const float* f, const float* best, int64_t r, int64_t m, float* next) const {
    if (V != 2) {  // the common case (2-bit HYB, V = 2) unrolled; others by rows
      for (int64_t q = 0; q < r; ++q) row(f, q * m, m, next + q * m, true, best[q]);
      return;
    }
    const __m256 f0 = _mm256_set1_ps(f[0]), f1 = _mm256_set1_ps(f[1]), f2 = _mm256_set1_ps(f[2]),
                 f3 = _mm256_set1_ps(f[3]);
    const uint16_t* v1p = vh + n;
    for (int64_t q = 0; q < r; ++q) {
      const __m256 bq = _mm256_set1_ps(best[q]);
      for (int64_t s = q * m; s < (q + 1) * m; s += 8) {
        const __m256 v0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vh + s)));
        const __m256 v1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v1p + s)));
        __m256 acc = _mm256_mul_ps(f0, _mm256_mul_ps(v0, v0));
        acc = _mm256_fmadd_ps(f1, _mm256_mul_ps(v1, v1), acc);
        acc = _mm256_fmadd_ps(f2, v0, acc);
        acc = _mm256_fmadd_ps(f3, v1, acc);
        _mm256_storeu_ps(next + s, _mm256_add_ps(acc, bq));
      }
    }
  }
#endif
};

// The search itself, for either source of emission costs.
template <typename Emit>
torch::Tensor search(torch::Tensor feats, const Emit& emit, int64_t L, int64_t kv, torch::Tensor start_high,
                     torch::Tensor end_low, double excluded) {
  const int64_t b = feats.size(0), S = feats.size(1), F = feats.size(2);
  const int64_t n = int64_t(1) << L, m = int64_t(1) << kv, r = n >> kv;
  TORCH_CHECK(S >= 1, "need at least one step");
  const bool has_start = start_high.numel() > 0, has_end = end_low.numel() > 0;
  TORCH_CHECK(!has_start || (start_high.numel() == b && start_high.scalar_type() == torch::kInt64),
              "start_high must be int64 [b]");
  TORCH_CHECK(!has_end || (end_low.numel() == b && end_low.scalar_type() == torch::kInt64),
              "end_low must be int64 [b]");
  const float excl = static_cast<float>(excluded);
  auto sh = has_start ? start_high.contiguous() : start_high;
  auto el = has_end ? end_low.contiguous() : end_low;
  const int64_t* s0 = has_start ? sh.data_ptr<int64_t>() : nullptr;
  const int64_t* e0 = has_end ? el.data_ptr<int64_t>() : nullptr;
  const float* fe = feats.data_ptr<float>();
  auto out = torch::empty({b, S}, torch::kInt64);  // [b, S]
  int64_t* o = out.data_ptr<int64_t>();

  at::parallel_for(0, b, kGrainTiles, [&](int64_t b0, int64_t b1) {
    std::vector<float> cost(n), next(n), best(r);  // [2^L], [2^L], [r]
    std::vector<uint8_t> back(S * r);  // [S, r]: best j per step
    for (int64_t bi = b0; bi < b1; ++bi) {
      const float* ft = fe + bi * S * F;  // [S, F]
      emit.row(ft, 0, n, cost.data(), false, 0.f);
      if (has_start)
        for (int64_t s = 0; s < n; ++s)
          if ((s >> kv) != s0[bi]) cost[s] = excl;
      for (int64_t t = 1; t < S; ++t) {
        best_predecessors(cost.data(), r, m, best.data(), back.data() + t * r);
        if (m >= 8) {  // emission and best predecessor in one pass: next[q * m + i] = emit + best[q]
#ifdef __AVX2__
          emit.fused(ft + t * F, best.data(), r, m, next.data());
#else
          for (int64_t q = 0; q < r; ++q) emit.row(ft + t * F, q * m, m, next.data() + q * m, true, best[q]);
#endif
        } else {
          emit.row(ft + t * F, 0, n, next.data(), false, 0.f);
          for (int64_t q = 0; q < r; ++q)
            for (int64_t i = 0; i < m; ++i) next[q * m + i] += best[q];
        }
        std::swap(cost, next);
      }
      int64_t s = -1;
      float v = 0.f;
      for (int64_t k = 0; k < n; ++k) {
        const float ck = (has_end && (k & (r - 1)) != e0[bi]) ? excl : cost[k];
        if (s < 0 || ck < v) {  // the first minimum, as argmin
          v = ck;
          s = k;
        }
      }
      int64_t* ot = o + bi * S;
      ot[S - 1] = s;
      for (int64_t t = S - 1; t > 0; --t) {
        const int64_t q = s >> kv;
        s = q + int64_t(back[t * r + q]) * r;
        ot[t - 1] = s;
      }
    }
  });
  return out;
}

void check_common(const torch::Tensor& feats, int64_t L, int64_t kv) {
  TORCH_CHECK(feats.dim() == 3 && feats.scalar_type() == torch::kFloat32 && feats.is_contiguous(),
              "feats must be contiguous float32 [b, S, F]");
  TORCH_CHECK(kv >= 1 && kv <= 8 && kv < L && L <= 24, "need 1 <= kv <= min(8, L - 1), L <= 24");
}

torch::Tensor viterbi_chunk(torch::Tensor feats, torch::Tensor table, int64_t L, int64_t kv,
                            torch::Tensor start_high, torch::Tensor end_low, double excluded) {
  check_common(feats, L, kv);
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kFloat32 && table.is_contiguous(),
              "table must be contiguous float32 [F, 2^L]");
  const int64_t F = feats.size(2), n = int64_t(1) << L;
  TORCH_CHECK(table.size(0) == F && table.size(1) == n && F >= 1, "table does not match feats and L");
  return search(feats, TableEmitter{table.data_ptr<float>(), F, n}, L, kv, start_high, end_low, excluded);
}

torch::Tensor viterbi_chunk_half(torch::Tensor feats, torch::Tensor values, int64_t L, int64_t kv,
                                 torch::Tensor start_high, torch::Tensor end_low, double excluded) {
  check_common(feats, L, kv);
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == torch::kHalf && values.is_contiguous(),
              "values must be contiguous float16 [V, 2^L]");
  const int64_t V = values.size(0), n = int64_t(1) << L;
  TORCH_CHECK(V >= 1 && values.size(1) == n && feats.size(2) == 2 * V, "values do not match feats (F = 2V) and L");
  const uint16_t* vh = reinterpret_cast<const uint16_t*>(values.data_ptr<at::Half>());
  return search(feats, HalfEmitter{vh, V, n}, L, kv, start_high, end_low, excluded);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("viterbi_chunk", &viterbi_chunk, "best trellis walks of b tiles (codecs.trellis._viterbi_chunk)");
  m.def("viterbi_chunk_half", &viterbi_chunk_half,
        "the same walks for the table [values^2; values] given its fp16-exact values [V, 2^L]");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
