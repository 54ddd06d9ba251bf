// CPU kernel for bitcpm::ternary_linear (packed layout version 1, see vllm_bitcpm/ternary.py).
//
// Layout recap: each row of `codes` is a run of 128-weight blocks of 32 bytes; byte j of a block
// holds elements j, j+32, j+64, j+96 at bits 0, 2, 4, 6 as the code t+1 in {0,1,2}.
//
// The whole file is compiled for the baseline ISA (no -mavx2); SIMD code lives in functions
// marked __attribute__((target(...))) and is only called after a run-time CPU check, so the
// same binary runs (scalar path) on CPUs without AVX2. That code is x86 only (BITCPM_X86,
// cpu_features.h): on other CPUs the file builds with the scalar path alone, and aarch64 CPUs get
// the NEON row kernels of ternary_linear_neon.cpp (dispatched here, run_neon).
//
// Paths (kernels/README.md has the instruction counts and measured figures):
//   exact mode, decode (M < kFusedGemmMinM; bf16 path: M < kGemmMinM): per row, per 32-bit lane of a 32-byte code load,
//     `vpsrld` by (8*byte + 2*shift) then `vpermps` from an 8-entry table {-s,0,s,0,-s,0,s,0}
//     gives 8 scaled float weights (2 instructions per 8 weights), then one FMA per token.
//     The weights come out in a permuted element order, so x is permuted once per call
//     (position 32*s + 8*b + l of a block holds element 32*s + 4*l + b).
//   exact mode, several tokens (M >= kFusedGemmMinM), fp32 compute (AVX2, AVX512, and fp32
//     activations anywhere): the ternary GEMM of ternary_gemm.cpp: each thread decodes 16-row
//     tiles (same 2-instruction trick) into a buffer in L1/L2 and runs PyTorch's brgemm (a oneDNN
//     ukernel) on it for every tile of tokens. The scalar path keeps the old prefill: tiles of
//     rows dequantized for at::mm.
//   exact mode, bf16 activations on AVX512-BF16 CPUs (the engine's dtype for BitCPM4):
//     decode: `vpermw` (plus a `vpsrlw` every other step) turns a 64-byte code load into 32
//     bf16 weights {-1,0,1} per step, `vdpbf16ps` multiplies them with 32 bf16 activations
//     (exact products, fp32 sums): 2.5 instructions per 32 weights; prefill: rows dequantized
//     straight to bf16 for at::mm.
//   int8 mode: x is quantized once per call (per-token absmax, as the reference), with per-group
//     sums of q; inner loop `vpmaddubsw(codes, q)` (codes = t+1 unsigned), widened with
//     `vpmaddwd(., 1)` (AVX512-VNNI: one `vpdpbusd`), and sum(q) per group subtracted.
//   aarch64 (neon, neon-dotprod): natural-order x, `tbl` decode, `fmla` / `sdot`
//     (ternary_linear_neon.cpp); prefill (M >= kGemmMinM) by fp32 tiles for at::mm.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <Python.h>

#include "cpu_features.h"  // <immintrin.h> on x86
#include "ternary_gemm.h"
#include "ternary_linear_neon.h"
#include "ternary_linear_rows.h"  // Ctx, the packed layout's constants

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace bitcpm_cpu {
namespace {

constexpr int64_t kGemmMinM = 32;     // exact mode: at or above this many tokens use dequant + GEMM
// exact mode, fp32 compute: at or above this many tokens the ternary GEMM (ternary_gemm.cpp) runs
// instead of the per-row decode loops (benchmarks/prefill_gemm.py sweeps M).
constexpr int64_t kFusedGemmMinM = 8;
// Tokens past the last multiple of 8 that go to the decode loops instead of a zero-padded GEMM tile:
// at 9..11 and 17..18 tokens the op took 0.82-1.04x stock fp32's time this way against 0.93-1.13x
// padded, and 4 tokens past were level (AVX2 Zen 3, benchmarks/prefill_gemm.py, two runs each).
constexpr int64_t kGemmTailTokens = 3;
constexpr float kInvNumerator = 127.0f;
constexpr int64_t kRowTile = 16;      // rows per inner tile (codes of a tile stay in L1/L2)
// Calls below this many multiply-adds stay on the calling thread. Every BitCPM4-0.5B layer is
// above it (qkv 1.3M and o 1M used to stay on one thread at 2M; splitting them too cut the
// profiled ternary time of a 2-thread decode step, benchmarks/profile_decode.py --threads 2).
constexpr int64_t kMinParallelMacs = int64_t(1) << 18;

// x86 paths are ordered (kScalar < kAvx2 < kAvx512 < kAvx512Bf16, compared with >= below);
// the aarch64 paths come after them and are dispatched first (is_neon), so those comparisons only
// ever see x86 paths.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kNeon = 4, kNeonDotprod = 5 };

inline bool is_neon(Isa isa) { return isa == Isa::kNeon || isa == Isa::kNeonDotprod; }

// The best path by the kernels' own checks (capped: cpu_has_*, VLLM_BITCPM_ISA applied) or by
// the CPU alone (cpu_supports_*, for the log line that says what a cap left out).
Isa detect_isa(bool capped) {
  if (capped ? cpu_has_avx512bf16() : cpu_supports_avx512bf16()) return Isa::kAvx512Bf16;
  if (capped ? cpu_has_avx512() : cpu_supports_avx512()) return Isa::kAvx512;
  if (capped ? cpu_has_avx2() : cpu_supports_avx2()) return Isa::kAvx2;
  if (capped ? cpu_has_neon_dotprod() : cpu_supports_neon_dotprod()) return Isa::kNeonDotprod;
  if (capped ? cpu_has_neon() : cpu_supports_neon()) return Isa::kNeon;
  return Isa::kScalar;
}

Isa best_isa() {
  static const Isa isa = detect_isa(true);
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeonDotprod: return "neon-dotprod";
    case Isa::kNeon: return "neon";
    default: return "scalar";
  }
}

// ------------------------------------------------------------------------------------------
// Scalar path (always compiled; the twin every SIMD path is tested against)

inline int code_at(const uint8_t* row, int64_t k) {
  const int64_t blk = k / kBlockWeights, e = k % kBlockWeights;
  return (row[blk * kBlockBytes + (e & 31)] >> (2 * (e >> 5))) & 3;
}

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

void int8_rows_scalar(const Ctx& c, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* sbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* qr = c.q + m * c.Kp;
      float acc = 0.f;
      int64_t k = 0;
      for (int64_t g = 0; g < c.G; ++g) {
        const int64_t kend = (c.G == 1) ? c.K : std::min(c.K, (g + 1) * c.gs);
        int32_t d = 0;
        for (; k < kend; ++k) d += static_cast<int32_t>(qr[k]) * (code_at(row, k) - 1);
        acc += sbuf[g] * static_cast<float>(d);
      }
      c.y[m * c.N + n] = acc / c.inv[m];
    }
  }
}

