// AVX2 + FMA row kernels of bitcpm::ternary_linear (entry points: row_kernels.h); scalar twin:
// rows_scalar.cpp.
//
//   exact mode: per 32-bit lane of a 32-byte code load, `vpsrld` by (8*byte + 2*shift) then
//     `vpermilps` from the table {-s,0,s,0} in each 128-bit half gives 8 scaled float weights (2
//     instructions per 8 weights), then one `vfmadd231ps` per token; 2-4 accumulator chains per
//     token. The weights come out in a permuted element order, so x is permuted once per call
//     (permute_x). Whole-row scales keep the table {-1,0,1,0} and scale the row's sum once.
//     Counts: 14.6 instructions per 32 weights for a 1-token gate_up call, 13.4 at 10 tokens
//     (benchmarks/instruction_counts.py, valgrind; results/instruction_counts.json).
//   dequant: the same decode stored to memory, rows of the ternary GEMM's tiles (ternary_gemm.cpp).
//   int8 mode: codes as unsigned bytes (t+1) by `vpsrlw` + `vpand`, `vpmaddubsw(codes, q)` then
//     `vpmaddwd(., 1)` into int32 lanes; the per-lane sums of q (c.qlane) subtracted before any
//     float conversion, so each group's dot product is exact. Whole-row scales: rows in fours,
//     reduced together (int8_whole_rows_avx2_t).
//   int16 mode: the int8 routine with a second `vpmaddubsw` per 32 weights and token on the low
//     bytes of the integers, `vpmaddwd(high, 256) + vpmaddwd(low, 1)`: the same decode, twice
//     the multiply-adds, still exact integer sums.
//
// Compiled for the baseline ISA: the SIMD functions carry __attribute__((target("avx2,fma"))) and
// run only after cpu_has_avx2() (cpu_features.h); off x86 the entry points are stand-ins.

#include "row_kernels.h"

#include "cpu_features.h"  // <immintrin.h> on x86

#include <ATen/Parallel.h>

#include <algorithm>

namespace bitcpm_cpu {

// Permute x (M, K) into the SIMD order, zero padded to Kp: position 32*s + 8*b + l of a block
// holds element 32*s + 4*l + b (the order in which lane l of a 32-bit code word yields codes).
void permute_x(const Ctx& c, float* xp) {
  at::parallel_for(0, c.M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = c.x + m * c.K;
      float* o = xp + m * c.Kp;
      for (int64_t blk = 0; blk < c.nblk; ++blk) {
        const int64_t base = blk * kBlockWeights;
        if (base + kBlockWeights <= c.K) {
          for (int s = 0; s < 4; ++s)
            for (int b = 0; b < 4; ++b)
              for (int l = 0; l < 8; ++l) o[base + 32 * s + 8 * b + l] = xr[base + 32 * s + 4 * l + b];
        } else {
          for (int s = 0; s < 4; ++s)
            for (int b = 0; b < 4; ++b)
              for (int l = 0; l < 8; ++l) {
                const int64_t k = base + 32 * s + 4 * l + b;
                o[base + 32 * s + 8 * b + l] = k < c.K ? xr[k] : 0.f;
              }
        }
      }
    }
  });
}

#if BITCPM_X86
namespace {

// Dequantize a 32-weight chunk (chunk s of the block whose code word is d) into 4 vectors of 8
// scaled weights, in permuted order. lut = {-s, 0, s, 0, -s, 0, s, 0}: `vpermilps` (variable)
// picks, within each 128-bit half, the entry that the low 2 bits of each lane name, i.e. exactly
// the code; both halves hold the same 4 entries. It is an in-lane shuffle: on AMD Zen 2/3 the
// cross-lane `vpermps` this loop used before is the bottleneck (inner loop 13.4 -> 21.7 G
// weights/s on a Zen 3 core, benchmarks/inner_loop_ceiling.py), and on Intel both cost the same.
// Same table entry, same bits: the results did not change.
#define BITCPM_W_AVX2(d, s, b, lut) \
  _mm256_permutevar_ps((lut), ((8 * (b) + 2 * (s)) == 0) ? (d) : _mm256_srli_epi32((d), 8 * (b) + 2 * (s)))

// A = independent accumulator chains per token (FMA latency 4 vs 1 FMA per 8 weights: with a
// single chain a 1-token row is latency bound), chunk s feeds chain s % A.
// WholeRow (G == 1, per-row or per-tensor scales, as BitCPM4): the table stays {-1, 0, +1, 0}
// (products x*t exact) and the row's scale multiplies the fp32 sum once, so a row has no scale
// buffer, group bookkeeping or table multiply: 22.5 -> 14.6 instructions per 32 weights for a
// 1-token gate_up call, 15.4 -> 13.4 at 10 tokens (benchmarks/instruction_counts.py), where a
// 1024-wide row is only 8 blocks.
template <int MB, bool WholeRow>
__attribute__((target("avx2,fma"))) void exact_rows_avx2_t(const Ctx& c, int64_t n0, int64_t n1, int64_t m0,
                                                          float* sbuf) {
  constexpr int A = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);
  const __m256 base = _mm256_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
  for (int64_t n = n0; n < n1; ++n) {
    if (!WholeRow) load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    const float* xb = c.xp + m0 * c.Kp;
    __m256 acc[MB][A];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t cur_g = -1;
    __m256 lut = base;
    for (int64_t blk = 0; blk < c.nblk; ++blk) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * kBlockBytes));
      const float* xk = xb + blk * kBlockWeights;
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        if (!WholeRow) {
          const int64_t g = group_of(c, blk * kBlockWeights + 32 * s);
          if (g != cur_g) {
            cur_g = g;
            lut = _mm256_mul_ps(_mm256_set1_ps(sbuf[g]), base);
          }
        }
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) {
          const __m256 w = BITCPM_W_AVX2(d, s, b, lut);
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m)
            acc[m][s % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + m * c.Kp + 32 * s + 8 * b), acc[m][s % A]);
        }
      }
    }
    const float row_scale = WholeRow ? whole_row_scale(c, n) : 1.f;
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[m][0];
#pragma GCC unroll 4
      for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]);
      c.y[(m0 + m) * c.N + n] = WholeRow ? hsum256(t) * row_scale : hsum256(t);
    }
  }
}

