// moequant CPU kernels for the additive encoder (codecs/additive.py, codecs/additive_search.py):
//
//   additive_assign(target [B, P, g] f32, blocks [B, g, g] f32, codebook [C, g] f32) -> codes [B, P] int64
//
// = codecs.additive.assign: for every point t of group position b, argmin_c c^T H_b c - 2 (H_b t).c (the nearest
// codeword under the block metric H_b, t^T H_b t dropped), ties to the smallest c as torch's argmin (a NaN score
// never wins, where torch's argmin would pick it: the encoder's inputs are checked finite upstream); scored 8
// codewords at a time against the transposed codebook with a running minimum, never a [P, C] table (1x16's 65,536
// codewords included). Scores are summed in another order than the torch path's GEMM, so a near-tie can go the
// other way.
//
// and the beam search (codecs/additive_search.py, _beam_rows):
//
//   additive_beam(eh [n, K] f32, loss [n] f32, h [K, K] f32, cb [M, C, g] f32, hj [G, g, g] f32, q [M, G, C] f32,
//                 codes [n, G, M] int64, scale [n] f32, beam) -> codes [n, G, M] int64
//
// eh = (w - w_hat) H and loss = (w - w_hat) H (w - w_hat)^T of the start codes (the caller's GEMM). Each row runs its
// own beam, rows in parallel (at::parallel_for), a row's hypotheses in cache: at group j, codebook m, hypothesis i
// with current codeword c_o and u = eh_i[jg .. jg + g), every codeword c of C_m is scored as the torch loop scores
// it, L(c) / s^2 = base / s^2 - (2 / s) v.c + c^T H_JJ c with v = u + s H_JJ c_o and base = L + 2 s c_o.u +
// s^2 c_o^T H_JJ c_o (a row of scale 0: every candidate scores `base`); the `beam` best (hypothesis, codeword) pairs
// survive, ties to the smaller hypothesis-major index, and each survivor's eh is its parent's minus
// s (c - c_o) H[J, jg:] (the columns of the groups not yet passed). The result is the best hypothesis after the last
// step. Same search and the same formulas as the torch loop; the scores are summed in another order than its GEMM,
// so a near-tie can go the other way (tests/kernels/test_additive_encode_kernel.py).
#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// y[k] -= sum_l d[l] * rows[l * ld + k], k < len (rows: g rows of H restricted to the columns not yet passed)
void rank_update(float* y, const float* d, const float* rows, int64_t ld, int64_t g, int64_t len) {
  int64_t k = 0;
#ifdef __AVX2__
  for (; k + 8 <= len; k += 8) {
    __m256 acc = _mm256_loadu_ps(y + k);
    for (int64_t l = 0; l < g; ++l) acc = _mm256_fnmadd_ps(_mm256_set1_ps(d[l]), _mm256_loadu_ps(rows + l * ld + k), acc);
    _mm256_storeu_ps(y + k, acc);
  }
#endif
  for (; k < len; ++k) {
    float acc = y[k];
    for (int64_t l = 0; l < g; ++l) acc -= d[l] * rows[l * ld + k];
    y[k] = acc;
  }
}

// vals[c] = a + b * qv[c] + sum_k lf[k] * cbt[k * C + c], c < C (cbt: the codebook transposed, [g, C])
void score_codewords(const float* lf, int64_t g, float a, float b, const float* qv, const float* cbt, int64_t C,
                     float* vals) {
  int64_t c = 0;
#ifdef __AVX2__
  for (; c + 8 <= C; c += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < g; ++k) acc = _mm256_fmadd_ps(_mm256_set1_ps(lf[k]), _mm256_loadu_ps(cbt + k * C + c), acc);
    acc = _mm256_add_ps(acc, _mm256_fmadd_ps(_mm256_set1_ps(b), _mm256_loadu_ps(qv + c), _mm256_set1_ps(a)));
    _mm256_storeu_ps(vals + c, acc);
  }
#endif
  for (; c < C; ++c) {
    float acc = 0.0f;
    for (int64_t k = 0; k < g; ++k) acc += lf[k] * cbt[k * C + c];
    vals[c] = acc + (a + b * qv[c]);
  }
}

