// moequant CPU kernels for BCJR-QAT's soft trellis (finetune/bcjr.py): bcjr_soft, the whole pass one tile at a time
// (see its comment below), and the two step-by-step recursions of a chunk of tiles, which the torch path runs as a
// Python loop of small ops per step:
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
// there). exp and log are vectorised Cephes-style polynomials (within ~2 ulp of expf on [-87, 88], ~1 ulp of logf
// on the sums' range [1, 2^31)) under AVX2, std::exp / std::log otherwise, so the results agree with the torch path
// to float rounding, not bit for bit (tests/kernels/test_bcjr_kernel.py); bcjr_hard_path (no exp or log) returns the
// torch path's walks exactly. Tiles are independent: at::parallel_for over b, each tile walking its S steps
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
// ln x for x in [1, 2^31) (a sum of exps whose largest is 1): x = 2^e m, m in [sqrt(1/2), sqrt(2)), ln m by the
// Cephes logf polynomial in m - 1, plus e ln2 in two parts (within ~1 ulp of logf there).
inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
  const __m256 low = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(_mm256_set1_ps(1.0f), low));
  m = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_and_ps(m, low));  // 2m - 1 or m - 1
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}
#endif

// v[q] = ln v[q], q < n (each v[q] in [1, 2^31): a sum of floored exps whose largest term is 1).
void log_inplace(float* v, int64_t n) {
  int64_t q = 0;
#ifdef __AVX2__
  for (; q + 8 <= n; q += 8) _mm256_storeu_ps(v + q, log8(_mm256_loadu_ps(v + q)));
#endif
  for (; q < n; ++q) v[q] = std::log(v[q]);
}

inline float exp1(float x) { return std::exp(std::max(x, kExpFloor)); }

// out[s] = exp(x[s] - y[s]) (floored), s < n; out may be y.
void exp_diff(const float* x, const float* y, float* out, int64_t n) {
  int64_t s = 0;
#ifdef __AVX2__
  for (; s + 8 <= n; s += 8) _mm256_storeu_ps(out + s, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + s), _mm256_loadu_ps(y + s))));
#endif
  for (; s < n; ++s) out[s] = exp1(x[s] - y[s]);
}

// out[q] = logsumexp_j rows[j * r + q], j < m (rows: m rows of r floats, contiguous, n = m r): the maximum first,
// then the floored exps of all n floats at once (a vector pass whatever r is; going along q, r < 8 — F - f < 3 —
// filled no lane), summed in j order. Scratch: mx [r], e and base [n] each.
void lse_rows(const float* rows, int64_t m, int64_t r, float* out, float* mx, float* e, float* base) {
  std::copy(rows, rows + r, mx);
  for (int64_t j = 1; j < m; ++j)
    for (int64_t q = 0; q < r; ++q) mx[q] = std::max(mx[q], rows[j * r + q]);
  for (int64_t j = 0; j < m; ++j) std::copy(mx, mx + r, base + j * r);
  exp_diff(rows, base, e, m * r);
  for (int64_t j = 1; j < m; ++j)  // e's first row collects the sums
    for (int64_t q = 0; q < r; ++q) e[q] += e[j * r + q];
  log_inplace(e, r);
  for (int64_t q = 0; q < r; ++q) out[q] = e[q] + mx[q];
}

// out[q] = logsumexp_c (a + b)[q * m + c], c < m: the m-wide groups of one row (a, b: n = r * m floats); z, e:
// scratch of n floats each.
void lse_groups(const float* a, const float* b, int64_t m, int64_t r, float* out, float* z, float* e) {
  const int64_t n = r * m;
  for (int64_t s = 0; s < n; ++s) z[s] = a[s] + b[s];
  for (int64_t q = 0; q < r; ++q) {
    float mx = z[q * m];
    for (int64_t c = 1; c < m; ++c) mx = std::max(mx, z[q * m + c]);
    for (int64_t c = 0; c < m; ++c) e[q * m + c] = mx;  // the group's maximum, per element
    out[q] = mx;
  }
  exp_diff(z, e, e, n);
  for (int64_t q = 0; q < r; ++q) {  // z is free now: the group sums go to its first r floats
    float s = e[q * m];
    for (int64_t c = 1; c < m; ++c) s += e[q * m + c];
    z[q] = s;
  }
  log_inplace(z, r);
  for (int64_t q = 0; q < r; ++q) out[q] = z[q] + out[q];
}

