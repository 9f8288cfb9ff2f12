// moequant CPU kernels for BCJR-QAT's soft trellis (finetune/bcjr.py): the two step-by-step recursions of a chunk
// of tiles, which the torch path runs as a Python loop of small ops per step.
//
//   bcjr_alpha_beta(scores [S, b, n] f32, f, overlap [b] int64 | empty) -> (alpha, beta [S, b, n], lse [S, b, r])
//     = finetune.bcjr._forward_backward: with m = 2^f, r = n / m, the predecessors of state q*m + c are j*r + q
//     (j < m) and its successors (q mod r)*m + c';
//       alpha_0 = scores_0 (states whose sigma >> f != overlap: NEG), lse_t[q] = logsumexp_j alpha_{t-1}[j*r + q],
//       alpha_t[q*m + c] = scores_t[q*m + c] + lse_t[q];
//       beta_{S-1} = 0 (states whose sigma mod r != overlap: NEG),
//       beta_t[j*r + q] = logsumexp_c (scores_{t+1} + beta_{t+1})[q*m + c] for every j.
//   bcjr_expectations(c, scores, alpha, beta [S, b, n], lse [S, b, r], f) -> (fwd, bwd [S, b, n])
//     = the two loops of finetune.bcjr._chunk_grads, with the transition weights made on the fly instead of the
//       [S-1, b, m, r] tensors: w_prev = exp(alpha_{t-1}[j*r + q] - lse_t[q]),
//       w_next = exp((scores + beta)_{t+1}[q*m + c] - beta_t[q]);
//       fwd_0 = c_0, fwd_t[q*m + c'] = c_t[q*m + c'] + sum_j w_prev * fwd_{t-1}[j*r + q];
//       bwd_{S-1} = 0, bwd_t[j*r + q] = sum_c w_next * (bwd_{t+1} + c_{t+1})[q*m + c] for every j.
// logsumexp is max + log(sum exp(v - max)) as bcjr._lse computes it, every exponent floored at kExpFloor first (as
// there). exp is a vectorised Cephes-style polynomial (within ~2 ulp of expf on [-87, 88]) under AVX2, std::exp
// otherwise, so the results agree with the torch path to float rounding, not bit for bit
// (tests/kernels/test_bcjr_kernel.py). Tiles are independent: at::parallel_for over b, each tile walking its S steps
// with its rows in cache.
#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr float kExpFloor = -87.0f;  // finetune.bcjr._EXP_FLOOR
constexpr int64_t kGrainTiles = 8;

#ifdef __AVX2__
// e^x for x in [kExpFloor, 88]: x = k ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes expf), times 2^k.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpFloor)), _mm256_set1_ps(88.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact k * hi
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));  // k >= -126 here: 2^k is a normal float
}
#endif

inline float exp1(float x) { return std::exp(std::max(x, kExpFloor)); }

// out[q] = logsumexp_j rows[j * r + q], j < m (rows: m rows of r floats, contiguous); the maximum first, then the
// floored exps summed in j order.
void lse_rows(const float* rows, int64_t m, int64_t r, float* out, float* scratch) {
  float* mx = scratch;  // [r]
  float* sum = scratch + r;  // [r]
  std::copy(rows, rows + r, mx);
  for (int64_t j = 1; j < m; ++j)
    for (int64_t q = 0; q < r; ++q) mx[q] = std::max(mx[q], rows[j * r + q]);
  int64_t q0 = 0;
#ifdef __AVX2__
  for (; q0 + 8 <= r; q0 += 8) {
    const __m256 mv = _mm256_loadu_ps(mx + q0);
    __m256 s = exp8(_mm256_sub_ps(_mm256_loadu_ps(rows + q0), mv));
    for (int64_t j = 1; j < m; ++j) s = _mm256_add_ps(s, exp8(_mm256_sub_ps(_mm256_loadu_ps(rows + j * r + q0), mv)));
    _mm256_storeu_ps(sum + q0, s);
  }
#endif
  for (; q0 < r; ++q0) {
    float s = exp1(rows[q0] - mx[q0]);
    for (int64_t j = 1; j < m; ++j) s += exp1(rows[j * r + q0] - mx[q0]);
    sum[q0] = s;
  }
  for (int64_t q = 0; q < r; ++q) out[q] = std::log(sum[q]) + mx[q];
}