// Per-token absmax int8 quantization, bit-compatible with reference.quantize_activations_int8:
// inv = 127/max|x| (1 if all zero, NaN if any non-finite). PyTorch evaluates the reference's
// `127 / absmax` (int / tensor -> Tensor.__rtruediv__) as `absmax.reciprocal() * 127`, two
// float32 roundings, and a 1-ulp different inv flips roundings of q; so the same is done here, q = clamp(round_half_even(x*inv)).
// A NaN product (non-finite x, or 0*inf for a subnormal absmax) makes the token's outputs NaN.
void quantize_row_scalar(const Ctx& c, const float* xr, int8_t* qr, int32_t* qs, float* inv_out) {
  float absmax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < c.K; ++k) {
    const float a = std::fabs(xr[k]);
    if (!std::isfinite(a)) finite = false;
    absmax = std::max(absmax, a);
  }
  float inv = finite ? (absmax > 0.f ? kInvNumerator * (1.0f / absmax) : 1.0f) : NAN;
  std::memset(qr, 0, c.Kp);
  for (int64_t g = 0; g < c.G; ++g) qs[g] = 0;
  if (std::isnan(inv)) {
    *inv_out = inv;
    return;
  }
  for (int64_t k = 0; k < c.K; ++k) {
    const float v = xr[k] * inv;
    if (std::isnan(v)) {
      std::memset(qr, 0, c.Kp);
      for (int64_t g = 0; g < c.G; ++g) qs[g] = 0;
      *inv_out = NAN;
      return;
    }
    float r = std::nearbyint(v);
    r = std::min(127.f, std::max(-127.f, r));
    const int8_t qi = static_cast<int8_t>(r);
    qr[k] = qi;
    qs[group_of(c, k)] += qi;
  }
  *inv_out = inv;
}

// ------------------------------------------------------------------------------------------
// AVX2 + FMA path

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
__attribute__((target("avx2,fma"))) inline int32_t hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Dequantize a 32-weight chunk (chunk s of the block whose code word is d) into 4 vectors of 8
// scaled weights, in permuted order. lut = {-s, 0, s, 0, -s, 0, s, 0}: vpermps reads only the
// low 3 bits of each lane, i.e. the code plus one bit of the next field, which the repeated
// table ignores.
#define BITCPM_W_AVX2(d, s, b, lut) \
  _mm256_permutevar8x32_ps((lut), ((8 * (b) + 2 * (s)) == 0) ? (d) : _mm256_srli_epi32((d), 8 * (b) + 2 * (s)))

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

__attribute__((target("avx2,fma"))) inline __m256i qlane8(const int32_t* ql) {
  return _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 8)));
}

// int8: codes of chunk s (32 consecutive elements) as unsigned bytes.
#define BITCPM_C_AVX2(d, s, m3) _mm256_and_si256((s) == 0 ? (d) : _mm256_srli_epi16((d), 2 * (s)), (m3))

