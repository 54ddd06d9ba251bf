// The ternary GEMM behind exact-mode bitcpm::ternary_linear for several tokens (fp32 compute).
// ternary_linear.cpp decides when it runs and supplies the row decoder; this file owns the
// blocking, the threads and the library micro-kernel (PyTorch's cpublas::brgemm, a oneDNN ukernel).
#pragma once

#include <cstdint>
#include <functional>

namespace bitcpm_cpu {

// Writes rows [n0, n1) of the dequantized weight (t * s, fp32, in the same K order as x) to
// out, row r at out + (r - n0) * ld. Called from several threads at once on disjoint rows.
using DecodeRowsFp32 = std::function<void(int64_t n0, int64_t n1, float* out, int64_t ld)>;

// y (M x N, row-major, float32) = x (M x K, row-major) . W^T, W's rows coming from decode.
// Each thread owns tiles of kGemmRows output columns (weight rows): it decodes a tile once into
// a buffer that stays in L1/L2 and runs brgemm on it for every tile of tokens, so the packed
// codes are read once per call and never expanded in memory.
void ternary_gemm_fp32(int64_t M, int64_t N, int64_t K, const float* x, float* y, const DecodeRowsFp32& decode);

// Whether brgemm can run fp32 on this CPU (oneDNN's ukernel: x86 with AVX2 and up).
bool ternary_gemm_fp32_available();

}  // namespace bitcpm_cpu