// The `keep` smallest of vals[0 .. count) in ascending order, ties to the smaller index, into (best, where).
int64_t smallest(const float* vals, int64_t count, int64_t keep, float* best, int32_t* where) {
  int64_t size = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float v = std::isnan(vals[i]) ? std::numeric_limits<float>::infinity() : vals[i];  // NaN ranks last
    if (size == keep && !(v < best[size - 1])) continue;  // an equal value later in order loses the tie
    int64_t pos = size < keep ? size++ : keep - 1;
    while (pos > 0 && v < best[pos - 1]) {
      best[pos] = best[pos - 1];
      where[pos] = where[pos - 1];
      --pos;
    }
    best[pos] = v;
    where[pos] = static_cast<int32_t>(i);
  }
  return size;
}

// argmin_c (qv[c] - 2 t.c), c < C, ties to the smallest c (cbt: the codebook transposed, [g, C]). G > 0: g == G
// known at compile time, so the point's G broadcasts -2 t[k] are made once and held in registers across the
// codebook (G = 8, the default group: x1.6 per search); G = 0: any g. Same sums in the same order either way.
template <int G>
int64_t nearest(const float* t, int64_t g, const float* qv, const float* cbt, int64_t C) {
  const int64_t n = G > 0 ? G : g;
  float best = std::numeric_limits<float>::infinity();
  int64_t where = 0;
  int64_t c = 0;
#ifdef __AVX2__
  if (C >= 8) {
    __m256 tk[G > 0 ? G : 1];
    if constexpr (G > 0)
      for (int k = 0; k < G; ++k) tk[k] = _mm256_set1_ps(-2.0f * t[k]);
    __m256 bv = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256i bi = _mm256_setzero_si256();
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32(8);
    for (; c + 8 <= C; c += 8) {
      __m256 acc = _mm256_loadu_ps(qv + c);
      if constexpr (G > 0) {
        for (int k = 0; k < G; ++k) acc = _mm256_fmadd_ps(tk[k], _mm256_loadu_ps(cbt + k * C + c), acc);
      } else {
        for (int64_t k = 0; k < g; ++k)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(-2.0f * t[k]), _mm256_loadu_ps(cbt + k * C + c), acc);
      }
      const __m256 lt = _mm256_cmp_ps(acc, bv, _CMP_LT_OQ);  // strict: a lane keeps its first minimum
      bv = _mm256_blendv_ps(bv, acc, lt);
      bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(idx), lt));
      idx = _mm256_add_epi32(idx, step);
    }
    alignas(32) float vals[8];
    alignas(32) int32_t ids[8];
    _mm256_store_ps(vals, bv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ids), bi);
    for (int u = 0; u < 8; ++u)
      if (vals[u] < best || (vals[u] == best && ids[u] < where)) {
        best = vals[u];
        where = ids[u];
      }
  }
#endif
  for (; c < C; ++c) {
    float acc = qv[c];
#ifdef __AVX2__  // fused as in the vector lanes (one instruction with -mfma), so a tie across the two parts holds
    for (int64_t k = 0; k < n; ++k) acc = std::fma(-2.0f * t[k], cbt[k * C + c], acc);
#else  // no vector part to agree with, and no fused instruction to count on
    for (int64_t k = 0; k < n; ++k) acc += (-2.0f * t[k]) * cbt[k * C + c];
#endif
    if (acc < best) {
      best = acc;
      where = c;
    }
  }
  return where;
}

}  // namespace