template <int MB>
__attribute__((target("avx2,fma"))) void int8_rows_avx2_t(const Ctx& c, int64_t n0, int64_t n1, int64_t m0,
                                                         float* sbuf) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* qb = c.q + m0 * c.Kp;
  // Groups made of whole blocks (G == 1, or group_size a multiple of 128): integer accumulation
  // over the group; group_size 32/64: flush to float per chunk / pair of chunks.
  const bool block_groups = (c.G == 1) || (c.gs % kBlockWeights == 0);
  const int64_t bpg = (c.G == 1) ? c.nblk : std::max<int64_t>(1, c.gs / kBlockWeights);
  for (int64_t n = n0; n < n1; ++n) {
    load_row_scales(c, n, sbuf);
    const uint8_t* row = c.codes + n * c.row_bytes;
    float out[MB];
    if (block_groups) {
      __m256 accf[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) accf[m] = _mm256_setzero_ps();
      int32_t dots[MB];
      for (int64_t g0 = 0, g = 0; g0 < c.nblk; g0 += bpg, ++g) {
        const int64_t g1 = std::min(c.nblk, g0 + bpg);
        __m256i acc[MB];
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
        for (int64_t blk = g0; blk < g1; ++blk) {
          const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * kBlockBytes));
          const __m256i c0 = BITCPM_C_AVX2(d, 0, m3), c1 = BITCPM_C_AVX2(d, 1, m3);
          const __m256i c2 = BITCPM_C_AVX2(d, 2, m3), c3 = BITCPM_C_AVX2(d, 3, m3);
          const int8_t* qk = qb + blk * kBlockWeights;
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) {
            const __m256i* qm = reinterpret_cast<const __m256i*>(qk + m * c.Kp);
            __m256i a = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(qm));
            a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c1, _mm256_loadu_si256(qm + 1)));
            a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c2, _mm256_loadu_si256(qm + 2)));
            a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c3, _mm256_loadu_si256(qm + 3)));
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(a, ones));  // |lane| <= 4*508
          }
        }
        if (c.G == 1) {
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) dots[m] = hsum256_epi32(acc[m]) - c.qsum[(m0 + m) * c.G];
        } else {
          const int64_t gg = std::min(g, c.G - 1);
          const __m256 sv = _mm256_set1_ps(sbuf[gg]);
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) {
            const __m256i exact = _mm256_sub_epi32(acc[m], qlane8(c.qlane + ((m0 + m) * c.G + gg) * 16));
            accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), sv, accf[m]);
          }
        }
      }
      if (c.G == 1) {
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) out[m] = sbuf[0] * static_cast<float>(dots[m]);
      } else {
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) out[m] = hsum256(accf[m]);
      }
    } else {
      // group_size 32 or 64: one or two chunks per group.
      const int cpg = static_cast<int>(c.gs / 32);
      __m256 accf[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) accf[m] = _mm256_setzero_ps();
      for (int64_t blk = 0; blk < c.nblk; ++blk) {
        const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * kBlockBytes));
        const int8_t* qk = qb + blk * kBlockWeights;
        for (int s = 0; s < 4; s += cpg) {
          // Chunks wholly past K hold codes 1 and q 0: skip them (their group index would be
          // clamped onto the last group, whose lane sums must be subtracted only once).
          if (blk * kBlockWeights + 32 * s >= c.K) break;
          const int64_t gg = group_of(c, blk * kBlockWeights + 32 * s);
          const __m256 sv = _mm256_set1_ps(sbuf[gg]);
          const int32_t* qlg = c.qlane + (m0 * c.G + gg) * 16;
          if (cpg == 1) {
            const __m256i cc = BITCPM_C_AVX2(d, s, m3);
#pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) {
              const __m256i a = _mm256_maddubs_epi16(cc, _mm256_loadu_si256(
                                                             reinterpret_cast<const __m256i*>(qk + m * c.Kp + 32 * s)));
              const __m256i exact = _mm256_sub_epi32(_mm256_madd_epi16(a, ones), qlane8(qlg + m * c.G * 16));
              accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), sv, accf[m]);
            }
          } else {
            const __m256i ca = BITCPM_C_AVX2(d, s, m3), cb = BITCPM_C_AVX2(d, s + 1, m3);
#pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) {
              const __m256i* qm = reinterpret_cast<const __m256i*>(qk + m * c.Kp + 32 * s);
              __m256i a = _mm256_maddubs_epi16(ca, _mm256_loadu_si256(qm));
              a = _mm256_add_epi16(a, _mm256_maddubs_epi16(cb, _mm256_loadu_si256(qm + 1)));
              const __m256i exact = _mm256_sub_epi32(_mm256_madd_epi16(a, ones), qlane8(qlg + m * c.G * 16));
              accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), sv, accf[m]);
            }
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

// Quantize one token with AVX2 (same arithmetic as the scalar twin: float multiply, round half
// to even, clamp). Falls back to the scalar routine for non-finite rows / a non-finite inverse.
__attribute__((target("avx2,fma"))) void quantize_row_avx2(const Ctx& c, const float* xr, int8_t* qr, int32_t* qs,
                                                          float* inv_out) {
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
  const float inv = absmax > 0.f ? kInvNumerator * (1.0f / absmax) : 1.0f;
  if (!finite || !std::isfinite(inv)) {
    quantize_row_scalar(c, xr, qr, qs, inv_out);
    return;
  }
  *inv_out = inv;
  for (int64_t g = 0; g < c.G; ++g) qs[g] = 0;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
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
    const __m256i p16a = _mm256_packs_epi32(v[0], v[1]);  // lanes: 0-3 8-11 | 4-7 12-15
    const __m256i p16b = _mm256_packs_epi32(v[2], v[3]);
    const __m256i p8 = _mm256_packs_epi16(p16a, p16b);  // dwords: 0 2 4 6 | 1 3 5 7 (of 4-elem runs)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), _mm256_permutevar8x32_epi32(p8, fix));
  }
  for (; k < c.K; ++k) {
    float r = std::nearbyint(xr[k] * inv);
    r = std::min(127.f, std::max(-127.f, r));
    qr[k] = static_cast<int8_t>(r);
    qs[group_of(c, k)] += qr[k];
  }
  std::memset(qr + c.K, 0, c.Kp - c.K);
}

// Per-lane sums of q per group, laid out like the int32 lanes of the SIMD dot products:
// lane 8*(chunk & 1) + j holds the sum of q[32*chunk + 4j .. 32*chunk + 4j + 3] over the
// group's 32-element chunks (AVX512 uses all 16 lanes, AVX2 adds the two halves). Subtracting
// them lane by lane before any float conversion turns sum(q*c) into the exact sum(q*t) per lane,
// so the offset of the unsigned codes never cancels in floating point.
__attribute__((target("avx2,fma"))) void lane_qsums_avx2(const Ctx& c, const int8_t* qr, int32_t* ql) {
  std::memset(ql, 0, c.G * 16 * sizeof(int32_t));
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t ch = 0; ch < c.Kp / 32; ++ch) {
    const __m256i v = _mm256_madd_epi16(
        _mm256_maddubs_epi16(ones8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + 32 * ch))), ones16);
    int32_t* dst = ql + group_of(c, 32 * ch) * 16 + 8 * (ch & 1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst)), v));
  }
}

