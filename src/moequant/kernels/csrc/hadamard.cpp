// moequant CPU kernel for the random Hadamard transform of the activations (solvers/incoherence.py):
//
//   rht_apply(x [..., n], signs_before [n] | empty, signs_after [n] | empty, block [m, m] | empty, transpose)
//     = ((x * signs_before) @ H^T) * signs_after        H = H_n (transpose: H_n^T), n = p * m
//
// H_n = H_p (x) B_m: H_p the orthonormal Sylvester-Hadamard matrix of the power of two p, B_m the small
// orthonormal block (m = 1: none). Element i of a row is i = a * m + b (a in [0, p), b in [0, m)); viewing
// the row as V [p, m], H_n v is H_p V B_m^T (transpose: H_p V B_m, H_p being symmetric). Per row, in place
// in the output:
//   1. copy x (times signs_before);
//   2. butterfly FWHT over a: log2(p) stages; the stage of half-width h adds/subtracts contiguous spans of
//      h * m floats (AVX2 8 at a time; for m = 1 the first three stages run inside each 8-float vector);
//   3. each of the p sub-rows of m floats times (B_m^T or B_m) / sqrt(p): 4 sub-rows at a time, 16 output
//      columns at a time accumulated in registers (the matrix padded to whole vectors); m = 1: the
//      1/sqrt(p) scale alone;
//   4. times signs_after.
// rht_apply_outer is the same with the block outside (H_n = C_o (x) H_p): see its comment below.
// Rows run in parallel (at::parallel_for) only when there are enough of them (kGrainFloats per task).
#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// Floats of x per parallel task: a decode-sized call (a few rows) stays on the calling thread.
constexpr int64_t kGrainFloats = 1 << 16;

int64_t power_of_two_part(int64_t n) { return n & -n; }

// One butterfly stage: for each block of 2 * s floats, (u, v) -> (u + v, u - v) with u the first s floats.
void stage(float* v, int64_t n, int64_t s) {
  for (int64_t o = 0; o < n; o += 2 * s) {
    float* u = v + o;
    float* w = u + s;
    int64_t t = 0;
#ifdef __AVX2__
    for (; t + 8 <= s; t += 8) {
      const __m256 a = _mm256_loadu_ps(u + t), b = _mm256_loadu_ps(w + t);
      _mm256_storeu_ps(u + t, _mm256_add_ps(a, b));
      _mm256_storeu_ps(w + t, _mm256_sub_ps(a, b));
    }
#endif
    for (; t < s; ++t) {
      const float a = u[t], b = w[t];
      u[t] = a + b;
      w[t] = a - b;
    }
  }
}

#ifdef __AVX2__
// The 8-point Sylvester transform (unscaled) of each 8 consecutive floats: stages h = 1, 2, 4 in-register.
// Each stage is r = swap(v) + v * sign, the swap exchanging the partner lanes and sign = -1 on upper lanes.
void stages_within_vectors(float* v, int64_t n) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  for (int64_t o = 0; o < n; o += 8) {
    __m256 r = _mm256_loadu_ps(v + o);
    r = _mm256_fmadd_ps(r, s1, _mm256_permute_ps(r, 0xB1));  // lanes (1, 0, 3, 2, ...)
    r = _mm256_fmadd_ps(r, s2, _mm256_permute_ps(r, 0x4E));  // lanes (2, 3, 0, 1, ...)
    r = _mm256_fmadd_ps(r, s4, _mm256_permute2f128_ps(r, r, 1));  // halves swapped
    _mm256_storeu_ps(v + o, r);
  }
}
#endif

// Unscaled H_p along a for one row v [p * m].
void fwht(float* v, int64_t p, int64_t m) {
  const int64_t n = p * m;
  int64_t h = 1;
#ifdef __AVX2__
  if (m == 1 && p >= 8) {
    stages_within_vectors(v, n);
    h = 8;
  }
#endif
  for (; h < p; h *= 2) stage(v, n, h * m);
}

// The block step as the kernel reads it: rows[c, :] (c in [0, m)) padded to `width` floats, so that the
// sub-row u = v M is sum_c v[c] * rows[c, :].
struct Block {
  int64_t m = 1, width = 0;
  std::vector<float> rows;  // [m, width]
};

// M = (transpose ? B : B^T) * scale, zero-padded to a whole number of 8-float vectors.
Block make_block(const at::Tensor& block, bool transpose, float scale) {
  Block b;
  b.m = block.size(0);
  b.width = (b.m + 7) / 8 * 8;
  b.rows.assign(b.m * b.width, 0.0f);
  const float* src = block.data_ptr<float>();  // [m, m]
  for (int64_t c = 0; c < b.m; ++c)
    for (int64_t j = 0; j < b.m; ++j)  // u[j] = sum_c v[c] * B[j, c] (or B[c, j] transposed)
      b.rows[c * b.width + j] = scale * (transpose ? src[c * b.m + j] : src[j * b.m + c]);
  return b;
}