__attribute__((target("avx2,fma"))) inline __m256i qlane8(const int32_t* ql) {
  return _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 8)));
}

// int8: codes of chunk s (32 consecutive elements) as unsigned bytes.
#define BITCPM_C_AVX2(d, s, m3) _mm256_and_si256((s) == 0 ? (d) : _mm256_srli_epi16((d), 2 * (s)), (m3))

// The int32 lanes of dot(codes, v) for one token from vpmaddubsw's int16 pair sums: int8 mode
// a = codes . q; int16 mode also b = codes . qlo, and v = 256 * q + qlo, so 256 * a + b.
template <bool Int16>
__attribute__((target("avx2,fma"))) inline __m256i widen_dot(__m256i a, __m256i b, __m256i ones, __m256i k256) {
  if (!Int16) return _mm256_madd_epi16(a, ones);
  return _mm256_add_epi32(_mm256_madd_epi16(a, k256), _mm256_madd_epi16(b, ones));
}

// The integer dot of one 128-weight block (codes c0..c3 of its 4 chunks) with token m's integers
// at qm (and the low bytes at lm in int16 mode), as 8 int32 lanes.
template <bool Int16>
__attribute__((target("avx2,fma"))) inline __m256i block_dot(__m256i c0, __m256i c1, __m256i c2, __m256i c3,
                                                            const int8_t* qm, const int8_t* lm, __m256i ones,
                                                            __m256i k256) {
  const __m256i* q = reinterpret_cast<const __m256i*>(qm);
  __m256i a = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(q));  // |int16 lane| <= 4*512 after 4
  a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c1, _mm256_loadu_si256(q + 1)));
  a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c2, _mm256_loadu_si256(q + 2)));
  a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c3, _mm256_loadu_si256(q + 3)));
  __m256i b = a;
  if (Int16) {
    const __m256i* l = reinterpret_cast<const __m256i*>(lm);
    b = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(l));
    b = _mm256_add_epi16(b, _mm256_maddubs_epi16(c1, _mm256_loadu_si256(l + 1)));
    b = _mm256_add_epi16(b, _mm256_maddubs_epi16(c2, _mm256_loadu_si256(l + 2)));
    b = _mm256_add_epi16(b, _mm256_maddubs_epi16(c3, _mm256_loadu_si256(l + 3)));
  }
  return widen_dot<Int16>(a, b, ones, k256);
}

// Blocks [b0, b1) of one row, decoded once and dotted with MB tokens' integers, added to acc.
template <int MB, bool Int16>
__attribute__((target("avx2,fma"))) inline void add_block_dots(const uint8_t* row, int64_t b0, int64_t b1,
                                                              const int8_t* qb, const int8_t* lb, int64_t Kp,
                                                              __m256i* acc) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i k256 = _mm256_set1_epi16(256);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * kBlockBytes));
    const __m256i c0 = BITCPM_C_AVX2(d, 0, m3), c1 = BITCPM_C_AVX2(d, 1, m3);
    const __m256i c2 = BITCPM_C_AVX2(d, 2, m3), c3 = BITCPM_C_AVX2(d, 3, m3);
    const int64_t off = blk * kBlockWeights;
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      acc[m] = _mm256_add_epi32(acc[m], block_dot<Int16>(c0, c1, c2, c3, qb + off + m * Kp,
                                                          Int16 ? lb + off + m * Kp : nullptr, ones, k256));
  }
}

