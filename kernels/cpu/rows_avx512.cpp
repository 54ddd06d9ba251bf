// AVX512 (F + BW + VL; VNNI for int8) row kernels of bitcpm::ternary_linear, fp32 compute
// (entry points: row_kernels.h); scalar twin: rows_scalar.cpp.
//
//   exact mode: the AVX2 path's decode on 16-lane vectors: x in the same permuted order, a
//     16-lane vector covers AVX2 vectors (s, b) and (s, b+1), so one 32-byte code word is
//     broadcast to both halves and shifted per half with `vpsrlvd`, then `vpermps` and one FMA
//     per token. Valgrind has no AVX512, so this path is tested against float64, not counted.
//   dequant: none of its own; the AVX2 routine (rows_avx2.cpp) is store bound and shares the layout.
//   the GEMMs' helpers (ternary_gemm.cpp): vnni_pack (rows into brgemm's VNNI layout, bf16 and
//     int8) and decode_rows_s8 (int8 mode: rows as int8 t, natural order, and their sums).
//   int8 mode (needs VNNI and group_size >= 64): 64 codes per `vpsrlvw` + `vpand` from a 32-byte
//     word broadcast to both halves, one `vpdpbusd(codes, q)` per 64 weights per token (exact
//     u8*s8 sums), two chains per token, group offsets subtracted as integers.
//
// bf16 activations on AVX512-BF16 CPUs take rows_avx512bf16.cpp instead.

#include "row_kernels.h"

#include "cpu_features.h"  // <immintrin.h> on x86

#include <algorithm>

namespace bitcpm_cpu {

#if BITCPM_X86
namespace {

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline float hsum512(__m512 v) {
  return _mm512_reduce_add_ps(v);
}

// WholeRow: as in exact_rows_avx2_t (rows_avx2.cpp: fixed table, the row's scale applied to the fp32 sum once).
template <int MB, bool WholeRow>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void exact_rows_avx512_t(const Ctx& c, int64_t n0,
                                                                                       int64_t n1, int64_t m0,
                                                                                       float* sbuf) {
  const __m512 base = _mm512_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f,
                                     0.f);
  __m512i sh[4][2];
  for (int s = 0; s < 4; ++s)
    for (int h = 0; h < 2; ++h) {
      const int lo_sh = 8 * (2 * h) + 2 * s, hi_sh = 8 * (2 * h + 1) + 2 * s;
      sh[s][h] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(lo_sh)), _mm256_set1_epi32(hi_sh), 1);
    }
  constexpr int A = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);  // accumulator chains per token
  for (int64_t n = n0; n < n1; ++n) {
    if (!WholeRow) load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    const float* xb = c.xp + m0 * c.Kp;
    __m512 acc[MB][A];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t cur_g = -1;
    __m512 lut = base;
    for (int64_t blk = 0; blk < c.nblk; ++blk) {
      const __m512i d = _mm512_broadcast_i64x4(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * kBlockBytes)));
      const float* xk = xb + blk * kBlockWeights;
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        if (!WholeRow) {
          const int64_t g = group_of(c, blk * kBlockWeights + 32 * s);
          if (g != cur_g) {
            cur_g = g;
            lut = _mm512_mul_ps(_mm512_set1_ps(sbuf[g]), base);
          }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m512 w = _mm512_permutexvar_ps(_mm512_srlv_epi32(d, sh[s][h]), lut);
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m)
            acc[m][s % A] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + m * c.Kp + 32 * s + 16 * h), acc[m][s % A]);
        }
      }
    }
    const float row_scale = WholeRow ? whole_row_scale(c, n) : 1.f;
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m512 t = acc[m][0];
#pragma GCC unroll 4
      for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[m][a]);
      c.y[(m0 + m) * c.N + n] = WholeRow ? hsum512(t) * row_scale : hsum512(t);
    }
  }
}

