// aarch64 NEON row kernels of bitcpm::ternary_linear (entry points: row_kernels.h); scalar twin:
// rows_scalar.cpp.
//
// x and q are read in natural order: the 32 bytes of a block, split into two 16-byte vectors,
// give the codes of 16 consecutive elements per vector and 2-bit field (field s of byte j is
// element 32*s + j), so no activation is permuted.
//
//   exact mode: per 16 codes, two `tbl` lookups give bytes 2 and 3 of the fp32 weights
//     t in {-1, 0, +1} (bytes 0 and 1 are zero), and one two-register `tbl` per 4 weights places
//     them into float lanes: 1.8 instructions per 4 weights, then one `fmla` per token. Products
//     x*t are exact; the scale multiplies each group's fp32 sum once (fused into the running
//     total), as the AVX512-BF16 path does, so the error is fp32 summation alone.
//   int8 mode: codes become signed t by a `tbl` from {-1, 0, +1, 0}, then `sdot` (ARMv8.2
//     dotprod) sums 4 products t*q per int32 lane; without dotprod, `smull` + `smlal2` +
//     `sadalp` do the same. The integer dot product of each group is exact, and the group sums
//     are scaled and added in the scalar twin's order, so results equal the scalar path's bit
//     for bit (the quantization of x is the scalar twin's, done by the dispatch).
//
// The whole file is compiled for the baseline aarch64 ISA (ARMv8-A: NEON is part of it); `sdot`
// sits in functions with a target attribute, called only where cpu_has_neon_dotprod() holds.
// On other CPUs the file holds stand-ins that are never called.

#include "row_kernels.h"

#include "cpu_features.h"

#if BITCPM_ARM64
#include <arm_neon.h>

#if defined(__clang__)
#define BITCPM_TARGET_DOTPROD __attribute__((target("dotprod")))
#else
#define BITCPM_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))  // GCC's arm_neon.h wants the arch level too
#endif
#endif