// ------------------------------------------------------------------------------------------
// AVX512 (F + BW + VL; VNNI when present) path. Same permuted x layout as AVX2: a 16-lane
// vector covers AVX2 vectors (s, b) and (s, b+1), so one 32-byte code word is broadcast to
// both halves and shifted per half with vpsrlvd.

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline float hsum512(__m512 v) {
  return _mm512_reduce_add_ps(v);
}

// WholeRow: as in exact_rows_avx2_t (fixed table, the row's scale applied to the fp32 sum once).
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
#else   // not x86: never picked (best_isa() is kScalar), see cpu_features.h
template <int MB, bool WholeRow>
void exact_rows_avx2_t(const Ctx&, int64_t, int64_t, int64_t, float*) { BITCPM_NO_SIMD_PATH("exact_rows_avx2_t"); }
void dequant_rows_avx2(const Ctx&, int64_t, int64_t, float*, int64_t, float*) {
  BITCPM_NO_SIMD_PATH("dequant_rows_avx2");
}
template <int MB>
void int8_rows_avx2_t(const Ctx&, int64_t, int64_t, int64_t, float*) { BITCPM_NO_SIMD_PATH("int8_rows_avx2_t"); }
void quantize_row_avx2(const Ctx&, const float*, int8_t*, int32_t*, float*) {
  BITCPM_NO_SIMD_PATH("quantize_row_avx2");
}
void lane_qsums_avx2(const Ctx&, const int8_t*, int32_t*) { BITCPM_NO_SIMD_PATH("lane_qsums_avx2"); }
template <int MB, bool WholeRow>
void exact_rows_avx512_t(const Ctx&, int64_t, int64_t, int64_t, float*) { BITCPM_NO_SIMD_PATH("exact_rows_avx512_t"); }
#endif  // BITCPM_X86

// ------------------------------------------------------------------------------------------
// AVX512-BF16 path: exact mode with bf16 activations (the engine's dtype for BitCPM4), decode.
// A 64-byte load covers two blocks (a 256-weight chunk) as 32 16-bit words. `vpermw` from a
// table {-1, 0, +1, 0} (vpermw reads the low 5 bits of each word: see ternary_bf16_step) gives
// 32 ternary weights as bf16, exactly; `vdpbf16ps` multiplies them with 32 bf16 activations
// (products exact in fp32) and adds pairs into 16 fp32 lanes. So 2.5 instructions per 32
// weights, against 3 per 16 for the fp32 path. Word w of step t
// holds element 128*(w/16) + e(w%16, t), e(l, t) = t < 4 ? 2l + 32t : 2l + 1 + 32(t - 4), and x is
// permuted once per call into that order. The scale is applied per 128-weight half-chunk group,
// so this path needs G == 1 or group_size >= 128 (others take the fp32 path).

constexpr int64_t kChunkWeights = 256;

// Offset within a chunk of the element that word w of step t decodes.
inline int64_t bf16_chunk_element(int t, int w) {
  const int l = w % 16;
  return 128 * (w / 16) + (t < 4 ? 2 * l + 32 * t : 2 * l + 1 + 32 * (t - 4));
}

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