// int8, AVX512: a 64-byte vector holds chunks (s, s+1) = 64 consecutive elements: the 32-byte
// code word is broadcast to both halves and shifted by 2s / 2s+2 (vpsrlvw), masked with 3.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) void int8_rows_avx512_t(
    const Ctx& c, int64_t n0, int64_t n1, int64_t m0, float* sbuf) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const __m512i sh01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(0)), _mm256_set1_epi16(2), 1);
  const __m512i sh23 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(4)), _mm256_set1_epi16(6), 1);
  const int8_t* qb = c.q + m0 * c.Kp;
  // Integer accumulation within a group of whole half-blocks (64 elements); group_size 32
  // needs per-chunk flushes and is left to the AVX2 routine by the caller.
  const int64_t hpg = (c.G == 1) ? 2 * c.nblk : c.gs / 64;  // half-blocks per group
  const int64_t nhalf = (c.K + 63) / 64;  // halves wholly past K (q 0, codes 1) are skipped
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    __m512 accf[MB];
    int32_t dots[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) accf[m] = _mm512_setzero_ps();
    for (int64_t h0 = 0, g = 0; h0 < nhalf; h0 += hpg, ++g) {
      const int64_t h1 = std::min(nhalf, h0 + hpg);
      // Two accumulator chains per token (even / odd half): vpdpbusd's latency would otherwise
      // bound a 1-token row.
      __m512i acc[MB], acc2[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m] = acc2[m] = _mm512_setzero_si512();
      int64_t h = h0;
      for (; h + 1 < h1; h += 2) {
        const __m512i d = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (h >> 1) * kBlockBytes)));
        const __m512i ca = _mm512_and_si512(_mm512_srlv_epi16(d, (h & 1) ? sh23 : sh01), m3);
        const __m512i cb = _mm512_and_si512(_mm512_srlv_epi16(d, (h & 1) ? sh01 : sh23), m3);
        const __m512i* db = reinterpret_cast<const __m512i*>(row + ((h + 1) >> 1) * kBlockBytes);
        const __m512i cb2 = (h & 1) ? _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(db))), sh01), m3)
                                    : cb;
        const int8_t* qk = qb + h * 64;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          acc[m] = _mm512_dpbusd_epi32(acc[m], ca, _mm512_loadu_si512(qk + m * c.Kp));  // exact u8*s8 sums
          acc2[m] = _mm512_dpbusd_epi32(acc2[m], cb2, _mm512_loadu_si512(qk + m * c.Kp + 64));
        }
      }
      for (; h < h1; ++h) {
        const __m512i d = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (h >> 1) * kBlockBytes)));
        const __m512i cc = _mm512_and_si512(_mm512_srlv_epi16(d, (h & 1) ? sh23 : sh01), m3);
        const int8_t* qk = qb + h * 64;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_dpbusd_epi32(acc[m], cc, _mm512_loadu_si512(qk + m * c.Kp));
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_add_epi32(acc[m], acc2[m]);
      if (c.G == 1) {
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) dots[m] = _mm512_reduce_add_epi32(acc[m]) - c.qsum[(m0 + m) * c.G];
      } else {
        const int64_t gg = std::min(g, c.G - 1);
        const __m512 sv = _mm512_set1_ps(sbuf[gg]);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m512i exact = _mm512_sub_epi32(acc[m], _mm512_loadu_si512(c.qlane + ((m0 + m) * c.G + gg) * 16));
          accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), sv, accf[m]);
        }
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      float o;
      if (c.G == 1) {
        o = sbuf[0] * static_cast<float>(dots[m]);
      } else {
        o = _mm512_reduce_add_ps(accf[m]);
      }
      c.y[(m0 + m) * c.N + n] = o / c.inv[m0 + m];
    }
  }
}

