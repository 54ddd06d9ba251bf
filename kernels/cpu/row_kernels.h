// The row kernels of bitcpm::ternary_linear, by path: what the dispatch (ternary_linear.cpp)
// calls once isa_paths.h has picked a path. A RowFn computes rows [n0, n1) of y for a tile of
// mb tokens (1..kMaxTokenTile); the selectors below return the one for mb. On CPUs of another
// architecture a path's entry points are stand-ins that are never called (BITCPM_NO_SIMD_PATH).
//
// Every SIMD path is tested against the scalar twin and the float64 oracle, forced by
// torch.ops.bitcpm_cpu.ternary_linear_isa (tests/test_cpu_kernel.py, tests/test_ternary_gemm.py).
#pragma once

#include "ternary_linear_rows.h"

namespace bitcpm_cpu {

// ---- scalar twin (rows_scalar.cpp): natural-order x (c.x) and q, any group size.
void exact_rows_scalar(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* sbuf);
// int8 and int16 modes (c.qlo set in int16 mode).
void int8_rows_scalar(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* sbuf);
// Rows [n0, n1) dequantized to t * s (fp32, natural order) at out + (n - n0) * ld.
void dequant_rows_scalar(const Ctx& c, int64_t n0, int64_t n1, float* out, int64_t ld, float* sbuf);

// ---- x86 fp32 paths: x permuted into the decode order (permute_x, rows_avx2.cpp) in c.xp.
// Writes c.x (M, K) to xp (M, Kp) in the order the AVX2/AVX512 decode yields weights.
void permute_x(const Ctx& c, float* xp);
// AVX2 + FMA (rows_avx2.cpp). whole_row: G == 1 (per-row or per-tensor scales).
RowFn avx2_exact_rows(int mb, bool whole_row);
RowFn avx2_int8_rows(int mb);  // any group size >= 32; reads c.q, c.qlane, c.inv
RowFn avx2_int16_rows(int mb);  // the same with c.qlo (int16 mode; AVX512 CPUs run it too)
// Rows dequantized in the permuted order (the ternary GEMM's decoder).
void dequant_rows_avx2(const Ctx& c, int64_t n0, int64_t n1, float* out, int64_t ld, float* sbuf);
// AVX512 F/BW/VL (rows_avx512.cpp); int8 needs VNNI and G == 1 or group_size >= 64. Dequant: the
// AVX2 routine (store bound).
RowFn avx512_exact_rows(int mb, bool whole_row);
RowFn avx512_vnni_int8_rows(int mb);
// The GEMMs' helpers (ternary_gemm.cpp). vnni_pack: nr rows of `words` 32-bit words (at ld words)
// as brgemm's VNNI B, [words][nb] (rows past nr zero; words and nb multiples of 16); a word is a
// bf16 pair or an int8 quad of one row. decode_rows_s8 (AVX2): rows [n0, n1) as int8 t in
// natural order (Kp bytes at out + (n - n0) * ld, padding 0) and each row's sum of t.
void vnni_pack(const uint32_t* rows, int64_t ld, int64_t nr, int64_t words, int64_t nb, uint32_t* out);
void decode_rows_s8(const Ctx& c, int64_t n0, int64_t n1, int8_t* out, int64_t ld, int32_t* sums);

// ---- AVX512-BF16, exact mode with bf16 x (rows_avx512bf16.cpp): x in the bf16 decode order
// (permute_x_bf16) in c.xb, Kc = chunks * kChunkWeights; needs G == 1 or group_size >= 128.
constexpr int64_t kChunkWeights = 256;
void permute_x_bf16(const Ctx& c, const uint16_t* x, uint16_t* xb);
RowFn bf16_exact_rows(int mb, bool whole_row);
// Rows dequantized to bf16 (t * s exact; bf16 scales) in the order of xb, row n at
// out + (n - n0) * ld (the bf16 ternary GEMM's decoder).
void dequant_rows_bf16(const Ctx& c, int64_t n0, int64_t n1, uint16_t* out, int64_t ld);

// ---- aarch64 (rows_neon.cpp): x and q in natural order, zero padded to Kp.
// Exact mode: reads c.xp; whole_row: G == 1.
RowFn neon_exact_rows(int mb, bool whole_row);
// int8 mode: reads c.q and c.inv, as the scalar twin. dotprod: ARMv8.2 `sdot`; otherwise
// widening multiplies (any NEON CPU).
RowFn neon_int8_rows(int mb, bool dotprod);
// Rows [n0, n1) dequantized to t * s (fp32, natural order, zero past K) for prefill's at::mm.
void neon_dequant_rows(const Ctx& c, int64_t n0, int64_t n1, float* out, int64_t ld, float* sbuf);

}  // namespace bitcpm_cpu