// Whole-row scales (G == 1, as BitCPM4), int8 and int16 modes: rows in fours. Each row's lanes
// minus the token's per-lane sums (c.qlane) are exact signed dots, each lane and any sum of them
// within int32 (|dot| <= kInt16Max * K < 2^31); the four rows' lanes are reduced together by
// `vphaddd` and scaled, converted and divided as one vector, float(dot) * scale / inv as before
// (the same bits as the one-row reduction; the scalar twin's values, though it writes a zero
// result as +0 where this gives the sign of scale * 0). Reduced one at a time (a serial tail of hsum,
// int64 round trip, scale, divide and store per row), a 1024-wide row's tail cost about as much
// as its 8 blocks: the op at one token ran at half its inner loop's rate (results/avx2-only/
// int8-whole-rows-ab.txt: 0.78x the time at one token, 0.87x at 8).
template <int MB, bool Int16>
__attribute__((target("avx2,fma"))) void int8_whole_rows_avx2_t(const Ctx& c, int64_t n0, int64_t n1, int64_t m0) {
  const int8_t* qb = c.q + m0 * c.Kp;
  const int8_t* lb = Int16 ? c.qlo + m0 * c.Kp : nullptr;
  alignas(32) int32_t lanes[4][MB][8];  // exact per-lane dots of up to 4 rows
  for (int64_t n = n0; n < n1; n += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, n1 - n));
    for (int r = 0; r < 4; ++r) {
      __m256i acc[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
      if (r < rows) {  // rows past n1 stay zero and are not stored
        add_block_dots<MB, Int16>(c.codes + (n + r) * c.row_bytes, 0, c.nblk, qb, lb, c.Kp, acc);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_sub_epi32(acc[m], qlane8(c.qlane + (m0 + m) * 16));
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[r][m]), acc[m]);
    }
    alignas(16) float scale[4];
    for (int r = 0; r < 4; ++r) scale[r] = r < rows ? whole_row_scale(c, n + r) : 0.f;
    const __m128 sv = _mm_load_ps(scale);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m256i h01 = _mm256_hadd_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes[0][m])),
                                            _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes[1][m])));
      const __m256i h23 = _mm256_hadd_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes[2][m])),
                                            _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes[3][m])));
      const __m256i h = _mm256_hadd_epi32(h01, h23);  // row r's lanes 0-3 in lane r, lanes 4-7 in lane 4 + r
      const __m128i dot = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      const __m128 out = _mm_div_ps(_mm_mul_ps(_mm_cvtepi32_ps(dot), sv), _mm_set1_ps(c.inv[m0 + m]));
      float* y = c.y + (m0 + m) * c.N + n;
      if (rows == 4) {
        _mm_storeu_ps(y, out);
      } else {
        alignas(16) float t[4];
        _mm_store_ps(t, out);
        for (int r = 0; r < rows; ++r) y[r] = t[r];
      }
    }
  }
}