namespace bitcpm_cpu {

#if BITCPM_ARM64
namespace {

// Codes of 2-bit field s of 16 code bytes, as table indices. Fields 2 and 3 need no mask: the
// tables repeat with period 4, so the bits of higher fields left in the index do not matter.
inline uint8x16_t field_codes(uint8x16_t d, int s) {
  switch (s) {
    case 0: return vandq_u8(d, vdupq_n_u8(3));
    case 1: return vandq_u8(vshrq_n_u8(d, 2), vdupq_n_u8(3));
    case 2: return vshrq_n_u8(d, 4);
    default: return vshrq_n_u8(d, 6);
  }
}

// Tables of the exact-mode decode. byte2 / byte3: bytes 2 and 3 of the fp32 weight for code
// 0, 1, 2 (-1.0f = 0xBF800000, 0, +1.0f = 0x3F800000), repeated with period 4. place[j]: the
// `tbl` indices that put weight k of {byte2, byte3} lookups 4j..4j+3 into float lane k (index
// 0xFF gives a zero byte).
struct ExactTables {
  uint8x16_t byte2, byte3;
  uint8x16_t place[4];
};

inline ExactTables exact_tables() {
  static const uint8_t byte2[16] = {0x80, 0, 0x80, 0, 0x80, 0, 0x80, 0, 0x80, 0, 0x80, 0, 0x80, 0, 0x80, 0};
  static const uint8_t byte3[16] = {0xBF, 0, 0x3F, 0, 0xBF, 0, 0x3F, 0, 0xBF, 0, 0x3F, 0, 0xBF, 0, 0x3F, 0};
  ExactTables t;
  t.byte2 = vld1q_u8(byte2);
  t.byte3 = vld1q_u8(byte3);
  for (int j = 0; j < 4; ++j) {
    uint8_t p[16];
    for (int k = 0; k < 4; ++k) {
      p[4 * k] = p[4 * k + 1] = 0xFF;
      p[4 * k + 2] = static_cast<uint8_t>(4 * j + k);       // byte 2 from the byte2 lookup
      p[4 * k + 3] = static_cast<uint8_t>(16 + 4 * j + k);  // byte 3 from the byte3 lookup
    }
    t.place[j] = vld1q_u8(p);
  }
  return t;
}

// The high bytes of 16 fp32 weights t (codes of 16 consecutive elements).
inline uint8x16x2_t weight_bytes(const ExactTables& tb, uint8x16_t codes) {
  return {{vqtbl1q_u8(tb.byte2, codes), vqtbl1q_u8(tb.byte3, codes)}};
}

// Weights 4j..4j+3 of those 16, as floats.
inline float32x4_t weights4(const ExactTables& tb, const uint8x16x2_t& bytes, int j) {
  return vreinterpretq_f32_u8(vqtbl2q_u8(bytes, tb.place[j]));
}

// A = independent accumulator chains per token: `fmla` has a latency of ~4 cycles, so a single
// chain would make a 1-token row latency bound. WholeRow (G == 1, BitCPM4): the row's scale
// multiplies the sum once, no group bookkeeping.
template <int MB, bool WholeRow>
void exact_rows_t(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, float* sbuf) {
  constexpr int A = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  const ExactTables tb = exact_tables();
  const float* xb = c.xp + m0 * c.Kp;
  for (int64_t n = n0; n < n1; ++n) {
    if (!WholeRow) load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    float32x4_t acc[MB][A], tot[MB];
    for (int m = 0; m < MB; ++m) {
      tot[m] = vdupq_n_f32(0.f);
      for (int a = 0; a < A; ++a) acc[m][a] = vdupq_n_f32(0.f);
    }
    // Group of the partial sums in acc; at a change they are scaled into tot (G > 1 only).
    auto flush = [&](int64_t g) {
      for (int m = 0; m < MB; ++m) {
        float32x4_t sum = acc[m][0];
        for (int a = 1; a < A; ++a) sum = vaddq_f32(sum, acc[m][a]);
        tot[m] = vfmaq_n_f32(tot[m], sum, sbuf[g]);
        for (int a = 0; a < A; ++a) acc[m][a] = vdupq_n_f32(0.f);
      }
    };
    int64_t cur_g = 0;
    for (int64_t blk = 0; blk < c.nblk; ++blk) {
      const uint8x16_t d[2] = {vld1q_u8(row + blk * kBlockBytes), vld1q_u8(row + blk * kBlockBytes + 16)};
      const float* xk = xb + blk * kBlockWeights;
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        if (!WholeRow) {
          const int64_t g = group_of(c, blk * kBlockWeights + 32 * s);
          if (g != cur_g) {
            flush(cur_g);
            cur_g = g;
          }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const uint8x16x2_t bytes = weight_bytes(tb, field_codes(d[h], s));
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const float32x4_t w = weights4(tb, bytes, j);
            const float* xj = xk + 32 * s + 16 * h + 4 * j;
#pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) acc[m][j % A] = vfmaq_f32(acc[m][j % A], w, vld1q_f32(xj + m * c.Kp));
          }
        }
      }
    }
    if (WholeRow) {
      const float row_scale = whole_row_scale(c, n);
      for (int m = 0; m < MB; ++m) {
        float32x4_t sum = acc[m][0];
        for (int a = 1; a < A; ++a) sum = vaddq_f32(sum, acc[m][a]);
        c.y[(m0 + m) * c.N + n] = vaddvq_f32(sum) * row_scale;
      }
    } else {
      flush(cur_g);
      for (int m = 0; m < MB; ++m) c.y[(m0 + m) * c.N + n] = vaddvq_f32(tot[m]);
    }
  }
}

// Signed weights t of 16 codes (int8 mode): {-1, 0, +1} by a `tbl`, period 4 as above.
inline int8x16_t ternary_s8(uint8x16_t codes) {
  static const int8_t ternary[16] = {-1, 0, 1, 0, -1, 0, 1, 0, -1, 0, 1, 0, -1, 0, 1, 0};
  return vqtbl1q_s8(vld1q_s8(ternary), codes);
}

// acc += dot products of 16 t with 16 q, 4 per int32 lane (|t*q| <= 127: no overflow within a
// row below 2^24 weights).
BITCPM_TARGET_DOTPROD inline int32x4_t dot16_sdot(int32x4_t acc, int8x16_t t, int8x16_t q) {
  return vdotq_s32(acc, t, q);
}

inline int32x4_t dot16_smull(int32x4_t acc, int8x16_t t, int8x16_t q) {
  const int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(t), vget_low_s8(q)), t, q);  // |lane| <= 254
  return vpadalq_s16(acc, p);
}

