// Run-time CPU checks and small SIMD helpers shared by the CPU kernels (the kernel files
// of kernels/cpu/ include it). Each kernel file is compiled for the baseline ISA; code for wider ISAs sits in
// functions with __attribute__((target(...))) that run only after these checks pass.
//
// SIMD code is compiled only for its architecture: x86 code where BITCPM_X86 is 1, the NEON
// paths of the ternary kernel (rows_neon.cpp) where BITCPM_ARM64 is 1, so the kernels
// build on x86, aarch64 (Ascend hosts, Graviton), ppc64le and s390x alike. Elsewhere the checks
// below say "no", the dispatch never picks those paths, and each file's SIMD entry points are
// stand-ins that are never called (BITCPM_NO_SIMD_PATH). ppc64le and s390x run the scalar twin.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define BITCPM_X86 1
#include <immintrin.h>
#else
#define BITCPM_X86 0
#endif

#if defined(__aarch64__)
#define BITCPM_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#else
#define BITCPM_ARM64 0
#endif

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace bitcpm_cpu {

// VLLM_BITCPM_ISA caps the ISA paths every kernel may pick, read once per process. The paths of
// one architecture are ordered: x86 scalar < avx2 < avx512 < avx512bf16, aarch64 scalar < neon <
// neon-dotprod; unset or "auto": no cap. It lets an AVX512 machine run what an AVX2-only CPU runs
// (README, "AVX2 mode"), and an Arm one its NEON path without sdot or its scalar twin.
// vllm_bitcpm/ops/cpu.py rejects other values, and the other architecture's names, with a
// message before the kernels are first called; here those mean no cap.
enum IsaLevel {
  kLevelScalar = 0,
  kLevelAvx2 = 1,
  kLevelAvx512 = 2,
  kLevelAvx512Bf16 = 3,
  kLevelNeon = 1,
  kLevelNeonDotprod = 2,
  kLevelNoCap = 3,
};

inline int isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("VLLM_BITCPM_ISA");
    if (v == nullptr) return int(kLevelNoCap);
    const std::string s(v);
    if (s == "scalar") return int(kLevelScalar);
#if BITCPM_X86
    if (s == "avx2") return int(kLevelAvx2);
    if (s == "avx512") return int(kLevelAvx512);
#elif BITCPM_ARM64
    if (s == "neon") return int(kLevelNeon);
    if (s == "neon-dotprod") return int(kLevelNeonDotprod);
#endif
    return int(kLevelNoCap);
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

// aarch64: Advanced SIMD (NEON) and the ARMv8.2 dot product (`sdot`), as the kernel reports them
// in the auxiliary vector (HWCAP_ASIMD, HWCAP_ASIMDDP; the values are the Linux ABI's, spelled
// out for C libraries whose headers predate them). Elsewhere false.
#if BITCPM_ARM64 && defined(__linux__)
inline bool cpu_supports_neon() { return (getauxval(AT_HWCAP) & (1UL << 1)) != 0; }  // HWCAP_ASIMD

inline bool cpu_supports_neon_dotprod() {
  return cpu_supports_neon() && (getauxval(AT_HWCAP) & (1UL << 20)) != 0;  // HWCAP_ASIMDDP
}
#elif BITCPM_ARM64
inline bool cpu_supports_neon() { return true; }  // part of ARMv8-A; no portable dotprod check here
inline bool cpu_supports_neon_dotprod() { return false; }
#else
inline bool cpu_supports_neon() { return false; }
inline bool cpu_supports_neon_dotprod() { return false; }
#endif

// The checks every kernel's dispatch uses: the CPU supports it and VLLM_BITCPM_ISA allows it.
inline bool cpu_has_avx2() { return isa_cap() >= kLevelAvx2 && cpu_supports_avx2(); }

inline bool cpu_has_avx512() { return isa_cap() >= kLevelAvx512 && cpu_supports_avx512(); }

inline bool cpu_has_vnni() { return isa_cap() >= kLevelAvx512 && cpu_supports_vnni(); }

inline bool cpu_has_avx512bf16() { return isa_cap() >= kLevelAvx512Bf16 && cpu_supports_avx512bf16(); }

inline bool cpu_has_neon() { return isa_cap() >= kLevelNeon && cpu_supports_neon(); }

inline bool cpu_has_neon_dotprod() { return isa_cap() >= kLevelNeonDotprod && cpu_supports_neon_dotprod(); }

#if BITCPM_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline int32_t hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// The body of a SIMD entry point's stand-in on other architectures. Dispatch only picks a SIMD
// path after a cpu_has_* check, which is false there, so reaching one is a dispatch bug, named as such.
[[noreturn]] inline void no_simd_path(const char* name) {
  TORCH_CHECK(false, "bitcpm_cpu: ", name, " is a SIMD path of another architecture and was called on "
              "this CPU (a dispatch bug in kernels/cpu/)");
  __builtin_unreachable();
}
#define BITCPM_NO_SIMD_PATH(name) ::bitcpm_cpu::no_simd_path(name)

}  // namespace bitcpm_cpu
