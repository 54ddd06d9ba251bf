// Per-token integer quantization of the activations for the int8 and int16 modes of
// bitcpm::ternary_linear (int8_quantize.cpp): the scalar twin, bit-compatible with
// vllm_bitcpm.ops.reference.quantize_activations, and its AVX2 copy, which must give the same
// bytes (tests/test_cpu_kernel.py compares every path's integer-mode output with the reference).
#pragma once

#include "ternary_linear_rows.h"

namespace bitcpm_cpu {

// One token: q (zero padded to c.Kp), the per-group sums of the token's integers, and inv =
// qmax / max|x| (NaN for a token with a non-finite value: its outputs become NaN, as the dense
// layer's would). int8 mode: qlo == nullptr, qmax 127, q the integers. int16 mode: qmax
// kInt16Max, the integer v split as v = 256 * q + qlo (Ctx).
void quantize_row_scalar(const Ctx& c, const float* xr, int8_t* q, int8_t* qlo, int32_t* qs, float* inv_out);
void quantize_row_avx2(const Ctx& c, const float* xr, int8_t* q, int8_t* qlo, int32_t* qs, float* inv_out);

// Per-lane sums of the token's integers per group (c.qlane's layout), for the x86 row kernels'
// exact offsets; qlo as above.
void lane_qsums_avx2(const Ctx& c, const int8_t* q, const int8_t* qlo, int32_t* ql);

}  // namespace bitcpm_cpu