at::Tensor additive_assign(const at::Tensor& target, const at::Tensor& blocks, const at::Tensor& codebook) {
  TORCH_CHECK(codebook.dim() == 2 && codebook.scalar_type() == at::kFloat && codebook.is_contiguous(),
              "codebook must be float32 [C, g]");
  const int64_t C = codebook.size(0), g = codebook.size(1);
  TORCH_CHECK(C >= 1 && C < (int64_t{1} << 31) && g >= 1 && g <= 64, "codebook [", C, ", ", g, "] out of range");
  TORCH_CHECK(target.dim() == 3 && target.size(2) == g && target.scalar_type() == at::kFloat && target.is_contiguous(),
              "target must be float32 [B, P, g]");
  const int64_t B = target.size(0), P = target.size(1);
  TORCH_CHECK(blocks.sizes() == at::IntArrayRef({B, g, g}) && blocks.scalar_type() == at::kFloat &&
              blocks.is_contiguous(), "blocks must be float32 [B, g, g]");
  const float* T = target.data_ptr<float>();
  const float* H = blocks.data_ptr<float>();
  const float* CB = codebook.data_ptr<float>();
  at::Tensor out = at::empty({B, P}, target.options().dtype(at::kLong));
  int64_t* O = out.data_ptr<int64_t>();
  std::vector<float> cbt(g * C);  // [g, C]
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < g; ++k) cbt[k * C + c] = CB[c * g + k];
  at::Tensor qall = at::empty({B, C}, target.options());  // c^T H_b c
  float* Q = qall.data_ptr<float>();
  at::parallel_for(0, B * C, 1 << 12, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* h = H + (i / C) * g * g;
      const float* cw = CB + (i % C) * g;
      float acc = 0.0f;
      for (int64_t k = 0; k < g; ++k) {
        float hk = 0.0f;
        for (int64_t l = 0; l < g; ++l) hk += h[k * g + l] * cw[l];
        acc += cw[k] * hk;
      }
      Q[i] = acc;
    }
  });
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C * g, 1));
  at::parallel_for(0, B * P, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> t(g);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / P;
      const float* x = T + i * g;
      const float* h = H + b * g * g;
      for (int64_t k = 0; k < g; ++k) {  // H_b x (H symmetric)
        float acc = 0.0f;
        for (int64_t l = 0; l < g; ++l) acc += h[k * g + l] * x[l];
        t[k] = acc;
      }
      const float* qb = Q + b * C;
      O[i] = g == 8 ? nearest<8>(t.data(), g, qb, cbt.data(), C) : nearest<0>(t.data(), g, qb, cbt.data(), C);
    }
  });
  return out;
}