// out[q] = logsumexp_c (a + b)[q * m + c], c < m: the m-wide groups of one row (a, b: n = r * m floats).
void lse_groups(const float* a, const float* b, int64_t m, int64_t r, float* out) {
  for (int64_t q = 0; q < r; ++q) {
    const float* x = a + q * m;
    const float* y = b + q * m;
    float mx = x[0] + y[0];
    for (int64_t c = 1; c < m; ++c) mx = std::max(mx, x[c] + y[c]);
    float s = 0.0f;
    for (int64_t c = 0; c < m; ++c) s += exp1((x[c] + y[c]) - mx);
    out[q] = std::log(s) + mx;
  }
}

struct Dims {
  int64_t S, b, n, m, r;
};

Dims check(const at::Tensor& t, int64_t f, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(),
              what, " must be a contiguous float32 CPU tensor [S, b, n], got ", t.sizes());
  const int64_t n = t.size(2);
  TORCH_CHECK(f >= 1 && f < 31 && n >= (int64_t{1} << f) && n % (int64_t{1} << f) == 0,
              "f = ", f, " does not fit n = ", n, " states");
  return {t.size(0), t.size(1), n, int64_t{1} << f, n >> f};
}

}  // namespace

std::vector<at::Tensor> bcjr_alpha_beta(const at::Tensor& scores, int64_t f, const at::Tensor& overlap) {
  const Dims d = check(scores, f, "scores");
  const bool masked = overlap.numel() > 0;
  if (masked)
    TORCH_CHECK(overlap.dim() == 1 && overlap.size(0) == d.b && overlap.scalar_type() == at::kLong,
                "overlap must be int64 [b] or empty");
  at::Tensor alpha = at::empty_like(scores);
  at::Tensor beta = at::empty_like(scores);
  at::Tensor lse = at::zeros({d.S, d.b, d.r}, scores.options());
  const float* sc = scores.data_ptr<float>();
  float* al = alpha.data_ptr<float>();
  float* be = beta.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  const int64_t* ov = masked ? overlap.data_ptr<int64_t>() : nullptr;
  const float neg = -1e30f;  // finetune.bcjr._NEG
  const int64_t row = d.b * d.n;  // one step of [b, n]
  at::parallel_for(0, d.b, kGrainTiles, [&](int64_t j0, int64_t j1) {
    std::vector<float> scratch(2 * d.r), nxt(d.r);
    for (int64_t j = j0; j < j1; ++j) {
      float* a0 = al + j * d.n;
      std::copy(sc + j * d.n, sc + (j + 1) * d.n, a0);
      if (masked)
        for (int64_t s = 0; s < d.n; ++s)
          if ((s >> f) != ov[j]) a0[s] = neg;
      for (int64_t t = 1; t < d.S; ++t) {
        float* lt = ls + (t * d.b + j) * d.r;
        lse_rows(al + (t - 1) * row + j * d.n, d.m, d.r, lt, scratch.data());
        const float* st = sc + t * row + j * d.n;
        float* at = al + t * row + j * d.n;
        for (int64_t q = 0; q < d.r; ++q)
          for (int64_t c = 0; c < d.m; ++c) at[q * d.m + c] = st[q * d.m + c] + lt[q];
      }
      float* bl = be + (d.S - 1) * row + j * d.n;
      for (int64_t s = 0; s < d.n; ++s) bl[s] = masked && (s & (d.r - 1)) != ov[j] ? neg : 0.0f;
      for (int64_t t = d.S - 2; t >= 0; --t) {
        lse_groups(sc + (t + 1) * row + j * d.n, be + (t + 1) * row + j * d.n, d.m, d.r, nxt.data());
        float* bt = be + t * row + j * d.n;
        for (int64_t k = 0; k < d.m; ++k) std::copy(nxt.begin(), nxt.end(), bt + k * d.r);
      }
    }
  });
  return {alpha, beta, lse};
}

