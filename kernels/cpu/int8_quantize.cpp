// Per-token absmax integer quantization (int8 and int16 modes of bitcpm::ternary_linear);
// declarations and the contract in int8_quantize.h.
//
//   scalar: the reference's arithmetic, one element at a time (float multiply, round half to
//     even, clamp to +-qmax); every other routine here falls back to it for non-finite tokens.
//   AVX2: 8 elements per `vmulps` / `vroundps` / `vminps`+`vmaxps` / `vcvtps2dq`, packed to bytes
//     with two `vpackssdw` + `vpacksswb` and one `vpermd` to undo the lane interleave (int16 mode:
//     split into high and low bytes first, each packed so); the same
//     float operations in the same order, so the same bytes. Quantization is one pass over x,
//     small beside the row kernels (benchmarks/profile_decode.py shows it in the op's time).

#include "int8_quantize.h"

#include "cpu_features.h"  // <immintrin.h> on x86

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

namespace bitcpm_cpu {
namespace {
constexpr float kInt8Max = 127.0f;

// int16 mode: v = 256 * hi + lo with lo in [-128, 127] (|v| <= kInt16Max keeps hi in int8).
inline void split16(int32_t v, int8_t* hi, int8_t* lo) {
  const int32_t l = ((v + 128) & 255) - 128;
  *lo = static_cast<int8_t>(l);
  *hi = static_cast<int8_t>((v - l) >> 8);
}
}  // namespace

// Per-token absmax quantization, bit-compatible with reference.quantize_activations:
// inv = qmax/max|x| (1 if all zero, NaN if any non-finite). PyTorch evaluates the reference's
// `qmax / absmax` (int / tensor -> Tensor.__rtruediv__) as `absmax.reciprocal() * qmax`, two
// float32 roundings, and a 1-ulp different inv flips roundings of q; so the same is done here,
// v = clamp(round_half_even(x*inv), +-qmax). inv is capped at FLT_MAX: qmax/absmax overflows
// for a tiny but finite token (absmax below 9.6e-35 in int16 mode, 3.7e-37 in int8 mode), and
// an infinite inv would turn its zeros into 0*inf = NaN. Only non-finite x makes outputs NaN.
void quantize_row_scalar(const Ctx& c, const float* xr, int8_t* q, int8_t* qlo, int32_t* qs, float* inv_out) {
  const float qmax = qlo ? static_cast<float>(kInt16Max) : kInt8Max;
  float absmax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < c.K; ++k) {
    const float a = std::fabs(xr[k]);
    if (!std::isfinite(a)) finite = false;
    absmax = std::max(absmax, a);
  }
  float inv = finite ? (absmax > 0.f ? std::min(qmax * (1.0f / absmax), FLT_MAX) : 1.0f) : NAN;
  auto clear = [&]() {
    std::memset(q, 0, c.Kp);
    if (qlo) std::memset(qlo, 0, c.Kp);
    for (int64_t g = 0; g < c.G; ++g) qs[g] = 0;
  };
  clear();
  if (std::isnan(inv)) {
    *inv_out = inv;
    return;
  }
  for (int64_t k = 0; k < c.K; ++k) {
    const float v = xr[k] * inv;
    if (std::isnan(v)) {
      clear();
      *inv_out = NAN;
      return;
    }
    const float r = std::min(qmax, std::max(-qmax, std::nearbyint(v)));
    const int32_t qi = static_cast<int32_t>(r);
    if (qlo) split16(qi, q + k, qlo + k);
    else q[k] = static_cast<int8_t>(qi);
    qs[group_of(c, k)] += qi;
  }
  *inv_out = inv;
}

