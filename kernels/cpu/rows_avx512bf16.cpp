// AVX512-BF16 row kernels of bitcpm::ternary_linear: exact mode with bf16 activations (the
// engine's dtype for BitCPM4); entry points: row_kernels.h; scalar twin: rows_scalar.cpp.
//
// A 64-byte load covers two blocks (a 256-weight chunk) as 32 16-bit words. `vpermw` from a
// table {-1, 0, +1, 0} (vpermw reads the low 5 bits of each word: see ternary_bf16_step) gives
// 32 ternary weights as bf16, exactly; `vdpbf16ps` multiplies them with 32 bf16 activations
// (products exact in fp32) and adds pairs into 16 fp32 lanes. So 2.5 instructions per 32
// weights, against 3 per 16 for the fp32 path. Word w of step t
// holds element 128*(w/16) + e(w%16, t), e(l, t) = t < 4 ? 2l + 32t : 2l + 1 + 32(t - 4), and x is
// permuted once per call into that order. The scale is applied per 128-weight half-chunk group,
// so this path needs G == 1 or group_size >= 128 (others take the fp32 path).
//
// Figures (instruction mix, the "two tables" decode): benchmarks/inner_loop_ceiling.py and
// kernels/README.md. Prefill (M >= 32) dequantizes rows straight to bf16 (dequant_rows_bf16) and
// rearranges them into the VNNI layout (vnni_pack, rows_avx512.cpp) for the bf16 ternary GEMM (ternary_gemm.cpp).

#include "row_kernels.h"

#include "cpu_features.h"  // <immintrin.h> on x86

#include <algorithm>
#include <vector>

namespace bitcpm_cpu {
namespace {

// Offset within a chunk of the element that word w of step t decodes.
inline int64_t bf16_chunk_element(int t, int w) {
  const int l = w % 16;
  return 128 * (w / 16) + (t < 4 ? 2 * l + 32 * t : 2 * l + 1 + 32 * (t - 4));
}

}  // namespace

void permute_x_bf16(const Ctx& c, const uint16_t* x, uint16_t* xb) {
  static const std::vector<int64_t> order = [] {
    std::vector<int64_t> o(kChunkWeights);
    for (int t = 0; t < 8; ++t)
      for (int w = 0; w < 32; ++w) o[32 * t + w] = bf16_chunk_element(t, w);
    return o;
  }();
  const int64_t nchunk = c.Kc / kChunkWeights;
  for (int64_t m = 0; m < c.M; ++m) {
    const uint16_t* xr = x + m * c.K;
    uint16_t* o = xb + m * c.Kc;
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      const int64_t base = ch * kChunkWeights;
      if (base + kChunkWeights <= c.K) {
        for (int64_t i = 0; i < kChunkWeights; ++i) o[base + i] = xr[base + order[i]];
      } else {
        for (int64_t i = 0; i < kChunkWeights; ++i) {
          const int64_t k = base + order[i];
          o[base + i] = k < c.K ? xr[k] : uint16_t(0);
        }
      }
    }
  }
}

#if BITCPM_X86
namespace {

// Codes of chunk ch of a row (64 bytes = two blocks); a row with an odd block count ends in a
// one-block chunk, read as 32 bytes with the upper words zero (code 0 meets x padding 0).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i load_chunk(const Ctx& c, const uint8_t* row,
                                                                              int64_t ch) {
  const uint8_t* src = row + ch * 2 * kBlockBytes;
  return (c.nblk & 1) && ch == c.nblk / 2 ? _mm512_maskz_loadu_epi16(0xFFFF, src) : _mm512_loadu_si512(src);
}

// tot += (sum of the chains) * scales, lanes 0-7 from the chunk's first block (group scale
// s_lo), lanes 8-15 from its second (s_hi); the chains restart at zero.
template <int MB, int A>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) inline void bf16_flush(
    __m512 (&acc)[MB][A], __m512 (&tot)[MB], float s_lo, float s_hi) {
  const __m512 sv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s_lo), _mm512_set1_ps(s_hi));
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    __m512 t = acc[m][0];
#pragma GCC unroll 4
    for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[m][a]);
    tot[m] = _mm512_fmadd_ps(t, sv, tot[m]);
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  }
}