// Prefill with bf16 activations and bf16 scales: dequantize rows straight to bf16 (t*s is exact
// in bf16) in the same permuted order as xb, for at::mm. Per step, `vpermw` from {-s, 0, s, 0}
// of the low half's group, then a masked `vpermw` from the high half's table: any group size
// >= 32 works, since a step's 16 words per half lie in one 32-element quarter of one block.
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void dequant_rows_bf16(const Ctx& c, int64_t n0,
                                                                                    int64_t n1, uint16_t* out) {
  const int64_t nchunk = c.Kc / kChunkWeights;
  auto table_of = [](uint16_t s) {
    const uint64_t neg = uint64_t(s ^ 0x8000u), pos = uint64_t(s);
    return neg | (pos << 32);  // words {-s, 0, +s, 0}
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* sc = static_cast<const uint16_t*>(c.scales) + n * c.G;
    const uint8_t* row = c.codes + n * c.row_bytes;
    uint16_t* o = out + (n - n0) * c.Kc;
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

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void dequant_rows_avx512(const Ctx& c, int64_t n0,
                                                                                      int64_t n1, float* out,
                                                                                      int64_t ld, float* sbuf) {
  // Dequantization is store-bound; the AVX2 routine is as fast and shares the layout.
  dequant_rows_avx2(c, n0, n1, out, ld, sbuf);
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
#else   // not x86: never picked (best_isa() is kScalar), see cpu_features.h
template <int MB>
void exact_rows_bf16_t(const Ctx&, int64_t, int64_t, int64_t, float*) { BITCPM_NO_SIMD_PATH("exact_rows_bf16_t"); }
void exact_rows_bf16_one_token(const Ctx&, int64_t, int64_t, int64_t, float*) {
  BITCPM_NO_SIMD_PATH("exact_rows_bf16_one_token");
}
template <int MB>
void exact_row_pairs_bf16_t(const Ctx&, int64_t, int64_t, int64_t, float*) {
  BITCPM_NO_SIMD_PATH("exact_row_pairs_bf16_t");
}
void dequant_rows_bf16(const Ctx&, int64_t, int64_t, uint16_t*) { BITCPM_NO_SIMD_PATH("dequant_rows_bf16"); }
void dequant_rows_avx512(const Ctx&, int64_t, int64_t, float*, int64_t, float*) {
  BITCPM_NO_SIMD_PATH("dequant_rows_avx512");
}
template <int MB>
void int8_rows_avx512_t(const Ctx&, int64_t, int64_t, int64_t, float*) { BITCPM_NO_SIMD_PATH("int8_rows_avx512_t"); }
#endif  // BITCPM_X86

// ------------------------------------------------------------------------------------------
// Drivers

template <template <int> class F>
RowFn pick_mb(int mb) {
  switch (mb) {
    case 1: return &F<1>::run;
    case 2: return &F<2>::run;
    case 3: return &F<3>::run;
    case 4: return &F<4>::run;
    case 5: return &F<5>::run;
    case 6: return &F<6>::run;
    case 7: return &F<7>::run;
    default: return &F<8>::run;
  }
}
template <int MB> struct ExactAvx2 { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { exact_rows_avx2_t<MB, false>(c, a, b, m, s); } };
template <int MB> struct ExactAvx2WholeRow { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { exact_rows_avx2_t<MB, true>(c, a, b, m, s); } };
template <int MB> struct ExactAvx512 { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { exact_rows_avx512_t<MB, false>(c, a, b, m, s); } };
template <int MB> struct ExactAvx512WholeRow { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { exact_rows_avx512_t<MB, true>(c, a, b, m, s); } };
template <int MB> struct ExactBf16 { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { exact_rows_bf16_t<MB>(c, a, b, m, s); } };
template <int MB> struct ExactBf16Pairs { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { exact_row_pairs_bf16_t<MB>(c, a, b, m, s); } };
template <int MB> struct Int8Avx2 { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { int8_rows_avx2_t<MB>(c, a, b, m, s); } };
template <int MB> struct Int8Avx512Vnni { static void run(const Ctx& c, int64_t a, int64_t b, int64_t m, float* s) { int8_rows_avx512_t<MB>(c, a, b, m, s); } };

// Token tile per ISA / mode (accumulator registers: 16 ymm on AVX2, 32 zmm on AVX512).
int token_tile(Isa isa, bool int8) {
  if (isa >= Isa::kAvx512) return 8;
  return int8 ? 4 : 8;
}

// Rows [0, N) split across threads; inside a thread, tiles of kRowTile rows, and for each tile
// every token tile, so one tile's codes are read from memory once and reused from cache.
template <typename Fn>
void run_rows(const Ctx& c, int mb, Fn&& tile_fn) {
  int64_t grain = std::max<int64_t>(kRowTile, (c.M >= 64 ? 1 : 4) * kRowTile);
  // A tiny call takes a few microseconds on one thread: handing half of it to another thread
  // costs more than it saves (see kMinParallelMacs).
  if (c.M * c.K * c.N < kMinParallelMacs) grain = std::max<int64_t>(grain, c.N);
  at::parallel_for(0, c.N, std::min<int64_t>(grain, std::max<int64_t>(1, c.N)), [&](int64_t n0, int64_t n1) {
    std::vector<float> sbuf(c.G);
    for (int64_t t0 = n0; t0 < n1; t0 += kRowTile) {
      const int64_t t1 = std::min(n1, t0 + kRowTile);
      for (int64_t m0 = 0; m0 < c.M; m0 += mb) tile_fn(t0, t1, m0, std::min<int64_t>(mb, c.M - m0), sbuf.data());
    }
  });
}

// The aarch64 paths (row kernels in ternary_linear_neon.cpp): x and q in natural order, zero
// padded to whole blocks. int8: the scalar twin's quantization (the reference's rounding; one
// pass over x, small beside the rows). Exact mode, prefill (M >= kGemmMinM): fp32 tiles of rows
// dequantized for at::mm, as the scalar path does (PyTorch's brgemm ukernel, which the x86
// paths use from kFusedGemmMinM tokens, is x86 only); below it the NEON decode loops.
void run_neon(Ctx& c, const at::Tensor& x, at::Tensor& y32, bool int8_activations, Isa isa) {
  if (!int8_activations) {
    const at::Tensor xp = at::constant_pad_nd(x, {0, c.Kp - c.K}).contiguous();
    c.xp = xp.data_ptr<float>();
    if (c.M < kGemmMinM) {
      run_rows(c, kNeonTokenTile, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
        neon_exact_rows(static_cast<int>(mb), c.G == 1)(c, a, b, m0, s);
      });
      return;
    }
    // Tiles of about 1 MiB, so the GEMM reads them from cache.
    const int64_t tile = std::min(c.N, std::max<int64_t>(kRowTile, ((int64_t(1) << 20) / (c.Kp * 4)) / kRowTile * kRowTile));
    at::Tensor wt = at::empty({tile, c.Kp}, xp.options());
    for (int64_t t0 = 0; t0 < c.N; t0 += tile) {
      const int64_t t1 = std::min(c.N, t0 + tile);
      float* wp = wt.data_ptr<float>();
      at::parallel_for(t0, t1, 8, [&](int64_t a, int64_t b) {
        std::vector<float> sbuf(c.G);
        neon_dequant_rows(c, a, b, wp + (a - t0) * c.Kp, c.Kp, sbuf.data());
      });
      y32.narrow(1, t0, t1 - t0).copy_(at::mm(xp, wt.narrow(0, 0, t1 - t0).t()));
    }
    return;
  }
  at::Tensor q = at::empty({c.M, c.Kp}, x.options().dtype(at::kChar));
  at::Tensor qsum = at::empty({c.M, c.G}, x.options().dtype(at::kInt));
  at::Tensor inv = at::empty({c.M}, x.options());
  c.q = q.data_ptr<int8_t>();
  c.qsum = qsum.data_ptr<int32_t>();
  c.inv = inv.data_ptr<float>();
  at::parallel_for(0, c.M, 16, [&](int64_t a, int64_t b) {
    for (int64_t m = a; m < b; ++m)
      quantize_row_scalar(c, c.x + m * c.K, q.data_ptr<int8_t>() + m * c.Kp, qsum.data_ptr<int32_t>() + m * c.G,
                          inv.data_ptr<float>() + m);
  });
  const bool dotprod = isa == Isa::kNeonDotprod;
  run_rows(c, kNeonTokenTile, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
    neon_int8_rows(static_cast<int>(mb), dotprod)(c, a, b, m0, s);
  });
}

at::Tensor ternary_linear_impl(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                               int64_t group_size, const c10::optional<at::Tensor>& bias, bool int8_activations,
                               Isa isa) {
  // Same checks and messages as vllm_bitcpm.ops.reference.check_operands (raised as ValueError).
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "ternary_linear: x must have at least one dimension (..., K)");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK_VALUE(codes_in.scalar_type() == at::kByte && codes_in.dim() == 2,
                    "ternary_linear: codes must be a 2-D uint8 tensor, got ", codes_in.scalar_type(), " ",
                    codes_in.sizes());
  const int64_t N = codes_in.size(0);
  const int64_t nblk = (K + kBlockWeights - 1) / kBlockWeights;
  TORCH_CHECK_VALUE(codes_in.size(1) == nblk * kBlockBytes, "ternary_linear: codes have ", codes_in.size(1),
                    " bytes per row, but x has K=", K, " features, which needs ceil(K/128)*32=", nblk * kBlockBytes);
  TORCH_CHECK_VALUE(group_size > 0, "ternary_linear: group_size must be positive, got ", group_size);
  const int64_t G = (K + group_size - 1) / group_size;
  if (!(scales_in.dim() == 2 && scales_in.size(0) == N && scales_in.size(1) == G)) {
    std::string shape = "(";
    for (int64_t i = 0; i < scales_in.dim(); ++i) shape += (i ? ", " : "") + std::to_string(scales_in.size(i));
    shape += scales_in.dim() == 1 ? ",)" : ")";
    TORCH_CHECK_VALUE(false, "ternary_linear: scales have shape ", shape, ", expected (", N, ", ", G, ") (N=", N,
                      " rows, one scale per group of ", group_size, " of K=", K, " columns)");
  }
  const auto st = scales_in.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "ternary_linear: scales must be float32, bfloat16 or float16, got ", st);
  const auto xt = x_in.scalar_type();
  TORCH_CHECK_VALUE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
                    "ternary_linear: x must be float32, bfloat16 or float16, got ", xt);
  // Groups that are not the whole row must be powers of two >= 32 (packed layout version 1).
  const bool gs_ok = (G == 1) || (group_size >= 32 && (group_size & (group_size - 1)) == 0);
  if (!gs_ok) {
    // Not a layout this kernel is built for: defer to the reference math through the generic
    // scalar loops (they handle any group size).
    isa = Isa::kScalar;
  }

  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  int64_t Mrows = 1;
  for (int64_t i = 0; i + 1 < x_in.dim(); ++i) Mrows *= x_in.size(i);

  at::Tensor y32 = at::empty({Mrows, N}, x_in.options().dtype(at::kFloat));
  if (Mrows > 0 && N > 0) {
    if (K == 0) {
      y32.zero_();
    } else {
      // bf16 activations, exact mode, AVX512-BF16: decode sizes with whole-row or >= 128-wide
      // groups run the vdpbf16ps kernel; prefill with bf16 scales dequantizes straight to bf16.
      // Both read x as it is (no float copy).
      const bool bf16_isa = isa == Isa::kAvx512Bf16 && !int8_activations && xt == at::kBFloat16 && gs_ok;
      const bool bf16_decode = bf16_isa && Mrows < kGemmMinM && (G == 1 || group_size >= kBlockWeights);
      const bool bf16_prefill = bf16_isa && Mrows >= kGemmMinM && st == at::kBFloat16;
      const bool bf16_path = bf16_decode || bf16_prefill;
      const at::Tensor x = bf16_path ? x_in.reshape({Mrows, K}).contiguous()
                                     : x_in.reshape({Mrows, K}).to(at::kFloat).contiguous();
      const at::Tensor codes = codes_in.contiguous();
      const at::Tensor scales = scales_in.contiguous();
      Ctx c{};
      c.M = Mrows;
      c.K = K;
      c.N = N;
      c.G = G;
      c.gs = group_size;
      c.gs_shift = -1;  // division for a group size that is not a power of two (scalar path only)
      if ((group_size & (group_size - 1)) == 0) {
        c.gs_shift = 0;
        while ((int64_t(1) << c.gs_shift) < group_size) ++c.gs_shift;
      }
      c.nblk = nblk;
      c.Kp = nblk * kBlockWeights;
      c.row_bytes = nblk * kBlockBytes;
      c.codes = codes.data_ptr<uint8_t>();
      c.scales = scales.data_ptr();
      c.scale_dtype = st;
      c.y = y32.data_ptr<float>();
      if (!bf16_path) c.x = x.data_ptr<float>();

      if (is_neon(isa)) {
        run_neon(c, x, y32, int8_activations, isa);
      } else if (bf16_path) {
        c.Kc = (nblk + 1) / 2 * kChunkWeights;
        at::Tensor xb = at::empty({Mrows, c.Kc}, x.options());
        c.xb = reinterpret_cast<const uint16_t*>(xb.data_ptr());
        permute_x_bf16(c, reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(xb.data_ptr()));
        if (bf16_prefill) {
          // Tiles of rows dequantized to bf16 (about 1 MiB, so the GEMM reads them from cache).
          const int64_t tile = std::min(N, std::max<int64_t>(kRowTile, ((int64_t(1) << 20) / (c.Kc * 2)) / kRowTile * kRowTile));
          at::Tensor wt = at::empty({tile, c.Kc}, x.options());
          uint16_t* wp = reinterpret_cast<uint16_t*>(wt.data_ptr());
          for (int64_t t0 = 0; t0 < N; t0 += tile) {
            const int64_t t1 = std::min(N, t0 + tile);
            at::parallel_for(t0, t1, 8, [&](int64_t a, int64_t b) { dequant_rows_bf16(c, a, b, wp + (a - t0) * c.Kc); });
            y32.narrow(1, t0, t1 - t0).copy_(at::mm(xb, wt.narrow(0, 0, t1 - t0).t()));
          }
        } else {
          run_rows(c, token_tile(isa, false), [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            RowFn fn = G > 1 ? pick_mb<ExactBf16>(mb) : mb == 1 ? &exact_rows_bf16_one_token : pick_mb<ExactBf16Pairs>(mb);
            fn(c, a, b, m0, s);
          });
        }
      } else if (!int8_activations) {
        at::Tensor xp;
        if (isa != Isa::kScalar) {
          xp = at::empty({Mrows, c.Kp}, x.options());
          permute_x(c, xp.data_ptr<float>());
          c.xp = xp.data_ptr<float>();
        }
        // The per-row decode loops (several tokens per pass over a row's codes) on tokens of cc.
        auto decode_loops = [&](const Ctx& cc) {
          run_rows(cc, token_tile(isa, false), [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            // Whole-row scales (G == 1, BitCPM4) skip the per-group scale bookkeeping.
            RowFn fn = isa >= Isa::kAvx512 ? (G == 1 ? pick_mb<ExactAvx512WholeRow>(mb) : pick_mb<ExactAvx512>(mb))
                                           : (G == 1 ? pick_mb<ExactAvx2WholeRow>(mb) : pick_mb<ExactAvx2>(mb));
            fn(cc, a, b, m0, s);
          });
        };
        if (isa != Isa::kScalar && Mrows >= kFusedGemmMinM && ternary_gemm_fp32_available()) {
          // Several tokens: the ternary GEMM (ternary_gemm.cpp) decodes each 16-row tile once into
          // L1/L2 and runs brgemm on it for every tile of tokens. Products x * (t*s) are exact in
          // fp32 as in the dense layer, so only the summation order differs. The GEMM pads its
          // token tiles to multiples of 8; up to 3 tokens past one (a decode batch of 10) cost less
          // in the decode loops than padded to 8 more (kGemmTailTokens).
          const int64_t tail = Mrows % 8 <= kGemmTailTokens ? Mrows % 8 : 0;
          const int64_t gemm_m = Mrows - tail;
          ternary_gemm_fp32(gemm_m, N, c.Kp, c.xp, c.y, [&](int64_t a, int64_t b, float* out, int64_t ld) {
            std::vector<float> sbuf(G);
            if (isa >= Isa::kAvx512) dequant_rows_avx512(c, a, b, out, ld, sbuf.data());
            else dequant_rows_avx2(c, a, b, out, ld, sbuf.data());
          });
          if (tail > 0) {
            Ctx rest = c;  // the last `tail` tokens: row kernels index x and y from these pointers
            rest.M = tail;
            rest.xp = c.xp + gemm_m * c.Kp;
            rest.y = c.y + gemm_m * N;
            decode_loops(rest);
          }
        } else if (Mrows >= kGemmMinM) {
          // Prefill: dequantize tiles of rows to fp32 and let at::mm (MKL/oneDNN sgemm) do the
          // GEMM. 16-bit activations were widened to fp32 exactly, and their products with t*s
          // are exact in fp32 as in a 16-bit GEMM with fp32 accumulation, so the result is the
          // dense layer's up to summation order. A bf16 GEMM is only fast where the CPU has bf16
          // dot products (the avx512bf16 branch above); elsewhere oneDNN has none and ATen's
          // fallback takes 3.2-3.8x as long as this fp32 GEMM on the 0.5B layers at 252 tokens
          // (benchmarks/kernel_speed.py --isa avx2, "dense bf16" vs "ternary exact").
          const int64_t ld = isa == Isa::kScalar ? K : c.Kp;
          const at::Tensor xa = isa == Isa::kScalar ? x : xp;
          int64_t tile = std::max<int64_t>(kRowTile, ((int64_t(1) << 20) / (ld * 4)) / kRowTile * kRowTile);
          tile = std::min(tile, N);
          at::Tensor wt = at::empty({tile, ld}, x.options());
          for (int64_t t0 = 0; t0 < N; t0 += tile) {
            const int64_t t1 = std::min(N, t0 + tile);
            float* wp = wt.data_ptr<float>();
            at::parallel_for(t0, t1, 8, [&](int64_t a, int64_t b) {
              std::vector<float> sbuf(G);
              float* dst = wp + (a - t0) * ld;
              if (isa == Isa::kScalar) dequant_rows_scalar(c, a, b, dst, ld, sbuf.data());
              else if (isa >= Isa::kAvx512) dequant_rows_avx512(c, a, b, dst, ld, sbuf.data());
              else dequant_rows_avx2(c, a, b, dst, ld, sbuf.data());
            });
            const at::Tensor w_tile = wt.narrow(0, 0, t1 - t0);
            const at::Tensor part = at::mm(xa, w_tile.t());
            y32.narrow(1, t0, t1 - t0).copy_(part);
          }
        } else if (isa == Isa::kScalar) {
          run_rows(c, 1, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            exact_rows_scalar(c, a, b, m0, m0 + mb, s);
          });
        } else {
          decode_loops(c);
        }
      } else {
        at::Tensor q = at::empty({Mrows, c.Kp}, x.options().dtype(at::kChar));
        at::Tensor qsum = at::empty({Mrows, G}, x.options().dtype(at::kInt));
        at::Tensor inv = at::empty({Mrows}, x.options());
        c.q = q.data_ptr<int8_t>();
        c.qsum = qsum.data_ptr<int32_t>();
        c.inv = inv.data_ptr<float>();
        at::Tensor qlane;
        if (isa != Isa::kScalar && G > 1) {
          qlane = at::empty({Mrows, G, 16}, x.options().dtype(at::kInt));
          c.qlane = qlane.data_ptr<int32_t>();
        }
        at::parallel_for(0, Mrows, 16, [&](int64_t a, int64_t b) {
          for (int64_t m = a; m < b; ++m) {
            int8_t* qr = q.data_ptr<int8_t>() + m * c.Kp;
            int32_t* qs = qsum.data_ptr<int32_t>() + m * G;
            float* iv = inv.data_ptr<float>() + m;
            if (isa == Isa::kScalar) quantize_row_scalar(c, c.x + m * K, qr, qs, iv);
            else quantize_row_avx2(c, c.x + m * K, qr, qs, iv);
            if (c.qlane) lane_qsums_avx2(c, qr, const_cast<int32_t*>(c.qlane) + m * G * 16);
          }
        });
        if (isa == Isa::kScalar) {
          run_rows(c, 1, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            int8_rows_scalar(c, a, b, m0, m0 + mb, s);
          });
        } else {
          // AVX512 int8 needs VNNI (vpdpbusd) and whole 64-element halves per group; otherwise
          // the AVX2 routine runs (it handles group_size 32).
          const bool use512 = isa >= Isa::kAvx512 && cpu_has_vnni() && (G == 1 || group_size >= 64);
          const Isa eff = use512 ? Isa::kAvx512 : Isa::kAvx2;
          const int mbt = token_tile(eff, true);
          run_rows(c, mbt, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            RowFn fn = use512 ? pick_mb<Int8Avx512Vnni>(mb) : pick_mb<Int8Avx2>(mb);
            fn(c, a, b, m0, s);
          });
        }
      }
    }
  }
  if (bias.has_value() && bias->defined()) y32.add_(bias->to(at::kFloat));
  at::Tensor y = xt == at::kFloat ? y32 : y32.to(xt);
  return y.reshape(out_shape);
}