// The int8 row loop, for both dot instructions (Dot: one of the dot16_* functions). Groups are
// whole 32-element chunks (group_size a power of two >= 32, or G == 1); chunks wholly past K
// hold t = 0 and q = 0 and are skipped. Per group: the exact int32 dot product, then
// acc += scale * dot in float, in group order, and y = acc / inv: the scalar twin's arithmetic.
template <int MB, int32x4_t (*Dot)(int32x4_t, int8x16_t, int8x16_t)>
inline __attribute__((always_inline)) void int8_rows_body(const Ctx& c, int64_t n0, int64_t n1, int64_t m0,
                                                           float* sbuf) {
  const int8_t* qb = c.q + m0 * c.Kp;
  const int64_t nchunk = (c.K + 31) / 32;
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    float out[MB];
    int32x4_t acc[MB][2];  // two chains per token: the two 16-byte halves of a chunk
    for (int m = 0; m < MB; ++m) {
      out[m] = 0.f;
      acc[m][0] = acc[m][1] = vdupq_n_s32(0);
    }
    auto flush = [&](int64_t g) {
      for (int m = 0; m < MB; ++m) {
        const int32_t dot = vaddvq_s32(vaddq_s32(acc[m][0], acc[m][1]));
        out[m] += sbuf[g] * static_cast<float>(dot);
        acc[m][0] = acc[m][1] = vdupq_n_s32(0);
      }
    };
    int64_t cur_g = 0;
    for (int64_t blk = 0; blk * 4 < nchunk; ++blk) {
      const uint8x16_t d[2] = {vld1q_u8(row + blk * kBlockBytes), vld1q_u8(row + blk * kBlockBytes + 16)};
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const int64_t ch = 4 * blk + s;
        if (ch >= nchunk) break;
        const int64_t g = group_of(c, 32 * ch);
        if (g != cur_g) {
          flush(cur_g);
          cur_g = g;
        }
        const int8x16_t t0 = ternary_s8(field_codes(d[0], s)), t1 = ternary_s8(field_codes(d[1], s));
        const int8_t* qk = qb + 32 * ch;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          acc[m][0] = Dot(acc[m][0], t0, vld1q_s8(qk + m * c.Kp));
          acc[m][1] = Dot(acc[m][1], t1, vld1q_s8(qk + m * c.Kp + 16));
        }
      }
    }
    flush(cur_g);
    for (int m = 0; m < MB; ++m) c.y[(m0 + m) * c.N + n] = out[m] / c.inv[m0 + m];
  }
}

template <int MB>
BITCPM_TARGET_DOTPROD void int8_rows_sdot_t(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, float* sbuf) {
  int8_rows_body<MB, dot16_sdot>(c, n0, n1, m0, sbuf);
}

template <int MB>
void int8_rows_smull_t(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, float* sbuf) {
  int8_rows_body<MB, dot16_smull>(c, n0, n1, m0, sbuf);
}

template <int MB> void exact_rows_groups(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) {
  exact_rows_t<MB, false>(c, a, b, m, s);
}
template <int MB> void exact_rows_whole_row(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) {
  exact_rows_t<MB, true>(c, a, b, m, s);
}

template <int MB> struct ExactGroups { static constexpr RowFn fn = &exact_rows_groups<MB>; };
template <int MB> struct ExactWholeRow { static constexpr RowFn fn = &exact_rows_whole_row<MB>; };
template <int MB> struct Int8Sdot { static constexpr RowFn fn = &int8_rows_sdot_t<MB>; };
template <int MB> struct Int8Smull { static constexpr RowFn fn = &int8_rows_smull_t<MB>; };

}  // namespace

RowFn neon_exact_rows(int mb, bool whole_row) {
  return whole_row ? pick_tokens<ExactWholeRow>(mb) : pick_tokens<ExactGroups>(mb);
}

RowFn neon_int8_rows(int mb, bool dotprod) {
  return dotprod ? pick_tokens<Int8Sdot>(mb) : pick_tokens<Int8Smull>(mb);
}

void neon_dequant_rows(const Ctx& c, int64_t n0, int64_t n1, float* out, int64_t ld, float* sbuf) {
  const ExactTables tb = exact_tables();
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    float* o = out + (n - n0) * ld;
    for (int64_t blk = 0; blk < c.nblk; ++blk) {
      const uint8x16_t d[2] = {vld1q_u8(row + blk * kBlockBytes), vld1q_u8(row + blk * kBlockBytes + 16)};
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const float scale = sbuf[group_of(c, blk * kBlockWeights + 32 * s)];
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const uint8x16x2_t bytes = weight_bytes(tb, field_codes(d[h], s));
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j)
            vst1q_f32(o + blk * kBlockWeights + 32 * s + 16 * h + 4 * j, vmulq_n_f32(weights4(tb, bytes, j), scale));
        }
      }
    }
  }
}

#else  // not aarch64: never picked (cpu_has_neon() is false), see cpu_features.h

RowFn neon_exact_rows(int, bool) { BITCPM_NO_SIMD_PATH("neon_exact_rows"); }
RowFn neon_int8_rows(int, bool) { BITCPM_NO_SIMD_PATH("neon_int8_rows"); }
void neon_dequant_rows(const Ctx&, int64_t, int64_t, float*, int64_t, float*) {
  BITCPM_NO_SIMD_PATH("neon_dequant_rows");
}

#endif  // BITCPM_ARM64

}  // namespace bitcpm_cpu