#if BITCPM_X86
namespace {
// 32 int32 values (v[0..3], 8 each, in element order) to 32 int8 in element order.
__attribute__((target("avx2,fma"))) inline __m256i pack32_epi8(const __m256i* v) {
  const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i p16a = _mm256_packs_epi32(v[0], v[1]);  // lanes: 0-3 8-11 | 4-7 12-15
  const __m256i p16b = _mm256_packs_epi32(v[2], v[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);  // dwords: 0 2 4 6 | 1 3 5 7 (of 4-elem runs)
  return _mm256_permutevar8x32_epi32(p8, fix);
}
}  // namespace

// Quantize one token with AVX2 (same arithmetic as the scalar twin: float multiply, round half
// to even, clamp). Falls back to the scalar routine for non-finite rows / a non-finite inverse.
__attribute__((target("avx2,fma"))) void quantize_row_avx2(const Ctx& c, const float* xr, int8_t* q, int8_t* qlo,
                                                          int32_t* qs, float* inv_out) {
  const float qmax = qlo ? static_cast<float>(kInt16Max) : kInt8Max;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 vmax = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= c.K; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + k), absmask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
    vmax = _mm256_max_ps(vmax, a);
  }
  float absmax = 0.f;
  {
    alignas(32) float t[8];
    _mm256_store_ps(t, vmax);
    for (float v : t) absmax = std::max(absmax, v);
  }
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; k < c.K; ++k) {
    const float a = std::fabs(xr[k]);
    if (!std::isfinite(a)) finite = false;
    absmax = std::max(absmax, a);
  }
  const float inv = absmax > 0.f ? std::min(qmax * (1.0f / absmax), FLT_MAX) : 1.0f;
  if (!finite || !std::isfinite(inv)) {
    quantize_row_scalar(c, xr, q, qlo, qs, inv_out);
    return;
  }
  *inv_out = inv;
  for (int64_t g = 0; g < c.G; ++g) qs[g] = 0;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  const __m256i k128 = _mm256_set1_epi32(128), k255 = _mm256_set1_epi32(255);
  k = 0;
  // 32 elements at a time: one scale group never splits a 32-chunk (group_size >= 32, power of 2).
  for (; k + 32 <= c.K; k += 32) {
    __m256i v[4];
    for (int j = 0; j < 4; ++j) {
      __m256 r = _mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * j), vinv);
      r = _mm256_round_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
      v[j] = _mm256_cvtps_epi32(r);
    }
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    qs[group_of(c, k)] += hsum256_epi32(sum);
    if (qlo) {  // split16 on 8 lanes: lo = ((v + 128) & 255) - 128, hi = (v - lo) >> 8
      __m256i h[4], l[4];
      for (int j = 0; j < 4; ++j) {
        l[j] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(v[j], k128), k255), k128);
        h[j] = _mm256_srai_epi32(_mm256_sub_epi32(v[j], l[j]), 8);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), pack32_epi8(h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qlo + k), pack32_epi8(l));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), pack32_epi8(v));
    }
  }
  for (; k < c.K; ++k) {
    const float r = std::min(qmax, std::max(-qmax, std::nearbyint(xr[k] * inv)));
    const int32_t qi = static_cast<int32_t>(r);
    if (qlo) split16(qi, q + k, qlo + k);
    else q[k] = static_cast<int8_t>(qi);
    qs[group_of(c, k)] += qi;
  }
  std::memset(q + c.K, 0, c.Kp - c.K);
  if (qlo) std::memset(qlo + c.K, 0, c.Kp - c.K);
}

// Per-lane sums of the integers per group, laid out like the int32 lanes of the SIMD dot
// products: lane 8*(chunk & 1) + j holds the sum over elements 32*chunk + 4j .. 32*chunk + 4j + 3
// of the group's 32-element chunks (AVX512 uses all 16 lanes, AVX2 adds the two halves).
// Subtracting them lane by lane before any float conversion turns sum(v*c) into the exact
// sum(v*t) per lane, so the offset of the unsigned codes never cancels in floating point.
// int16 mode: 256 * (sums of the high bytes) + (sums of the low bytes).
__attribute__((target("avx2,fma"))) void lane_qsums_avx2(const Ctx& c, const int8_t* q, const int8_t* qlo,
                                                        int32_t* ql) {
  std::memset(ql, 0, c.G * 16 * sizeof(int32_t));
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i k256 = _mm256_set1_epi16(256);
  for (int64_t ch = 0; ch < c.Kp / 32; ++ch) {
    const __m256i h = _mm256_maddubs_epi16(ones8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * ch)));
    __m256i v;
    if (qlo) {
      const __m256i l =
          _mm256_maddubs_epi16(ones8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qlo + 32 * ch)));
      v = _mm256_add_epi32(_mm256_madd_epi16(h, k256), _mm256_madd_epi16(l, ones16));
    } else {
      v = _mm256_madd_epi16(h, ones16);
    }
    int32_t* dst = ql + group_of(c, 32 * ch) * 16 + 8 * (ch & 1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst)), v));
  }
}
#else   // not x86: never picked (best_isa() is not an x86 path), see cpu_features.h
void quantize_row_avx2(const Ctx&, const float*, int8_t*, int8_t*, int32_t*, float*) {
  BITCPM_NO_SIMD_PATH("quantize_row_avx2");
}
void lane_qsums_avx2(const Ctx&, const int8_t*, const int8_t*, int32_t*) { BITCPM_NO_SIMD_PATH("lane_qsums_avx2"); }
#endif  // BITCPM_X86

}  // namespace bitcpm_cpu