// The paths this CPU can run, best last: its architecture's paths up to best_isa().
std::vector<Isa> runnable_isas() {
  static const std::vector<Isa> paths = [] {
    const std::vector<Isa> ladder = BITCPM_X86     ? std::vector<Isa>{Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}
                                    : BITCPM_ARM64 ? std::vector<Isa>{Isa::kScalar, Isa::kNeon, Isa::kNeonDotprod}
                                                   : std::vector<Isa>{Isa::kScalar};
    std::vector<Isa> out;
    for (Isa isa : ladder) {
      out.push_back(isa);
      if (isa == best_isa()) break;
    }
    return out;
  }();
  return paths;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kNeon, Isa::kNeonDotprod}) {
    if (name != isa_name(isa)) continue;
    const std::vector<Isa> ok = runnable_isas();
    TORCH_CHECK_VALUE(std::find(ok.begin(), ok.end(), isa) != ok.end(), "bitcpm_cpu: isa '", name,
                      "' is not supported by this CPU (best: ", isa_name(best_isa()), ")");
    return isa;
  }
  TORCH_CHECK_VALUE(false, "bitcpm_cpu: unknown isa '", name,
                    "' (auto, scalar, avx2, avx512, avx512bf16, neon, neon-dotprod)");
  return Isa::kScalar;
}