at::Tensor additive_beam(const at::Tensor& eh0, const at::Tensor& loss0, const at::Tensor& h, const at::Tensor& cb,
                         const at::Tensor& hj, const at::Tensor& q, const at::Tensor& codes, const at::Tensor& scale,
                         int64_t beam) {
  TORCH_CHECK(cb.dim() == 3 && cb.scalar_type() == at::kFloat && cb.is_contiguous(), "cb must be float32 [M, C, g]");
  const int64_t M = cb.size(0), C = cb.size(1), g = cb.size(2);
  TORCH_CHECK(eh0.dim() == 2 && eh0.scalar_type() == at::kFloat && eh0.is_contiguous(), "eh must be float32 [n, K]");
  const int64_t n = eh0.size(0), K = eh0.size(1);
  TORCH_CHECK(g >= 1 && g <= 64 && C >= 1 && K % g == 0, "K = ", K, " is not a multiple of g = ", g,
              " (1 <= g <= 64, C = ", C, " >= 1)");
  const int64_t G = K / g;
  TORCH_CHECK(h.sizes() == at::IntArrayRef({K, K}) && h.scalar_type() == at::kFloat && h.is_contiguous(),
              "h must be float32 [K, K]");
  TORCH_CHECK(hj.sizes() == at::IntArrayRef({G, g, g}) && hj.scalar_type() == at::kFloat && hj.is_contiguous(),
              "hj must be float32 [G, g, g]");
  TORCH_CHECK(q.sizes() == at::IntArrayRef({M, G, C}) && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be float32 [M, G, C]");
  TORCH_CHECK(codes.sizes() == at::IntArrayRef({n, G, M}) && codes.scalar_type() == at::kLong && codes.is_contiguous(),
              "codes must be int64 [n, G, M]");
  TORCH_CHECK(loss0.numel() == n && scale.numel() == n && loss0.scalar_type() == at::kFloat &&
              scale.scalar_type() == at::kFloat && loss0.is_contiguous() && scale.is_contiguous(),
              "loss and scale must be float32 [n]");
  TORCH_CHECK(beam >= 1 && C * beam < (int64_t{1} << 31), "beam = ", beam);
  if (codes.numel() > 0)
    TORCH_CHECK(codes.min().item<int64_t>() >= 0 && codes.max().item<int64_t>() < C, "codes must be in [0, ", C, ")");
  at::Tensor out = at::empty_like(codes);
  const float* E0 = eh0.data_ptr<float>();
  const float* L0 = loss0.data_ptr<float>();
  const float* H = h.data_ptr<float>();
  const float* CB = cb.data_ptr<float>();
  const float* HJ = hj.data_ptr<float>();
  const float* Q = q.data_ptr<float>();
  const int64_t* S0 = codes.data_ptr<int64_t>();
  const float* SC = scale.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  const int64_t GM = G * M;
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> eh(beam * K), eh2(beam * K), loss(beam), loss2(beam), v(g), diff(g);
    std::vector<int32_t> hyp(beam * GM), hyp2(beam * GM);
    std::vector<float> left(beam * (g + 2)), vals(beam * C), best(beam), cbt(M * g * C);
    std::vector<int32_t> where(beam);
    for (int64_t m = 0; m < M; ++m)  // each codebook transposed: [g, C]
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < g; ++k) cbt[(m * g + k) * C + c] = CB[(m * C + c) * g + k];
    for (int64_t row = r0; row < r1; ++row) {
      const float s = SC[row];
      const float safe2 = s == 0.0f ? 1.0f : s * s;
      const float ib = 1.0f / safe2;
      std::copy(E0 + row * K, E0 + (row + 1) * K, eh.begin());
      loss[0] = L0[row];
      for (int64_t k = 0; k < GM; ++k) hyp[k] = static_cast<int32_t>(S0[row * GM + k]);
      int64_t b = 1;
      for (int64_t j = 0; j < G; ++j) {
        const int64_t col = j * g, len = K - col;  // columns not yet passed
        const float* hjj = HJ + j * g * g;
        for (int64_t m = 0; m < M; ++m) {
          const float* cbm = CB + m * C * g;
          const float* qmj = Q + (m * G + j) * C;
          for (int64_t i = 0; i < b; ++i) {  // each hypothesis's left factor [-2 s ib v, base ib, s^2 ib]
            const int32_t cur = hyp[i * GM + j * M + m];
            const float* co = cbm + int64_t{cur} * g;
            const float* u = eh.data() + i * K + col;
            float cu = 0.0f;
            for (int64_t l = 0; l < g; ++l) cu += co[l] * u[l];
            for (int64_t k = 0; k < g; ++k) {
              float a = 0.0f;
              for (int64_t l = 0; l < g; ++l) a += co[l] * hjj[l * g + k];
              v[k] = u[k] + s * a;
            }
            const float base = loss[i] + 2.0f * s * cu + s * s * qmj[cur];
            float* lf = left.data() + i * (g + 2);
            for (int64_t k = 0; k < g; ++k) lf[k] = v[k] * (-2.0f * s * ib);
            lf[g] = base * ib;
            lf[g + 1] = s * s * ib;
          }
          for (int64_t i = 0; i < b; ++i) {  // every (hypothesis, codeword) pair's L(c) / s^2
            const float* lf = left.data() + i * (g + 2);
            score_codewords(lf, g, lf[g], lf[g + 1], qmj, cbt.data() + m * g * C, C, vals.data() + i * C);
          }
          const int64_t nb = smallest(vals.data(), b * C, std::min<int64_t>(beam, b * C), best.data(), where.data());
          for (int64_t t = 0; t < nb; ++t) {  // the survivors: parent's codes and eh, rank-g update
            const int64_t parent = where[t] / C, c = where[t] % C;
            loss2[t] = best[t] * safe2;
            std::memcpy(hyp2.data() + t * GM, hyp.data() + parent * GM, GM * sizeof(int32_t));
            const int32_t cur = hyp[parent * GM + j * M + m];
            hyp2[t * GM + j * M + m] = static_cast<int32_t>(c);
            float* e = eh2.data() + t * K;
            std::copy(eh.data() + parent * K + col, eh.data() + parent * K + K, e + col);
            for (int64_t l = 0; l < g; ++l) diff[l] = s * (cbm[c * g + l] - cbm[int64_t{cur} * g + l]);
            rank_update(e + col, diff.data(), H + col * K + col, K, g, len);
          }
          std::swap(eh, eh2);
          std::swap(hyp, hyp2);
          std::swap(loss, loss2);
          b = nb;
        }
      }
      for (int64_t k = 0; k < GM; ++k) O[row * GM + k] = hyp[k];
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("additive_assign", &additive_assign, "nearest codeword under each point's block metric (additive.assign)");
  m.def("additive_beam", &additive_beam, "beam search of additive codes, one row per task (additive_search)");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