template <int MB> struct ExactAvx512 { static constexpr RowFn fn = &exact_rows_avx512_t<MB, false>; };
template <int MB> struct ExactAvx512WholeRow { static constexpr RowFn fn = &exact_rows_avx512_t<MB, true>; };
template <int MB> struct Int8Avx512Vnni { static constexpr RowFn fn = &int8_rows_avx512_t<MB>; };

}  // namespace

RowFn avx512_exact_rows(int mb, bool whole_row) {
  return whole_row ? pick_tokens<ExactAvx512WholeRow>(mb) : pick_tokens<ExactAvx512>(mb);
}

RowFn avx512_vnni_int8_rows(int mb) { return pick_tokens<Int8Avx512Vnni>(mb); }

// Rows of 32-bit words (nr rows of `words` words at ld words) rearranged into brgemm's VNNI
// layout for B: [words][nb], word (k, i) = row i's word k; rows nr..nb-1 zero. A word is a bf16
// pair (2k, 2k+1) or an int8 quad (4k..4k+3) of one row, so this is a transpose of words, done
// 16 x 16 at a time in registers (unpack 32 / 64, then two 128-bit lane shuffles: 64 instructions
// per 256 words). words is a multiple of 16, nb of 16.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void vnni_pack(const uint32_t* src, int64_t ld, int64_t nr,
                                                                     int64_t words, int64_t nb, uint32_t* dst) {
  for (int64_t i0 = 0; i0 < nb; i0 += 16) {
    for (int64_t k = 0; k < words; k += 16) {
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i0 + i < nr ? _mm512_loadu_si512(src + (i0 + i) * ld + k) : _mm512_setzero_si512();
      for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
      for (int h = 0; h < 16; h += 8) {
        for (int i = 0; i < 4; ++i) {
          t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
          t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
        }
      }
      for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
      }
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (k + j) * nb + i0, r[j]);
    }
  }
}

// int8 GEMM's decoder: rows [n0, n1) as ternary int8 t in natural order (Kp bytes, padding t = 0)
// at out + (n - n0) * ld, and each row's sum of t in sums[n - n0]. Per 32-byte block, bit pair s
// of byte j is element 32s + j, so four shift/mask/subtract steps write the block in order; the
// sums come from `vpsadbw` over the codes (sum of codes minus Kp).
__attribute__((target("avx2"))) void decode_rows_s8(const Ctx& c, int64_t n0, int64_t n1, int8_t* out, int64_t ld,
                                                    int32_t* sums) {
  const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.codes + n * c.row_bytes;
    int8_t* o = out + (n - n0) * ld;
    __m256i codesum = _mm256_setzero_si256();
    for (int64_t b = 0; b < c.nblk; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlockBytes));
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m256i code = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), three);
        codesum = _mm256_add_epi64(codesum, _mm256_sad_epu8(code, _mm256_setzero_si256()));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + b * kBlockWeights + 32 * s), _mm256_sub_epi8(code, one));
      }
    }
    const int64_t total = _mm256_extract_epi64(codesum, 0) + _mm256_extract_epi64(codesum, 1) +
                          _mm256_extract_epi64(codesum, 2) + _mm256_extract_epi64(codesum, 3);
    sums[n - n0] = static_cast<int32_t>(total - c.Kp);
  }
}


#else   // not x86: never picked (best_isa() is not an x86 path), see cpu_features.h
RowFn avx512_exact_rows(int, bool) { BITCPM_NO_SIMD_PATH("avx512_exact_rows"); }
RowFn avx512_vnni_int8_rows(int) { BITCPM_NO_SIMD_PATH("avx512_vnni_int8_rows"); }
void vnni_pack(const uint32_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*) { BITCPM_NO_SIMD_PATH("vnni_pack"); }
void decode_rows_s8(const Ctx&, int64_t, int64_t, int8_t*, int64_t, int32_t*) {
  BITCPM_NO_SIMD_PATH("decode_rows_s8");
}
#endif  // BITCPM_X86

}  // namespace bitcpm_cpu
