// Shared by moequant's C++ kernel sources. cpp_build hashes every header in this folder into each extension's
// build tag, so a change here rebuilds them all.
#pragma once

#include <cstdint>

namespace moequant {

// Whether this translation unit was compiled with the AVX2 / FMA / F16C paths (cpp_build.simd_flags passes the
// three flags together).
inline bool built_with_avx2() {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return true;
#else
  return false;
#endif
}

// Rows of W decoded per BLAS product in the large-M paths (decode a tile of rows to fp32, multiply it into its
// columns of y): about 1 Mi weights (4 MiB of fp32, reused by the allocator call after call), but never fewer
// than 256 rows, a multiple of 16, at most N. A narrow product loses BLAS speed on wide inputs (measured here,
// M = 2052, K = 8960 -> N = 1536, 2 threads: 16 rows 603 ms, 64 rows 358, 128 rows 329, 256 rows 292, all 1536
// rows 280), and the old 1 MiB / K rule gave 16-112 rows at K = 8960.
inline int64_t gemm_tile_rows(int64_t N, int64_t K) {
  const int64_t by_size = (int64_t{1} << 20) / (K > 0 ? K : 1);
  const int64_t t = (by_size > 256 ? by_size : 256) / 16 * 16;
  return t < N ? t : N;
}

}  // namespace moequant
