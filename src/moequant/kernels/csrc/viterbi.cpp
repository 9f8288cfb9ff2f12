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
// What the kernel saves is the torch loop's GEMM and dozen passes over [b, 2^L] per step (view, amin, sub,
// clamp, mul, add, amin, add) and their Python dispatch: here a tile runs all its steps on two cost rows of
// 2^L floats that stay in cache, one pass per step (the minimum over j runs along q, contiguous, 8 lanes at
// a time). Tiles run in parallel (at::parallel_for).
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

// best[q] = min_j ct[j * r + q], arg[q] = the smallest j reaching it (strict <: a tie keeps the smaller j).
void best_predecessors(const float* ct, int64_t r, int64_t m, float* best, int32_t* arg) {
  int64_t q0 = 0;
#ifdef __AVX2__
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
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(arg + q0), av);
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
    arg[q] = aq;
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

torch::Tensor viterbi_chunk(torch::Tensor feats, torch::Tensor table, int64_t L, int64_t kv,
                            torch::Tensor start_high, torch::Tensor end_low, double excluded) {
  TORCH_CHECK(feats.dim() == 3 && feats.scalar_type() == torch::kFloat32 && feats.is_contiguous(),
              "feats must be contiguous float32 [b, S, F]");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kFloat32 && table.is_contiguous(),
              "table must be contiguous float32 [F, 2^L]");
  TORCH_CHECK(kv >= 1 && kv <= 8 && kv < L && L <= 24, "need 1 <= kv <= min(8, L - 1), L <= 24");
  const int64_t b = feats.size(0), S = feats.size(1), F = feats.size(2);
  const int64_t n = int64_t(1) << L, m = int64_t(1) << kv, r = n >> kv;
  TORCH_CHECK(table.size(0) == F && table.size(1) == n && F >= 1, "table does not match feats and L");
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
  const float* tb = table.data_ptr<float>();
  auto out = torch::empty({b, S}, torch::kInt64);  // [b, S]
  int64_t* o = out.data_ptr<int64_t>();

  at::parallel_for(0, b, kGrainTiles, [&](int64_t b0, int64_t b1) {
    std::vector<float> cost(n), next(n), best(r);  // [2^L], [2^L], [r]
    std::vector<int32_t> arg(r);
    std::vector<uint8_t> back(S * r);  // [S, r]: best j per step
    for (int64_t bi = b0; bi < b1; ++bi) {
      const float* ft = fe + bi * S * F;  // [S, F]
      emissions(ft, tb, F, n, 0, n, cost.data());
      if (has_start)
        for (int64_t s = 0; s < n; ++s)
          if ((s >> kv) != s0[bi]) cost[s] = excl;
      for (int64_t t = 1; t < S; ++t) {
        best_predecessors(cost.data(), r, m, best.data(), arg.data());
        uint8_t* bt = back.data() + t * r;
        for (int64_t q = 0; q < r; ++q) bt[q] = uint8_t(arg[q]);
        if (m >= 8) {  // emission and best predecessor in one pass: next[q * m + i] = emit + best[q]
          for (int64_t q = 0; q < r; ++q) emissions(ft + t * F, tb, F, n, q * m, m, next.data() + q * m, true, best[q]);
        } else {
          emissions(ft + t * F, tb, F, n, 0, n, next.data());
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("viterbi_chunk", &viterbi_chunk, "best trellis walks of b tiles (codecs.trellis._viterbi_chunk)");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