// --- one tile's recursions (rows of n floats, `stride` floats apart from one step to the next) -----------------

// alpha, beta (stride `sa`) and the forward's lse (stride `sl`, r floats per step; step 0 untouched) of one tile's
// scores (stride `ss`); `ov` < 0: no overlap constraint.
void tile_alpha_beta(const float* sc, int64_t ss, int64_t S, int64_t n, int64_t f, int64_t ov, float* al, float* be,
                     int64_t sa, float* ls, int64_t sl, float* scratch /* 3r + 2n */) {
  const int64_t m = int64_t{1} << f, r = n >> f;
  const float neg = -1e30f;  // finetune.bcjr._NEG
  std::copy(sc, sc + n, al);
  if (ov >= 0)
    for (int64_t s = 0; s < n; ++s)
      if ((s >> f) != ov) al[s] = neg;
  for (int64_t t = 1; t < S; ++t) {
    float* lt = ls + t * sl;
    lse_rows(al + (t - 1) * sa, m, r, lt, scratch, scratch + 3 * r, scratch + 3 * r + n);
    const float* st = sc + t * ss;
    float* at = al + t * sa;
    for (int64_t q = 0; q < r; ++q)
      for (int64_t c = 0; c < m; ++c) at[q * m + c] = st[q * m + c] + lt[q];
  }
  float* bl = be + (S - 1) * sa;
  for (int64_t s = 0; s < n; ++s) bl[s] = ov >= 0 && (s & (r - 1)) != ov ? neg : 0.0f;
  float* nxt = scratch + 2 * r;
  for (int64_t t = S - 2; t >= 0; --t) {
    lse_groups(sc + (t + 1) * ss, be + (t + 1) * sa, m, r, nxt, scratch + 3 * r, scratch + 3 * r + n);
    float* bt = be + t * sa;
    for (int64_t k = 0; k < m; ++k) std::copy(nxt, nxt + r, bt + k * r);
  }
}

// fwd, bwd (stride `sa`) of one tile from c, alpha, beta (stride `sa`), scores (stride `ss`) and lse (stride `sl`).
void tile_expectations(const float* cc, const float* sc, int64_t ss, const float* al, const float* be, int64_t sa,
                       const float* ls, int64_t sl, int64_t S, int64_t n, int64_t f, float* fw, float* bw,
                       float* w /* n */, float* base /* n */, float* mean /* r */) {
  const int64_t m = int64_t{1} << f, r = n >> f;
  std::copy(cc, cc + n, fw);
  for (int64_t t = 1; t < S; ++t) {
    const float* ap = al + (t - 1) * sa;
    const float* lt = ls + t * sl;
    const float* fp = fw + (t - 1) * sa;
    for (int64_t k = 0; k < m; ++k) std::copy(lt, lt + r, base + k * r);
    exp_diff(ap, base, w, n);  // w[k * r + q] = exp(alpha_{t-1}[k * r + q] - lse_t[q]), all n at once
    for (int64_t q = 0; q < r; ++q) mean[q] = w[q] * fp[q];
    for (int64_t k = 1; k < m; ++k)
      for (int64_t q = 0; q < r; ++q) mean[q] += w[k * r + q] * fp[k * r + q];
    const float* ct = cc + t * sa;
    float* ft = fw + t * sa;
    for (int64_t q = 0; q < r; ++q)
      for (int64_t x = 0; x < m; ++x) ft[q * m + x] = ct[q * m + x] + mean[q];
  }
  float* bl = bw + (S - 1) * sa;
  std::fill(bl, bl + n, 0.0f);
  for (int64_t t = S - 2; t >= 0; --t) {
    const float* sn = sc + (t + 1) * ss;
    const float* bn = be + (t + 1) * sa;
    const float* bt = be + t * sa;  // beta_t[q] = beta_t[0 * r + q]
    const float* cn = cc + (t + 1) * sa;
    const float* wn = bw + (t + 1) * sa;
    int64_t i1 = 0;
#ifdef __AVX2__
    for (; i1 + 8 <= n; i1 += 8) {
      alignas(32) float base[8];
      for (int u = 0; u < 8; ++u) base[u] = bt[(i1 + u) / m];
      _mm256_storeu_ps(w + i1, exp8(_mm256_sub_ps(_mm256_add_ps(_mm256_loadu_ps(sn + i1), _mm256_loadu_ps(bn + i1)),
                                                   _mm256_load_ps(base))));
    }
#endif
    for (; i1 < n; ++i1) w[i1] = exp1((sn[i1] + bn[i1]) - bt[i1 / m]);
    for (int64_t q = 0; q < r; ++q) {
      float s = w[q * m] * (wn[q * m] + cn[q * m]);
      for (int64_t x = 1; x < m; ++x) s += w[q * m + x] * (wn[q * m + x] + cn[q * m + x]);
      mean[q] = s;
    }
    float* out = bw + t * sa;
    for (int64_t k = 0; k < m; ++k) std::copy(mean, mean + r, out + k * r);
  }
}