#ifdef __AVX2__
// Columns [col, col + 8 * CV) of T consecutive sub-rows (in [T, m]) times the block, into out [T, width].
// T * CV independent accumulators hide the FMA latency (one sub-row of a 12-wide block alone has 2 chains);
// each block vector loaded is used T times.
template <int CV, int T>
void block_chunk(const float* in, const Block& b, int64_t col, float* out) {
  const int64_t m = b.m;
  __m256 acc[T][CV];
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < CV; ++k) acc[t][k] = _mm256_setzero_ps();
  for (int64_t c = 0; c < m; ++c) {
    __m256 s[T];
    for (int t = 0; t < T; ++t) s[t] = _mm256_broadcast_ss(in + t * m + c);
    const float* r = b.rows.data() + c * b.width + col;
    for (int k = 0; k < CV; ++k) {
      const __m256 w = _mm256_loadu_ps(r + 8 * k);
      for (int t = 0; t < T; ++t) acc[t][k] = _mm256_fmadd_ps(s[t], w, acc[t][k]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < CV; ++k) _mm256_storeu_ps(out + t * b.width + col + 8 * k, acc[t][k]);
}

// T sub-rows v [T, m] times the block, in place (through the scratch tile [T, width]).
template <int T>
void block_rows(float* v, const Block& b, float* tile) {
  int64_t col = 0;
  for (; col + 16 <= b.width; col += 16) block_chunk<2, T>(v, b, col, tile);
  if (col < b.width) block_chunk<1, T>(v, b, col, tile);
  for (int t = 0; t < T; ++t) std::memcpy(v + t * b.m, tile + t * b.width, b.m * sizeof(float));
}
#endif

// The p sub-rows of v [p, m] times the block, in place; scratch: at least 4 * width floats.
void apply_block(float* v, int64_t p, const Block& b, std::vector<float>& scratch) {
  const int64_t m = b.m;
  scratch.resize(4 * b.width);
  int64_t a = 0;
#ifdef __AVX2__
  for (; a + 4 <= p; a += 4) block_rows<4>(v + a * m, b, scratch.data());
  for (; a < p; ++a) block_rows<1>(v + a * m, b, scratch.data());
#endif
  for (; a < p; ++a) {  // without AVX2
    float* row = v + a * m;
    std::fill(scratch.begin(), scratch.end(), 0.0f);
    for (int64_t c = 0; c < m; ++c) {
      const float x = row[c];
      const float* r = b.rows.data() + c * b.width;
      for (int64_t j = 0; j < m; ++j) scratch[j] += x * r[j];
    }
    std::memcpy(row, scratch.data(), m * sizeof(float));
  }
}

// out[i] = x[i] * s[i] (s null: a copy).
void copy_signed(float* out, const float* x, const float* s, int64_t n) {
  if (s == nullptr) {
    std::memcpy(out, x, n * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * s[i];
}

const float* signs_ptr(const at::Tensor& s, int64_t n, const char* what) {
  if (s.numel() == 0) return nullptr;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == n, what, " must be [", n, "] or empty, got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.device().is_cpu(),
              what, " must be a contiguous float32 CPU tensor");
  return s.data_ptr<float>();
}

// The checked arguments of both kernels: x [..., n] float32 (R = the product of the leading dims, so that
// callers need no reshape), the signs or null, and the block order m (1: no block), n = p * m, p a power of two.
struct Args {
  at::Tensor xc;  // x, contiguous
  int64_t n = 0, rows = 0, m = 1, p = 1;
  const float* pre = nullptr;
  const float* post = nullptr;
};

Args check_args(const at::Tensor& x, const at::Tensor& signs_before, const at::Tensor& signs_after,
                const at::Tensor& block) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "x must be [..., n] with n >= 1, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
  Args a;
  a.xc = x.contiguous();
  a.n = a.xc.size(-1);
  a.rows = a.xc.numel() / a.n;
  a.pre = signs_ptr(signs_before, a.n, "signs_before");
  a.post = signs_ptr(signs_after, a.n, "signs_after");
  if (block.numel() > 0) {
    TORCH_CHECK(block.dim() == 2 && block.size(0) == block.size(1), "block must be [m, m], got ", block.sizes());
    TORCH_CHECK(block.scalar_type() == at::kFloat && block.is_contiguous() && block.device().is_cpu(),
                "block must be a contiguous float32 CPU tensor");
    a.m = block.size(0);
  }
  TORCH_CHECK(a.n % a.m == 0 && power_of_two_part(a.n / a.m) == a.n / a.m, "n = ", a.n,
              " is not a power of two times the block order ", a.m);
  a.p = a.n / a.m;
  return a;
}

// x [..., n] float32 -> ((x * signs_before) H^T) * signs_after [..., n] (see the file comment).
at::Tensor rht_apply(const at::Tensor& x, const at::Tensor& signs_before, const at::Tensor& signs_after,
                     const at::Tensor& block, bool transpose) {
  const Args args = check_args(x, signs_before, signs_after, block);
  const at::Tensor& xc = args.xc;
  const int64_t n = args.n, rows = args.rows, m = args.m, p = args.p;
  const float* pre = args.pre;
  const float* post = args.post;
  const float scale = 1.0f / std::sqrt(static_cast<float>(p));
  const Block b = m > 1 ? make_block(block.contiguous(), transpose, scale) : Block{};

  at::Tensor out = at::empty(xc.sizes(), xc.options());
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrainFloats / n);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch;
    for (int64_t r = r0; r < r1; ++r) {
      float* v = dst + r * n;
      copy_signed(v, src + r * n, pre, n);
      fwht(v, p, m);
      if (m > 1) {
        apply_block(v, p, b, scratch);  // the 1/sqrt(p) is in the block
        if (post != nullptr)
          for (int64_t i = 0; i < n; ++i) v[i] *= post[i];
      } else if (post != nullptr) {
        for (int64_t i = 0; i < n; ++i) v[i] *= scale * post[i];
      } else if (p > 1) {
        for (int64_t i = 0; i < n; ++i) v[i] *= scale;
      }
    }
  });
  return out;
}