// Weights of step t (2-bit field t of each code word) as bf16 {-1, 0, +1}: `vpermw` reads the
// low 5 bits of each index word, so table lo (period 4) decodes field 0 and table hi (each entry
// repeated 4 times) decodes field 1 of the same word; fields 2u and 2u+1 share one `vpsrlw` by
// 4u. 4 shifts per 8 steps instead of 7: the decode shares execution ports with `vdpbf16ps`, so
// fewer decode instructions speed up the loop (benchmarks/inner_loop_ceiling.py, "two tables").
struct TernaryBf16Tables {
  __m512i lo, hi;
};

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline TernaryBf16Tables ternary_bf16_tables() {
  const long long neg4 = static_cast<long long>(0xBF80BF80BF80BF80ULL), pos4 = 0x3F803F803F803F80LL;
  return {_mm512_set1_epi64(0x00003F800000BF80LL),  // words {-1, 0, +1, 0} in bf16
          _mm512_set_epi64(0, pos4, 0, neg4, 0, pos4, 0, neg4)};
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i ternary_bf16_step(const TernaryBf16Tables& tb,
                                                                                    __m512i d, int t) {
  const __m512i idx = (t / 2) ? _mm512_srli_epi16(d, 4 * (t / 2)) : d;
  return _mm512_permutexvar_epi16(idx, (t & 1) ? tb.hi : tb.lo);
}

template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) void exact_rows_bf16_t(
    const Ctx& c, int64_t n0, int64_t n1, int64_t m0, float* sbuf) {
  const TernaryBf16Tables tb = ternary_bf16_tables();
  const int64_t nchunk = c.Kc / kChunkWeights;
  constexpr int A = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);  // accumulator chains per token
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    const uint16_t* xrow = c.xb + m0 * c.Kc;
    __m512 acc[MB][A], tot[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      tot[m] = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
    }
    // Groups of the two half-chunks whose partial sums are in acc (G > 1 only).
    int64_t g_lo = -1, g_hi = -1;
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      if (c.G > 1) {
        const int64_t lo = group_of(c, ch * kChunkWeights), hi = group_of(c, ch * kChunkWeights + kBlockWeights);
        if (lo != g_lo || hi != g_hi) {
          if (g_lo >= 0) bf16_flush<MB, A>(acc, tot, sbuf[g_lo], sbuf[g_hi]);
          g_lo = lo;
          g_hi = hi;
        }
      }
      const __m512i d = load_chunk(c, row, ch);
      const uint16_t* xk = xrow + ch * kChunkWeights;
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512i w = ternary_bf16_step(tb, d, t);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m512i xv = _mm512_loadu_si512(xk + m * c.Kc + 32 * t);
          acc[m][t % A] = _mm512_dpbf16_ps(acc[m][t % A], (__m512bh)w, (__m512bh)xv);
        }
      }
    }
    if (c.G > 1) {
      bf16_flush<MB, A>(acc, tot, sbuf[g_lo], sbuf[g_hi]);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) c.y[(m0 + m) * c.N + n] = _mm512_reduce_add_ps(tot[m]);
    } else {
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        __m512 t = acc[m][0];
#pragma GCC unroll 4
        for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[m][a]);
        c.y[(m0 + m) * c.N + n] = _mm512_reduce_add_ps(t) * sbuf[0];
      }
    }
  }
}

// One token, whole-row scales (G == 1): the decode step of a batch-1 request. Same loop as
// exact_rows_bf16_t<1> without its per-row group bookkeeping and scale buffer: a 1024-wide row
// is only 4 chunks, so what a row costs outside the loop shows (benchmarks/kernel_speed.py).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) void exact_rows_bf16_one_token(
    const Ctx& c, int64_t n0, int64_t n1, int64_t m0, float*) {
  const TernaryBf16Tables tb = ternary_bf16_tables();
  const int64_t nchunk = c.Kc / kChunkWeights;
  const uint16_t* xk0 = c.xb + m0 * c.Kc;
  float* y = c.y + m0 * c.N;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.codes + n * c.row_bytes;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      const __m512i d = load_chunk(c, row, ch);
      const uint16_t* xk = xk0 + ch * kChunkWeights;
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512i w = ternary_bf16_step(tb, d, t);
        acc[t % 4] = _mm512_dpbf16_ps(acc[t % 4], (__m512bh)w, (__m512bh)_mm512_loadu_si512(xk + 32 * t));
      }
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    y[n] = _mm512_reduce_add_ps(sum) * whole_row_scale(c, n);
  }
}