// The stored state of every sub-state at every step of tile `i`, idx [S, n] ((ref_t & keep) | dep[sigma], plus the
// tile's table offset; ref null: the full trellis, dep[sigma]), and its branch score sc [S, n]:
// (2 <v, x_t> - ||v||^2) / tau, computed as torch's _scores is on an AVX2 CPU (-||v||^2 / tau, then for each k
// fma((2/tau) v_k, x_k, score): torch's vectorised addcmul is fused, measured bit for bit), so that at tau = 1 the
// scores, and the hard path's walks, are the torch path's exactly.
void tile_scores(const float* xi, const float* cp, int64_t T, int64_t V, const int64_t* ref, const int64_t* dp,
                 int64_t keep, int64_t offset, int64_t S, int64_t n, int64_t tile, float neg_tau, float two_tau,
                 int32_t* idx, float* sc) {
  for (int64_t t = 0; t < S; ++t) {
    const int64_t base = ref ? (ref[t] & keep) : 0;
    for (int64_t s = 0; s < n; ++s) {
      const int64_t st = (base | dp[s]) + offset;
      TORCH_CHECK(st >= 0 && st < T, "tile ", tile, " step ", t, ": state ", st, " is outside the ", T, " table rows");
      idx[t * n + s] = static_cast<int32_t>(st);
      float score = cp[st] / neg_tau;
      for (int64_t k = 0; k < V; ++k) {
#ifdef __FMA__
        score = std::fma(two_tau * cp[(k + 1) * T + st], xi[t * V + k], score);
#else
        score += two_tau * cp[(k + 1) * T + st] * xi[t * V + k];
#endif
      }
      sc[t * n + s] = score;
    }
  }
}

struct Dims {
  int64_t S, b, n, m, r;
};

Dims check(const at::Tensor& t, int64_t f, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(),
              what, " must be a contiguous float32 CPU tensor [S, b, n], got ", t.sizes());
  const int64_t n = t.size(2);
  TORCH_CHECK(t.size(0) >= 1, what, " has no steps (S = 0)");
  TORCH_CHECK(f >= 1 && f < 31 && n >= (int64_t{1} << f) && n % (int64_t{1} << f) == 0,
              "f = ", f, " does not fit n = ", n, " states");
  return {t.size(0), t.size(1), n, int64_t{1} << f, n >> f};
}

const int64_t* optional_long(const at::Tensor& t, int64_t size, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size && t.scalar_type() == at::kLong && t.is_contiguous(),
              what, " must be int64 [", size, "] or empty");
  return t.data_ptr<int64_t>();
}

}  // namespace