at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              int64_t group_size, const c10::optional<at::Tensor>& bias, bool int8_activations) {
  return ternary_linear_impl(x, codes, scales, group_size, bias, int8_activations, best_isa());
}

at::Tensor ternary_linear_isa(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              int64_t group_size, const c10::optional<at::Tensor>& bias, bool int8_activations,
                              c10::string_view isa) {
  return ternary_linear_impl(x, codes, scales, group_size, bias, int8_activations, parse_isa(std::string(isa)));
}

std::vector<std::string> isa_available() {
  std::vector<std::string> out;
  for (Isa isa : runnable_isas()) out.push_back(isa_name(isa));
  return out;
}

// "avx512bf16+vnni" and the like: the path name, plus VNNI where an AVX512 path can use it.
std::string isa_label(Isa isa) {
  std::string s = isa_name(isa);
  if (!is_neon(isa) && isa >= Isa::kAvx512 && cpu_supports_vnni()) s += "+vnni";
  return s;
}

std::string current_isa() { return isa_label(best_isa()); }

// This CPU's best path without VLLM_BITCPM_ISA's cap.
std::string cpu_isa() { return isa_label(detect_isa(false)); }

}  // namespace
}  // namespace bitcpm_cpu

// The schema of bitcpm::ternary_linear is defined from Python (vllm_bitcpm/ops/__init__.py)
// before this module is imported; registering an impl for an op whose def comes later is also
// accepted by the dispatcher, so the order is not load-bearing.
TORCH_LIBRARY_IMPL(bitcpm, CPU, m) { m.impl("ternary_linear", &bitcpm_cpu::ternary_linear_cpu); }

TORCH_LIBRARY(bitcpm_cpu, m) {
  m.def("isa_available() -> str[]", &bitcpm_cpu::isa_available);
  m.def("current_isa() -> str", &bitcpm_cpu::current_isa);
  m.def("cpu_isa() -> str", &bitcpm_cpu::cpu_isa);
  m.def(
      "ternary_linear_isa(Tensor x, Tensor codes, Tensor scales, int group_size, Tensor? bias=None, "
      "bool int8_activations=False, str isa='auto') -> Tensor");
  m.impl("ternary_linear_isa", c10::DispatchKey::CPU, &bitcpm_cpu::ternary_linear_isa);
}

// A plain Python module: importing it loads the library, which runs the registrations above.
static struct PyModuleDef bitcpm_cpu_module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                               "bitcpm CPU kernels (registered with torch.library)", -1, nullptr};
PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&bitcpm_cpu_module); }
