// The paths of bitcpm::ternary_linear (Isa) and which of them this CPU runs: its own feature
// checks (cpu_features.h) under VLLM_BITCPM_ISA's cap, and the names the Python side, the tests'
// isa fixture and the load log use.
#pragma once

#include <string>
#include <vector>

namespace bitcpm_cpu {

// x86 paths are ordered (kScalar < kAvx2 < kAvx512 < kAvx512Bf16, compared with >= by the
// dispatch); the aarch64 paths come after them and are dispatched first (is_neon), so those
// comparisons only ever see x86 paths.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kNeon = 4, kNeonDotprod = 5 };

inline bool is_neon(Isa isa) { return isa == Isa::kNeon || isa == Isa::kNeonDotprod; }

// The best path by the kernels' own checks (capped: cpu_has_*, VLLM_BITCPM_ISA applied) or by
// the CPU alone (cpu_supports_*, for the log line that says what a cap left out).
Isa detect_isa(bool capped);

// detect_isa(true), decided once per process.
Isa best_isa();

// "avx2", "neon-dotprod", ...: the names VLLM_BITCPM_ISA and ternary_linear_isa take.
const char* isa_name(Isa isa);

// The paths this CPU can run, best last: its architecture's paths up to best_isa().
std::vector<Isa> runnable_isas();

// A path by name ("auto": best_isa()); a clear error for an unknown one or one this CPU lacks.
Isa parse_isa(const std::string& name);

// "avx512bf16+vnni" and the like: the path name, plus VNNI where an AVX512 path can use it.
std::string isa_label(Isa isa);

}  // namespace bitcpm_cpu