std::vector<at::Tensor> bcjr_alpha_beta(const at::Tensor& scores, int64_t f, const at::Tensor& overlap) {
  const Dims d = check(scores, f, "scores");
  const int64_t* ov = optional_long(overlap, d.b, "overlap");
  at::Tensor alpha = at::empty_like(scores);
  at::Tensor beta = at::empty_like(scores);
  at::Tensor lse = at::zeros({d.S, d.b, d.r}, scores.options());
  const float* sc = scores.data_ptr<float>();
  float* al = alpha.data_ptr<float>();
  float* be = beta.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  const int64_t row = d.b * d.n;  // one step of [b, n]
  at::parallel_for(0, d.b, kGrainTiles, [&](int64_t j0, int64_t j1) {
    std::vector<float> scratch(3 * d.r + 2 * d.n);
    for (int64_t j = j0; j < j1; ++j)
      tile_alpha_beta(sc + j * d.n, row, d.S, d.n, f, ov ? ov[j] : -1, al + j * d.n, be + j * d.n, row,
                      ls + j * d.r, d.b * d.r, scratch.data());
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
  const int64_t row = d.b * d.n;
  at::parallel_for(0, d.b, kGrainTiles, [&](int64_t j0, int64_t j1) {
    std::vector<float> w(d.n), base(d.n), mean(d.r);
    for (int64_t j = j0; j < j1; ++j)
      tile_expectations(c.data_ptr<float>() + j * d.n, scores.data_ptr<float>() + j * d.n, row,
                        alpha.data_ptr<float>() + j * d.n, beta.data_ptr<float>() + j * d.n, row,
                        lse.data_ptr<float>() + j * d.r, d.b * d.r, d.S, d.n, f, fwd.data_ptr<float>() + j * d.n,
                        bwd.data_ptr<float>() + j * d.n, w.data(), base.data(), mean.data());
  });
  return {fwd, bwd};
}

namespace {

// The tiles of one soft or hard pass (bcjr_soft's first arguments, checked).
struct Tiles {
  int64_t B, S, V, n, T, r;
  const float* x;
  const float* cols;
  const int64_t* ref;  // null: the full trellis
  const int64_t* dep;
  const int64_t* group;
  const int64_t* overlap;
};

Tiles check_tiles(const at::Tensor& x, const at::Tensor& cols, const at::Tensor& ref, const at::Tensor& dep,
                  const at::Tensor& group, int64_t L, int64_t f, const at::Tensor& overlap) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU tensor [B, S, V]");
  const int64_t B = x.size(0), S = x.size(1), V = x.size(2);
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == V + 1 && cols.scalar_type() == at::kFloat && cols.is_contiguous(),
              "cols must be float32 [1+V, T]");
  TORCH_CHECK(dep.dim() == 1 && dep.scalar_type() == at::kLong && dep.is_contiguous(), "dep must be int64 [n]");
  const int64_t n = dep.size(0), T = cols.size(1);
  TORCH_CHECK(V >= 1 && V <= 8, "V = ", V, " values per step: the kernel takes 1 to 8");
  TORCH_CHECK(S >= 1, "x has no steps (S = 0)");
  TORCH_CHECK(f >= 1 && f < 31 && n >= (int64_t{1} << f) && n % (int64_t{1} << f) == 0, "f = ", f,
              " does not fit n = ", n);
  TORCH_CHECK(T < (int64_t{1} << 31), "a table of ", T, " stored states: the kernel indexes them with int32");
  TORCH_CHECK(group.numel() == 0 || (L >= 0 && L < 31), "L = ", L, " out of range");
  const bool has_ref = ref.numel() > 0;
  if (has_ref)
    TORCH_CHECK(ref.dim() == 2 && ref.size(0) == B && ref.size(1) == S && ref.scalar_type() == at::kLong &&
                ref.is_contiguous(), "ref must be int64 [B, S] or empty");
  return {B, S, V, n, T, n >> f, x.data_ptr<float>(), cols.data_ptr<float>(),
          has_ref ? ref.data_ptr<int64_t>() : nullptr, dep.data_ptr<int64_t>(), optional_long(group, B, "group"),
          optional_long(overlap, B, "overlap")};
}

}  // namespace

