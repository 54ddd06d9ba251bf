// Per-token int8 quantization of the activations for int8 mode of bitcpm::ternary_linear
// (int8_quantize.cpp): the scalar twin, bit-compatible with vllm_bitcpm.ops.reference, and its
// AVX2 copy, which must give the same bytes (tests/test_cpu_kernel.py compares every path's
// int8 output with the reference bit for bit).
#pragma once

#include "ternary_linear_rows.h"

namespace bitcpm_cpu {

// One token: q (zero padded to c.Kp), the per-group sums of q, and inv = 127 / max|x| (NaN for
// a token with a non-finite value: its outputs become NaN, as the dense layer's would).
void quantize_row_scalar(const Ctx& c, const float* xr, int8_t* qr, int32_t* qs, float* inv_out);
void quantize_row_avx2(const Ctx& c, const float* xr, int8_t* qr, int32_t* qs, float* inv_out);

// Per-lane sums of q per group (c.qlane's layout), for the x86 int8 row kernels' exact offsets.
void lane_qsums_avx2(const Ctx& c, const int8_t* qr, int32_t* ql);

}  // namespace bitcpm_cpu
