// The aarch64 NEON row kernels of bitcpm::ternary_linear (ternary_linear_neon.cpp), called by the
// dispatch in ternary_linear.cpp once cpu_has_neon() / cpu_has_neon_dotprod() (cpu_features.h)
// said yes. On other CPUs these are stand-ins that are never called (BITCPM_NO_SIMD_PATH).
#pragma once

#include "ternary_linear_rows.h"

namespace bitcpm_cpu {

// Tokens per call of a NEON row kernel (the dispatch's token tile).
constexpr int kNeonTokenTile = 8;

// Exact mode, for mb tokens (1..kNeonTokenTile): reads c.xp, x in natural order zero padded to
// Kp; whole_row: G == 1 (per-row or per-tensor scales).
RowFn neon_exact_rows(int mb, bool whole_row);

// int8 mode, for mb tokens: reads c.q (natural order, zero padded) and c.inv, as the scalar twin.
// dotprod: ARMv8.2 `sdot`; otherwise widening multiplies (any NEON CPU).
RowFn neon_int8_rows(int mb, bool dotprod);

// Rows [n0, n1) dequantized to t * s (fp32, natural order, zero past K) at out + (n - n0) * ld,
// for the prefill GEMM (at::mm).
void neon_dequant_rows(const Ctx& c, int64_t n0, int64_t n1, float* out, int64_t ld, float* sbuf);

}  // namespace bitcpm_cpu
