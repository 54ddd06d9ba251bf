// The scalar row kernels of bitcpm::ternary_linear: the twin every SIMD path is tested against
// (tests/test_cpu_kernel.py runs each path forced by ternary_linear_isa against it and against
// the float64 oracle). Always compiled, on every architecture; the path of CPUs without AVX2 or
// NEON (which the plugin's backend choice steers to other kernels, vllm_bitcpm/backends.py), of
// group sizes outside the packed layout's, and the reference for reading the layout: one code
// per 2-bit field, t = code - 1, weight t * s.

#include "row_kernels.h"

#include <algorithm>

namespace bitcpm_cpu {
namespace {

inline int code_at(const uint8_t* row, int64_t k) {
  const int64_t blk = k / kBlockWeights, e = k % kBlockWeights;
  return (row[blk * kBlockBytes + (e & 31)] >> (2 * (e >> 5))) & 3;
}

}  // namespace

void exact_rows_scalar(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* sbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = c.x + m * c.K;
      float acc = 0.f;
      for (int64_t k = 0; k < c.K; ++k) {
        const float s = sbuf[group_of(c, k)];
        const float w = static_cast<float>(code_at(row, k) - 1) * s;  // t*s exactly, as dense W
        acc += xr[k] * w;
      }
      c.y[m * c.N + n] = acc;
    }
  }
}

void dequant_rows_scalar(const Ctx& c, int64_t n0, int64_t n1, float* out, int64_t ld, float* sbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    float* o = out + (n - n0) * ld;
    for (int64_t k = 0; k < c.K; ++k) o[k] = static_cast<float>(code_at(row, k) - 1) * sbuf[group_of(c, k)];
  }
}

// int8 and int16 modes: each group's integer dot product exactly, then scaled in float.
void int8_rows_scalar(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* sbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* qr = c.q + m * c.Kp;
      const int8_t* lr = c.qlo ? c.qlo + m * c.Kp : nullptr;
      float acc = 0.f;
      int64_t k = 0;
      for (int64_t g = 0; g < c.G; ++g) {
        const int64_t kend = (c.G == 1) ? c.K : std::min(c.K, (g + 1) * c.gs);
        int32_t d = 0;
        for (; k < kend; ++k) {
          const int32_t v = lr ? 256 * static_cast<int32_t>(qr[k]) + lr[k] : qr[k];
          d += v * (code_at(row, k) - 1);
        }
        acc += sbuf[g] * static_cast<float>(d);
      }
      c.y[m * c.N + n] = acc / c.inv[m];
    }
  }
}

}  // namespace bitcpm_cpu
