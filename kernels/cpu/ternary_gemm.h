// The ternary GEMM behind exact-mode bitcpm::ternary_linear for several tokens (fp32 compute, and
// bf16 compute on AVX512-BF16 CPUs).
// ternary_linear.cpp decides when it runs and supplies the row decoder; this file owns the
// blocking, the threads and the library micro-kernel (PyTorch's cpublas::brgemm, a oneDNN ukernel).
#pragma once

#include <cstdint>
#include <functional>

namespace bitcpm_cpu {

// Writes rows [n0, n1) of the dequantized weight (t * s, fp32, in the same K order as x) to
// out, row r at out + (r - n0) * ld. Called from several threads at once on disjoint rows.
using DecodeRowsFp32 = std::function<void(int64_t n0, int64_t n1, float* out, int64_t ld)>;

// Takes a finished fp32 block of y: tokens [m0, m0 + mb) x rows [n0, n0 + nr) at c (ld_c), so the
// caller writes it in the output's dtype (no fp32 copy of a large y written and read again).
using StoreBlock = std::function<void(int64_t m0, int64_t mb, int64_t n0, int64_t nr, const float* c, int64_t ld_c)>;

// y (M x N) = x (M x K, row-major, fp32) . W^T, W's rows coming from decode; each finished block
// of y goes to store. Each thread owns tiles of kGemmRows output columns (weight rows): it decodes
// a tile once into a buffer that stays in L1/L2 and runs brgemm on it for every tile of tokens,
// so the packed codes are read once per call and never expanded in memory.
void ternary_gemm_fp32(int64_t M, int64_t N, int64_t K, const float* x, const StoreBlock& store,
                       const DecodeRowsFp32& decode);

// Writes rows [n0, n1) of the dequantized weight as bf16 bits (t * s exact: bf16 scales), in x's
// K order, row r at out + (r - n0) * ld.
using DecodeRowsBf16 = std::function<void(int64_t n0, int64_t n1, uint16_t* out, int64_t ld)>;

// The same with bf16 x (bits, M x K, K a multiple of 32) and bf16 products accumulated in fp32
// (vdpbf16ps; AMX where the CPU has it): for AVX512-BF16 CPUs. Exact products, fp32 sums, as the
// fp32 GEMM. Each finished block goes to store.
void ternary_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* x, const StoreBlock& store,
                       const DecodeRowsBf16& decode);

// int8 mode (AVX512-VNNI; u8 x s8 dot products, AMX-INT8 where present): xu is the quantized
// activations q + 128 as u8 (M x K, K a multiple of 64), so C = sum (q + 128) * t, and the
// caller's finish gets, per tile of rows [n0, n0 + nr) and tokens [m0, m0 + mb), C (mb x nr at
// ld_c, int32, exact) and each row's sum of t: sum q * t = C - 128 * sum t, exactly.
using DecodeRowsS8 = std::function<void(int64_t n0, int64_t n1, int8_t* out, int64_t ld, int32_t* sums)>;
using FinishInt8 = std::function<void(int64_t n0, int64_t nr, int64_t m0, int64_t mb, const int32_t* c,
                                      int64_t ld_c, const int32_t* sums)>;
void ternary_gemm_int8(int64_t M, int64_t N, int64_t K, const uint8_t* xu, const DecodeRowsS8& decode,
                       const FinishInt8& finish);

// Whether brgemm can run fp32 on this CPU (oneDNN's ukernel: x86 with AVX2 and up).
bool ternary_gemm_fp32_available();

}  // namespace bitcpm_cpu