// The whole soft pass of B tiles, one tile at a time in cache (finetune.bcjr._SoftTrellis): no [S, b, n] tensor.
//   x [B, S, V] f32, cols [1+V, T] f32 (||v||^2 then each component of every stored state), ref [B, S] int64 |
//   empty (the full trellis: sigma is the state), dep [n] int64 and keep (the reference bits kept: ~M) give the
//   stored state of sub-state sigma at step t, ((ref_t & keep) | dep[sigma]) + group << L (group [B] | empty);
//   overlap [B] | empty; grad [B, S, V] | empty.
// Without grad -> {y [B, S, V]}: scores (2<v, x_t> - ||v||^2) / tau, alpha, beta, posterior softmax(alpha + beta),
// y_t = sum P v. With grad -> {dx [B, S, V], acc [1+V, T]}: finetune.bcjr._chunk_grads per tile, the table terms
// (P g_k + (2/tau) dL/dl x_k, and dL/dl) summed per stored state into one buffer per task, the tasks' buffers then
// added in task order (the same result for the same number of threads).
std::vector<at::Tensor> bcjr_soft(const at::Tensor& x, const at::Tensor& cols, const at::Tensor& ref,
                                  const at::Tensor& dep, int64_t keep, const at::Tensor& group, int64_t L, int64_t f,
                                  double tau, const at::Tensor& overlap, const at::Tensor& grad) {
  const Tiles a = check_tiles(x, cols, ref, dep, group, L, f, overlap);
  const int64_t B = a.B, S = a.S, V = a.V, n = a.n, T = a.T;
  const int64_t* gr = a.group;
  const int64_t* ov = a.overlap;
  const bool backward = grad.numel() > 0;
  if (backward)
    TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
                "grad must be float32 like x");
  const float* xp = a.x;
  const float* cp = a.cols;
  const int64_t* rp = a.ref;
  const int64_t* dp = a.dep;
  const float* gp = backward ? grad.data_ptr<float>() : nullptr;
  const int64_t r = n >> f;
  const float neg_tau = static_cast<float>(-tau), two_tau = static_cast<float>(2.0 / tau);
  at::Tensor out = at::zeros_like(x);  // y, or dx
  float* op = out.data_ptr<float>();
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  std::vector<at::Tensor> parts(backward ? tasks : 0);
  at::parallel_for(0, tasks, 1, [&](int64_t p0, int64_t p1) {
    std::vector<int32_t> idx(S * n);
    std::vector<float> sc(S * n), al(S * n), be(S * n), ls(S * r), post(S * n), scratch(3 * r + 2 * n);
    std::vector<float> cc, fw, bw, mean;
    if (backward) {
      cc.resize(S * n);
      fw.resize(S * n);
      bw.resize(S * n);
      mean.resize(r);
    }
    for (int64_t p = p0; p < p1; ++p) {
      float* acc = nullptr;
      if (backward) {
        parts[p] = at::zeros({V + 1, T}, cols.options());
        acc = parts[p].data_ptr<float>();
      }
      for (int64_t i = B * p / tasks; i < B * (p + 1) / tasks; ++i) {
        const float* xi = xp + i * S * V;
        tile_scores(xi, cp, T, V, rp ? rp + i * S : nullptr, dp, keep, gr ? (gr[i] << L) : 0, S, n, i, neg_tau,
                    two_tau, idx.data(), sc.data());
        tile_alpha_beta(sc.data(), n, S, n, f, ov ? ov[i] : -1, al.data(), be.data(), n, ls.data(), r,
                        scratch.data());
        for (int64_t t = 0; t < S; ++t) {  // posterior: softmax over the states of step t
          float* pt = post.data() + t * n;
          float* mrow = scratch.data();  // n floats: the maximum, per element
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t s = 0; s < n; ++s) {
            pt[s] = al[t * n + s] + be[t * n + s];
            mx = std::max(mx, pt[s]);
          }
          std::fill(mrow, mrow + n, mx);
          exp_diff(pt, mrow, pt, n);
          float sum = 0.0f;
          for (int64_t s = 0; s < n; ++s) sum += pt[s];
          const float inv = 1.0f / sum;
          for (int64_t s = 0; s < n; ++s) pt[s] *= inv;
        }
        float* oi = op + i * S * V;
        if (!backward) {
          for (int64_t t = 0; t < S; ++t)
            for (int64_t k = 0; k < V; ++k) {
              const float* vk = cp + (k + 1) * T;
              float y = 0.0f;
              for (int64_t s = 0; s < n; ++s) y += post[t * n + s] * vk[idx[t * n + s]];
              oi[t * V + k] = y;
            }
          continue;
        }
        const float* gi = gp + i * S * V;
        for (int64_t t = 0; t < S; ++t)  // c = <g_t, v_t(sigma)>
          for (int64_t s = 0; s < n; ++s) {
            const int64_t st = idx[t * n + s];
            float c = cp[T + st] * gi[t * V];
            for (int64_t k = 1; k < V; ++k) c += cp[(k + 1) * T + st] * gi[t * V + k];
            cc[t * n + s] = c;
          }
        tile_expectations(cc.data(), sc.data(), n, al.data(), be.data(), n, ls.data(), r, S, n, f, fw.data(),
                          bw.data(), scratch.data(), scratch.data() + n, mean.data());
        double ex = 0.0;  // E[G], summed in double (the torch path: a float32 reduction)
        for (int64_t j = 0; j < S * n; ++j) ex += static_cast<double>(post[j] * cc[j]);
        const float expect = static_cast<float>(ex);
        for (int64_t t = 0; t < S; ++t) {
          float gx[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int64_t s = 0; s < n; ++s) {
            const int64_t j = t * n + s, st = idx[j];
            const float pr = post[j];
            const float gs = pr * ((fw[j] + bw[j]) - expect);  // dL/dl
            for (int64_t k = 0; k < V; ++k) {
              gx[k] += gs * cp[(k + 1) * T + st];
              acc[k * T + st] += pr * gi[t * V + k] + two_tau * gs * xi[t * V + k];
            }
            acc[V * T + st] += gs;
          }
          for (int64_t k = 0; k < V; ++k) oi[t * V + k] = gx[k] * two_tau;
        }
      }
    }
  });
  if (!backward) return {out};
  at::Tensor acc = parts[0];
  for (int64_t p = 1; p < tasks; ++p) acc.add_(parts[p]);
  return {out, acc};
}