// Whole-row scales (G == 1), several tokens: two rows per pass, so each activation vector loaded
// feeds two `vdpbf16ps` (the single-row loop is bound by those loads once MB > 2).
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) void exact_row_pairs_bf16_t(
    const Ctx& c, int64_t n0, int64_t n1, int64_t m0, float* sbuf) {
  const TernaryBf16Tables tb = ternary_bf16_tables();
  const int64_t nchunk = c.Kc / kChunkWeights;
  constexpr int A = MB <= 2 ? 2 : 1;
  const uint16_t* xrow = c.xb + m0 * c.Kc;
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) {
    const uint8_t* row0 = c.codes + n * c.row_bytes;
    const uint8_t* row1 = row0 + c.row_bytes;
    __m512 acc0[MB][A], acc1[MB][A];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 2
      for (int a = 0; a < A; ++a) acc0[m][a] = acc1[m][a] = _mm512_setzero_ps();
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      const __m512i d0 = load_chunk(c, row0, ch), d1 = load_chunk(c, row1, ch);
      const uint16_t* xk = xrow + ch * kChunkWeights;
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512i w0 = ternary_bf16_step(tb, d0, t), w1 = ternary_bf16_step(tb, d1, t);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + m * c.Kc + 32 * t);
          acc0[m][t % A] = _mm512_dpbf16_ps(acc0[m][t % A], (__m512bh)w0, xv);
          acc1[m][t % A] = _mm512_dpbf16_ps(acc1[m][t % A], (__m512bh)w1, xv);
        }
      }
    }
    const float s0 = whole_row_scale(c, n), s1 = whole_row_scale(c, n + 1);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m512 t0 = acc0[m][0], t1 = acc1[m][0];
#pragma GCC unroll 2
      for (int a = 1; a < A; ++a) {
        t0 = _mm512_add_ps(t0, acc0[m][a]);
        t1 = _mm512_add_ps(t1, acc1[m][a]);
      }
      c.y[(m0 + m) * c.N + n] = _mm512_reduce_add_ps(t0) * s0;
      c.y[(m0 + m) * c.N + n + 1] = _mm512_reduce_add_ps(t1) * s1;
    }
  }
  if (n < n1) exact_rows_bf16_t<MB>(c, n, n1, m0, sbuf);
}

template <int MB> struct ExactBf16 { static constexpr RowFn fn = &exact_rows_bf16_t<MB>; };
template <int MB> struct ExactBf16Pairs { static constexpr RowFn fn = &exact_row_pairs_bf16_t<MB>; };

}  // namespace

RowFn bf16_exact_rows(int mb, bool whole_row) {
  if (!whole_row) return pick_tokens<ExactBf16>(mb);
  return mb == 1 ? &exact_rows_bf16_one_token : pick_tokens<ExactBf16Pairs>(mb);
}

// Prefill with bf16 activations and bf16 scales: dequantize rows straight to bf16 (t*s is exact
// in bf16) in the same permuted order as xb, for the bf16 ternary GEMM. Per step, `vpermw` from {-s, 0, s, 0}
// of the low half's group, then a masked `vpermw` from the high half's table: any group size
// >= 32 works, since a step's 16 words per half lie in one 32-element quarter of one block.
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void dequant_rows_bf16(const Ctx& c, int64_t n0,
                                                                                    int64_t n1, uint16_t* out,
                                                                                    int64_t ld) {
  const int64_t nchunk = c.Kc / kChunkWeights;
  auto table_of = [](uint16_t s) {
    const uint64_t neg = uint64_t(s ^ 0x8000u), pos = uint64_t(s);
    return neg | (pos << 32);  // words {-s, 0, +s, 0}
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* sc = static_cast<const uint16_t*>(c.scales) + n * c.G;
    const uint8_t* row = c.codes + n * c.row_bytes;
    uint16_t* o = out + (n - n0) * ld;
    if (c.G == 1) {  // one table for the row: a shift, a vpermw and a store per 32 weights
      const __m512i tab = _mm512_set1_epi64(static_cast<long long>(table_of(sc[0])));
      for (int64_t ch = 0; ch < nchunk; ++ch) {
        const __m512i d = load_chunk(c, row, ch);
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t)
          _mm512_storeu_si512(o + ch * kChunkWeights + 32 * t, _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 2 * t), tab));
      }
      continue;
    }
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      const __m512i d = load_chunk(c, row, ch);
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const int64_t k = ch * kChunkWeights + 32 * (t % 4);
        const __m512i lo = _mm512_set1_epi64(static_cast<long long>(table_of(sc[group_of(c, k)])));
        const __m512i hi = _mm512_set1_epi64(static_cast<long long>(table_of(sc[group_of(c, k + kBlockWeights)])));
        const __m512i idx = _mm512_srli_epi16(d, 2 * t);
        const __m512i w = _mm512_mask_permutexvar_epi16(_mm512_permutexvar_epi16(idx, lo), 0xFFFF0000u, idx, hi);
        _mm512_storeu_si512(o + ch * kChunkWeights + 32 * t, w);
      }
    }
  }
}

#else   // not x86: never picked (best_isa() is not an x86 path), see cpu_features.h
RowFn bf16_exact_rows(int, bool) { BITCPM_NO_SIMD_PATH("bf16_exact_rows"); }
void dequant_rows_bf16(const Ctx&, int64_t, int64_t, uint16_t*, int64_t) { BITCPM_NO_SIMD_PATH("dequant_rows_bf16"); }

#endif  // BITCPM_X86

}  // namespace bitcpm_cpu