// int8 and int16 modes. Int16: the same decoded codes meet both bytes of each integer (two
// vpmaddubsw per 32 weights and token instead of one), so the decode is shared and the sums stay
// exact integers.
template <int MB, bool Int16>
__attribute__((target("avx2,fma"))) void int8_rows_avx2_t(const Ctx& c, int64_t n0, int64_t n1, int64_t m0,
                                                         float* sbuf) {
  if (c.G == 1) return int8_whole_rows_avx2_t<MB, Int16>(c, n0, n1, m0);
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i k256 = _mm256_set1_epi16(256);
  const int8_t* qb = c.q + m0 * c.Kp;
  const int8_t* lb = Int16 ? c.qlo + m0 * c.Kp : nullptr;
  // Groups made of whole blocks (group_size a multiple of 128): integer accumulation over the
  // group; group_size 32/64: flush to float per chunk / pair of chunks.
  const bool block_groups = c.gs % kBlockWeights == 0;
  const int64_t bpg = std::max<int64_t>(1, c.gs / kBlockWeights);
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    float out[MB];
    if (block_groups) {
      __m256 accf[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) accf[m] = _mm256_setzero_ps();
      for (int64_t g0 = 0, g = 0; g0 < c.nblk; g0 += bpg, ++g) {
        const int64_t g1 = std::min(c.nblk, g0 + bpg);
        __m256i acc[MB];
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
        add_block_dots<MB, Int16>(row, g0, g1, qb, lb, c.Kp, acc);
        const int64_t gg = std::min(g, c.G - 1);
        const __m256 sv = _mm256_set1_ps(sbuf[gg]);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m256i exact = _mm256_sub_epi32(acc[m], qlane8(c.qlane + ((m0 + m) * c.G + gg) * 16));
          accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), sv, accf[m]);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) out[m] = hsum256(accf[m]);
    } else {
      // group_size 32 or 64: one or two chunks per group.
      const int cpg = static_cast<int>(c.gs / 32);
      __m256 accf[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) accf[m] = _mm256_setzero_ps();
      for (int64_t blk = 0; blk < c.nblk; ++blk) {
        const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * kBlockBytes));
        const int64_t off = blk * kBlockWeights;
        for (int s = 0; s < 4; s += cpg) {
          // Chunks wholly past K hold codes 1 and q 0: skip them (their group index would be
          // clamped onto the last group, whose lane sums must be subtracted only once).
          if (off + 32 * s >= c.K) break;
          const int64_t gg = group_of(c, off + 32 * s);
          const __m256 sv = _mm256_set1_ps(sbuf[gg]);
          const int32_t* qlg = c.qlane + (m0 * c.G + gg) * 16;
          const __m256i ca = BITCPM_C_AVX2(d, s, m3);
          const __m256i cb = cpg == 1 ? ca : BITCPM_C_AVX2(d, s + 1, m3);
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) {
            const __m256i* qm = reinterpret_cast<const __m256i*>(qb + off + m * c.Kp + 32 * s);
            __m256i a = _mm256_maddubs_epi16(ca, _mm256_loadu_si256(qm));
            if (cpg == 2) a = _mm256_add_epi16(a, _mm256_maddubs_epi16(cb, _mm256_loadu_si256(qm + 1)));
            __m256i b = a;
            if (Int16) {
              const __m256i* lm = reinterpret_cast<const __m256i*>(lb + off + m * c.Kp + 32 * s);
              b = _mm256_maddubs_epi16(ca, _mm256_loadu_si256(lm));
              if (cpg == 2) b = _mm256_add_epi16(b, _mm256_maddubs_epi16(cb, _mm256_loadu_si256(lm + 1)));
            }
            const __m256i exact = _mm256_sub_epi32(widen_dot<Int16>(a, b, ones, k256), qlane8(qlg + m * c.G * 16));
            accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), sv, accf[m]);
          }
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) out[m] = hsum256(accf[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) c.y[(m0 + m) * c.N + n] = out[m] / c.inv[m0 + m];
  }
}

template <int MB> struct ExactAvx2 { static constexpr RowFn fn = &exact_rows_avx2_t<MB, false>; };
template <int MB> struct ExactAvx2WholeRow { static constexpr RowFn fn = &exact_rows_avx2_t<MB, true>; };
template <int MB> struct Int8Avx2 { static constexpr RowFn fn = &int8_rows_avx2_t<MB, false>; };
template <int MB> struct Int16Avx2 { static constexpr RowFn fn = &int8_rows_avx2_t<MB, true>; };

}  // namespace

RowFn avx2_exact_rows(int mb, bool whole_row) {
  return whole_row ? pick_tokens<ExactAvx2WholeRow>(mb) : pick_tokens<ExactAvx2>(mb);
}

RowFn avx2_int8_rows(int mb) { return pick_tokens<Int8Avx2>(mb); }

RowFn avx2_int16_rows(int mb) { return pick_tokens<Int16Avx2>(mb); }

__attribute__((target("avx2,fma"))) void dequant_rows_avx2(const Ctx& c, int64_t n0, int64_t n1, float* out,
                                                          int64_t ld, float* sbuf) {
  const __m256 base = _mm256_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    float* o = out + (n - n0) * ld;
    int64_t cur_g = -1;
    __m256 lut = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < c.nblk; ++blk) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * kBlockBytes));
      float* ok = o + blk * kBlockWeights;
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const int64_t g = group_of(c, blk * kBlockWeights + 32 * s);
        if (g != cur_g) {
          cur_g = g;
          lut = _mm256_mul_ps(_mm256_set1_ps(sbuf[g]), base);
        }
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) _mm256_storeu_ps(ok + 32 * s + 8 * b, BITCPM_W_AVX2(d, s, b, lut));
      }
    }
  }
}

#else   // not x86: never picked (best_isa() is not an x86 path), see cpu_features.h
RowFn avx2_exact_rows(int, bool) { BITCPM_NO_SIMD_PATH("avx2_exact_rows"); }
RowFn avx2_int8_rows(int) { BITCPM_NO_SIMD_PATH("avx2_int8_rows"); }
RowFn avx2_int16_rows(int) { BITCPM_NO_SIMD_PATH("avx2_int16_rows"); }
void dequant_rows_avx2(const Ctx&, int64_t, int64_t, float*, int64_t, float*) {
  BITCPM_NO_SIMD_PATH("dequant_rows_avx2");
}
#endif  // BITCPM_X86

}  // namespace bitcpm_cpu