// ---- the block outside: H_n = C_o (x) H_p (codecs.hadamard's rules "paley-outer" and "hartley") -------------
// A row viewed as V [o, p] (element i = b * p + a): H_n v = C_o (V H_p) row-mixed, i.e. out[j, :] = sum_c
// M[j, c] * (H_p V[c, :]) with M = C_o (transpose: C_o^T) / sqrt(p). Without a block (o = 1) both layouts are
// H_p alone: rht_apply does it. H_p runs in place on each contiguous run
// of p floats (fwht with m = 1); the mix reads those runs as whole vectors: J output runs at once, 16 floats of
// each in registers, so that every vector loaded from a run serves J multiply-adds.

// out[j0 + t, a] for t in [0, J), all a: the mix of the runs of v (rows of [o, p]) with M [o, o], times post.
template <int J>
void mix_runs(const float* v, float* out, const float* mix, int64_t o, int64_t p, int64_t j0, const float* post) {
  int64_t a = 0;
#ifdef __AVX2__
  for (; a + 16 <= p; a += 16) {
    __m256 acc[J][2];
    for (int t = 0; t < J; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < o; ++c) {
      const __m256 x0 = _mm256_loadu_ps(v + c * p + a), x1 = _mm256_loadu_ps(v + c * p + a + 8);
      for (int t = 0; t < J; ++t) {
        const __m256 w = _mm256_broadcast_ss(mix + (j0 + t) * o + c);
        acc[t][0] = _mm256_fmadd_ps(w, x0, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(w, x1, acc[t][1]);
      }
    }
    for (int t = 0; t < J; ++t) {
      float* dst = out + (j0 + t) * p + a;
      if (post != nullptr) {
        const float* s = post + (j0 + t) * p + a;
        acc[t][0] = _mm256_mul_ps(acc[t][0], _mm256_loadu_ps(s));
        acc[t][1] = _mm256_mul_ps(acc[t][1], _mm256_loadu_ps(s + 8));
      }
      _mm256_storeu_ps(dst, acc[t][0]);
      _mm256_storeu_ps(dst + 8, acc[t][1]);
    }
  }
#endif
  for (; a < p; ++a) {
    for (int t = 0; t < J; ++t) {
      float acc = 0.0f;
      for (int64_t c = 0; c < o; ++c) acc += mix[(j0 + t) * o + c] * v[c * p + a];
      const int64_t i = (j0 + t) * p + a;
      out[i] = post != nullptr ? acc * post[i] : acc;
    }
  }
}

// x [..., n] float32 -> ((x * signs_before) H^T) * signs_after with H = C (x) H_p (block [o, o] outside).
at::Tensor rht_apply_outer(const at::Tensor& x, const at::Tensor& signs_before, const at::Tensor& signs_after,
                           const at::Tensor& block, bool transpose) {
  if (block.numel() == 0) return rht_apply(x, signs_before, signs_after, block, transpose);
  const Args args = check_args(x, signs_before, signs_after, block);
  const at::Tensor& xc = args.xc;
  const int64_t n = args.n, rows = args.rows, o = args.m, p = args.p;
  const float* pre = args.pre;
  const float* post = args.post;
  const float scale = 1.0f / std::sqrt(static_cast<float>(p));
  std::vector<float> mix(o * o);  // M[j, c] = C[j, c] (transpose: C[c, j]) / sqrt(p)
  const float* blk = block.data_ptr<float>();
  for (int64_t j = 0; j < o; ++j)
    for (int64_t c = 0; c < o; ++c) mix[j * o + c] = scale * (transpose ? blk[c * o + j] : blk[j * o + c]);

  at::Tensor out = at::empty(xc.sizes(), xc.options());
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrainFloats / n);
  if (p < 16) {
    // Runs shorter than one 16-float step leave mix_runs on its scalar loop (o^2 scalar multiply-adds per run
    // column: a width 228 * 4 ran 8x slower than an n x n GEMM). Here each of up to kRows rows is read
    // transposed, V [o, p] -> [p, o] (times pre), and goes through the inner rule's steps: the butterfly over a
    // on sub-rows of o floats, then all the rows' sub-rows through the vectorised block product (4 at a time);
    // each comes back to [o, p] times post. The sums are mix_runs' (over c in order), the butterfly's the same.
    constexpr int64_t kRows = 8;
    const Block b = make_block(block.contiguous(), transpose, scale);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> cols(kRows * n), scratch;  // kRows rows, each as [p, o]
      for (int64_t q0 = r0; q0 < r1; q0 += kRows) {
        const int64_t q1 = std::min(r1, q0 + kRows);
        for (int64_t r = q0; r < q1; ++r) {
          float* t = cols.data() + (r - q0) * n;
          const float* x = src + r * n;
          for (int64_t c = 0; c < o; ++c)
            for (int64_t a = 0; a < p; ++a) {
              const int64_t i = c * p + a;
              t[a * o + c] = pre != nullptr ? x[i] * pre[i] : x[i];
            }
          fwht(t, p, o);  // H_p along a: the butterfly on whole sub-rows of o floats
        }
        apply_block(cols.data(), (q1 - q0) * p, b, scratch);  // cols[., a, j] = sum_c M[j, c] * V[c, a]
        for (int64_t r = q0; r < q1; ++r) {
          const float* t = cols.data() + (r - q0) * n;
          float* row = dst + r * n;
          for (int64_t j = 0; j < o; ++j)
            for (int64_t a = 0; a < p; ++a) {
              const int64_t i = j * p + a;
              row[i] = post != nullptr ? t[a * o + j] * post[i] : t[a * o + j];
            }
        }
      }
    });
    return out;
  }
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> runs(n);  // the butterflied runs, mixed from here into the output row
    for (int64_t r = r0; r < r1; ++r) {
      float* row = dst + r * n;
      float* v = runs.data();
      copy_signed(v, src + r * n, pre, n);
      for (int64_t b = 0; b < o; ++b) fwht(v + b * p, p, 1);
      int64_t j = 0;
      for (; j + 4 <= o; j += 4) mix_runs<4>(v, row, mix.data(), o, p, j, post);
      for (; j < o; ++j) mix_runs<1>(v, row, mix.data(), o, p, j, post);
    }
  });
  return out;
}

}  // namespace

// rht_apply as a dispatcher op too (moequant_ext::rht_apply), so a torch.compile graph calls it without Python
// (kernels/cpp_ops.py registers its shape function; eager code calls the pybind function).
TORCH_LIBRARY_FRAGMENT(moequant_ext, m) {
  m.def("rht_apply(Tensor x, Tensor signs_before, Tensor signs_after, Tensor block, bool transpose) -> Tensor");
  m.def("rht_apply_outer(Tensor x, Tensor signs_before, Tensor signs_after, Tensor block, bool transpose) -> Tensor");
}

TORCH_LIBRARY_IMPL(moequant_ext, CPU, m) {
  m.impl("rht_apply", &rht_apply);
  m.impl("rht_apply_outer", &rht_apply_outer);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rht_apply", &rht_apply, "((x * s_before) H_n^T) * s_after, x [..., n] float32, H_n = H_p (x) B_m");
  m.def("rht_apply_outer", &rht_apply_outer, "((x * s_before) H_n^T) * s_after, x [..., n] float32, H_n = C_o (x) H_p");
  m.def("has_avx2", &moequant::built_with_avx2, "built with the AVX2 path");
}
