// Shared by moequant's C++ kernel sources. cpp_build hashes every header in this folder into each extension's
// build tag, so a change here rebuilds them all.
#pragma once

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

}  // namespace moequant
