// Run-time CPU checks and small SIMD helpers shared by the CPU kernels (ternary_linear.cpp,
// lm_head_gemv.cpp). Each kernel file is compiled for the baseline ISA; code for wider ISAs sits in
// functions with __attribute__((target(...))) that run only after these checks pass.
//
// That SIMD code is x86 only: it is compiled where BITCPM_X86 is 1 and nowhere else, so the
// kernels build on aarch64 (Ascend hosts, Graviton), ppc64le and s390x too. There the checks below
// say "no SIMD", every dispatch picks the scalar twin, and each file's SIMD entry points are
// stand-ins that are never called (BITCPM_NO_SIMD_PATH).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define BITCPM_X86 1
#include <immintrin.h>
#else
#define BITCPM_X86 0
#endif

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace bitcpm_cpu {

// VLLM_BITCPM_ISA caps the ISA paths every kernel may pick (scalar < avx2 < avx512 < avx512bf16;
// unset or "auto": no cap), read once per process. It lets an AVX512 machine run what an
// AVX2-only CPU runs (README, "AVX2 mode"). vllm_bitcpm/ops/cpu.py rejects other values with a
// message before the kernels are first called; here an unknown value means no cap.
enum IsaLevel { kLevelScalar = 0, kLevelAvx2 = 1, kLevelAvx512 = 2, kLevelAvx512Bf16 = 3 };

inline int isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("VLLM_BITCPM_ISA");
    if (v == nullptr) return int(kLevelAvx512Bf16);
    const std::string s(v);
    if (s == "scalar") return int(kLevelScalar);
    if (s == "avx2") return int(kLevelAvx2);
    if (s == "avx512") return int(kLevelAvx512);
    return int(kLevelAvx512Bf16);
  }();
  return cap;
}

// What the CPU itself supports (no cap): for logs that say what a cap left out. Always false on
// other architectures: the kernels have no SIMD path there.
#if BITCPM_X86
inline bool cpu_supports_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

inline bool cpu_supports_avx512() {
  __builtin_cpu_init();
  return cpu_supports_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

inline bool cpu_supports_avx512bf16() {
  __builtin_cpu_init();
  return cpu_supports_avx512() && __builtin_cpu_supports("avx512bf16");
}

inline bool cpu_supports_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}
#else
inline bool cpu_supports_avx2() { return false; }
inline bool cpu_supports_avx512() { return false; }
inline bool cpu_supports_avx512bf16() { return false; }
inline bool cpu_supports_vnni() { return false; }
#endif

// The checks every kernel's dispatch uses: the CPU supports it and VLLM_BITCPM_ISA allows it.
inline bool cpu_has_avx2() { return isa_cap() >= kLevelAvx2 && cpu_supports_avx2(); }

inline bool cpu_has_avx512() { return isa_cap() >= kLevelAvx512 && cpu_supports_avx512(); }

inline bool cpu_has_vnni() { return isa_cap() >= kLevelAvx512 && cpu_supports_vnni(); }

inline bool cpu_has_avx512bf16() { return isa_cap() >= kLevelAvx512Bf16 && cpu_supports_avx512bf16(); }

#if BITCPM_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// The body of a SIMD entry point's non-x86 stand-in. Dispatch only picks a SIMD path after a
// cpu_has_* check, which is false there, so reaching one is a dispatch bug, named as such.
#define BITCPM_NO_SIMD_PATH(name)                                                                          \
  TORCH_CHECK(false, "bitcpm_cpu: ", name, " is an x86 SIMD path and was called on a CPU without it "      \
              "(a dispatch bug in kernels/cpu/)")

}  // namespace bitcpm_cpu