std::vector<at::Tensor> bcjr_expectations(const at::Tensor& c, const at::Tensor& scores, const at::Tensor& alpha,
                                          const at::Tensor& beta, const at::Tensor& lse, int64_t f) {
  const Dims d = check(c, f, "c");
  for (const at::Tensor* t : {&scores, &alpha, &beta})
    TORCH_CHECK(t->sizes() == c.sizes() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "scores, alpha and beta must be contiguous float32 like c ", c.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.S && lse.size(1) == d.b && lse.size(2) == d.r &&
              lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be float32 [S, b, r]");
  at::Tensor fwd = at::empty_like(c);
  at::Tensor bwd = at::empty_like(c);
  const float* cc = c.data_ptr<float>();
  const float* sc = scores.data_ptr<float>();
  const float* al = alpha.data_ptr<float>();
  const float* be = beta.data_ptr<float>();
  const float* ls = lse.data_ptr<float>();
  float* fw = fwd.data_ptr<float>();
  float* bw = bwd.data_ptr<float>();
  const int64_t row = d.b * d.n;
  at::parallel_for(0, d.b, kGrainTiles, [&](int64_t j0, int64_t j1) {
    std::vector<float> mean(d.r), w(d.n);
    for (int64_t j = j0; j < j1; ++j) {
      std::copy(cc + j * d.n, cc + (j + 1) * d.n, fw + j * d.n);
      for (int64_t t = 1; t < d.S; ++t) {
        const float* ap = al + (t - 1) * row + j * d.n;
        const float* lt = ls + (t * d.b + j) * d.r;
        const float* fp = fw + (t - 1) * row + j * d.n;
        int64_t i0 = 0;
#ifdef __AVX2__
        for (int64_t k = 0; k < d.m; ++k)
          for (int64_t q0 = 0; q0 + 8 <= d.r; q0 += 8)
            _mm256_storeu_ps(w.data() + k * d.r + q0,
                             exp8(_mm256_sub_ps(_mm256_loadu_ps(ap + k * d.r + q0), _mm256_loadu_ps(lt + q0))));
        i0 = d.r / 8 * 8;
#endif
        for (int64_t k = 0; k < d.m; ++k)
          for (int64_t q = i0; q < d.r; ++q) w[k * d.r + q] = exp1(ap[k * d.r + q] - lt[q]);
        for (int64_t q = 0; q < d.r; ++q) mean[q] = w[q] * fp[q];
        for (int64_t k = 1; k < d.m; ++k)
          for (int64_t q = 0; q < d.r; ++q) mean[q] += w[k * d.r + q] * fp[k * d.r + q];
        const float* ct = cc + t * row + j * d.n;
        float* ft = fw + t * row + j * d.n;
        for (int64_t q = 0; q < d.r; ++q)
          for (int64_t x = 0; x < d.m; ++x) ft[q * d.m + x] = ct[q * d.m + x] + mean[q];
      }
      float* bl = bw + (d.S - 1) * row + j * d.n;
      std::fill(bl, bl + d.n, 0.0f);
      for (int64_t t = d.S - 2; t >= 0; --t) {
        const float* sn = sc + (t + 1) * row + j * d.n;
        const float* bn = be + (t + 1) * row + j * d.n;
        const float* bt = be + t * row + j * d.n;  // beta_t[q] = beta_t[0 * r + q]
        const float* cn = cc + (t + 1) * row + j * d.n;
        const float* wn = bw + (t + 1) * row + j * d.n;
        int64_t i1 = 0;
#ifdef __AVX2__
        for (; i1 + 8 <= d.n; i1 += 8) {
          alignas(32) float base[8];
          for (int u = 0; u < 8; ++u) base[u] = bt[(i1 + u) / d.m];
          _mm256_storeu_ps(w.data() + i1, exp8(_mm256_sub_ps(
              _mm256_add_ps(_mm256_loadu_ps(sn + i1), _mm256_loadu_ps(bn + i1)), _mm256_load_ps(base))));
        }
#endif
        for (; i1 < d.n; ++i1) w[i1] = exp1((sn[i1] + bn[i1]) - bt[i1 / d.m]);
        for (int64_t q = 0; q < d.r; ++q) {
          float s = w[q * d.m] * (wn[q * d.m] + cn[q * d.m]);
          for (int64_t x = 1; x < d.m; ++x) s += w[q * d.m + x] * (wn[q * d.m + x] + cn[q * d.m + x]);
          mean[q] = s;
        }
        float* out = bw + t * row + j * d.n;
        for (int64_t k = 0; k < d.m; ++k) std::copy(mean.begin(), mean.end(), out + k * d.r);
      }
    }
  });
  return {fwd, bwd};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bcjr_alpha_beta", &bcjr_alpha_beta, "log-space alpha, beta and the forward's lse of a chunk of tiles");
  m.def("bcjr_expectations", &bcjr_expectations, "E[G up to t | state] and E[G after t | state] of a chunk");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