// The best walk of each tile's sub-trellis, finetune.bcjr.hard_path (its Viterbi of the tau = 1 scores; ties to the
// smallest predecessor j and the smallest end state), as stored-code states (ref_t & keep) | dep[sigma] (no table
// offset) -> int64 [B, S]. Arguments as bcjr_soft's. Tiles in parallel, each in cache: its scores [S, n] and
// back-pointers [S, r].
at::Tensor bcjr_hard_path(const at::Tensor& x, const at::Tensor& cols, const at::Tensor& ref, const at::Tensor& dep,
                          int64_t keep, const at::Tensor& group, int64_t L, int64_t f, const at::Tensor& overlap) {
  const Tiles a = check_tiles(x, cols, ref, dep, group, L, f, overlap);
  const int64_t S = a.S, n = a.n, r = a.r, m = int64_t{1} << f;
  const float neg = -1e30f;  // finetune.bcjr._NEG
  at::Tensor out = at::empty({a.B, S}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, a.B, kGrainTiles, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> idx(S * n), back(S * r);
    std::vector<float> sc(S * n), cost(n), next(n), best(r);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t offset = a.group ? (a.group[i] << L) : 0;
      tile_scores(a.x + i * S * a.V, a.cols, a.T, a.V, a.ref ? a.ref + i * S : nullptr, a.dep, keep, offset, S, n, i,
                  -1.0f, 2.0f, idx.data(), sc.data());
      const int64_t ov = a.overlap ? a.overlap[i] : -1;
      std::copy(sc.begin(), sc.begin() + n, cost.begin());
      if (ov >= 0)
        for (int64_t s = 0; s < n; ++s)
          if ((s >> f) != ov) cost[s] = neg;
      for (int64_t t = 1; t < S; ++t) {
        int32_t* bt = back.data() + t * r;
        for (int64_t q = 0; q < r; ++q) {  // predecessors of q * m + c: j * r + q
          float bv = cost[q];
          int32_t bj = 0;
          for (int64_t j = 1; j < m; ++j)
            if (cost[j * r + q] > bv) {
              bv = cost[j * r + q];
              bj = static_cast<int32_t>(j);
            }
          best[q] = bv;
          bt[q] = bj;
        }
        const float* st = sc.data() + t * n;
        for (int64_t q = 0; q < r; ++q)
          for (int64_t c = 0; c < m; ++c) next[q * m + c] = st[q * m + c] + best[q];
        cost.swap(next);
      }
      if (ov >= 0)
        for (int64_t s = 0; s < n; ++s)
          if ((s & (r - 1)) != ov) cost[s] = neg;
      int64_t sig = 0;
      for (int64_t s = 1; s < n; ++s)
        if (cost[s] > cost[sig]) sig = s;
      int64_t* oi = op + i * S;
      oi[S - 1] = idx[(S - 1) * n + sig] - offset;
      for (int64_t t = S - 1; t > 0; --t) {
        const int64_t q = sig >> f;
        sig = q + back[t * r + q] * r;
        oi[t - 1] = idx[(t - 1) * n + sig] - offset;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bcjr_alpha_beta", &bcjr_alpha_beta, "log-space alpha, beta and the forward's lse of a chunk of tiles");
  m.def("bcjr_expectations", &bcjr_expectations, "E[G up to t | state] and E[G after t | state] of a chunk");
  m.def("bcjr_soft", &bcjr_soft, "the soft pass of B tiles (y), or its backward (dx and the table terms)");
  m.def("bcjr_hard_path", &bcjr_hard_path, "the best walk of each tile's sub-trellis (Viterbi at tau = 1)");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
