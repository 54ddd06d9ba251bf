// CPU kernels for the lm_head at decode sizes (a few tokens):
//   bitcpm_cpu::bf16_gemv: y = x @ W^T, bf16 x and a dense bf16 W;
//   bitcpm_cpu::int8_gemv: y = (x @ Q^T) * scale, the opt-in int8 head (VLLM_BITCPM_LM_HEAD=int8):
//     Q int8 [N, K] with one fp32 scale per row.
//
// Why: once the linear layers are ternary, the high-precision lm_head (BitCPM4-0.5B: 73448 x
// 1024 bf16, 144 MiB) is the largest read of a decode step, and a decode-sized matmul over it is
// a pure memory stream. oneDNN's bf16 GEMM (vLLM's CPU path) reads it at ~13 GB/s on one core of
// the development VM; a plain streaming loop that keeps several rows in flight does better (see
// benchmarks/kernel_speed.py, "lm_head" rows). Results are the dense matmul's up to float summation
// order: bf16 x bf16 products are exact in fp32 and sums are fp32, rounded once to bf16.
//
// The int8 head halves that read again. ATen's weight-only int8 matmul (_weight_int8pack_mm)
// runs it slower than bf16_gemv runs the bf16 head on one core, so the int8 copy only paid in
// memory traffic, not time; int8_gemv streams it the same way: each int8 weight is widened to
// fp32 (exact) and multiplied with the fp32 activation, fp32 sums, the row scale applied once.
//
// Paths, chosen at run time from what the CPU supports: bf16_gemv: AVX512-BF16 (`vdpbf16ps`, 32
// MACs per instruction), AVX2 (bf16 widened to fp32 by a 16-bit shift, FMA), scalar; int8_gemv:
// AVX512-VNNI (`vpmovsxbw` + `vpdpwssd`), AVX2 (`vpmovsxbw` + `vpmaddwd`), scalar. Rows are
// split across ATen's threads. The SIMD paths are x86 only (BITCPM_X86, cpu_features.h); other
// CPUs run the scalar twins.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_features.h"  // <immintrin.h> on x86

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace bitcpm_cpu {
namespace {

constexpr int64_t kMaxTokens = 16;     // decode sizes; larger M is a GEMM (use oneDNN / at::mm)
constexpr int64_t kRowGrain = 512;     // rows per parallel task
constexpr int64_t kTileBytes = 16 << 10;  // weight rows revisited per token block (L1-resident)

inline float bf16_to_float(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Gemv {
  const uint16_t* x;  // [M, K]
  const uint16_t* w;  // [N, K]
  float* y;           // [M, N]
  int64_t M, K, N;
  const float* xf;    // [M, K]: x widened to fp32 (exact), for the AVX2 path
};

void gemv_scalar(const Gemv& g, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = g.w + n * g.K;
    for (int64_t m = 0; m < g.M; ++m) {
      const uint16_t* xr = g.x + m * g.K;
      float acc = 0.f;
      for (int64_t k = 0; k < g.K; ++k) acc += bf16_to_float(xr[k]) * bf16_to_float(wr[k]);
      g.y[m * g.N + n] = acc;
    }
  }
}

// Token blocks of 8/4/2/1 over a tile of rows small enough to stay in L1, so W streams from
// memory once whatever M is. `rows(std::integral_constant<int, MB>, m0, t0, t1)` runs one block.
template <class Rows>
void for_token_blocks(int64_t M, int64_t row_bytes, int64_t n0, int64_t n1, Rows&& rows) {
  const int64_t tile = std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, row_bytes));
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) rows(std::integral_constant<int, 8>{}, m0, t0, t1);
    if (M - m0 >= 4) { rows(std::integral_constant<int, 4>{}, m0, t0, t1); m0 += 4; }
    if (M - m0 >= 2) { rows(std::integral_constant<int, 2>{}, m0, t0, t1); m0 += 2; }
    if (M - m0 >= 1) rows(std::integral_constant<int, 1>{}, m0, t0, t1);
  }
}

#if BITCPM_X86
__attribute__((target("avx2,fma"))) inline __m256 widen_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// AVX2: 8 weights per FMA. Each block of 8 bf16 weights is widened to fp32 once (a 16-bit
// shift, exact) and multiplied into every token of the block with one FMA each, against the
// activations widened once per call (g.xf): MB + 1 instructions per 8 weights for MB tokens
// instead of 3 MB (widening both operands per token made M > 1 compute bound). A accumulator
// chains per token hide the FMA latency; the K tail is scalar.
template <int MB, int A>
__attribute__((target("avx2,fma"))) void gemv_avx2_t(const Gemv& g, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t k8 = g.K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = g.w + n * g.K;
    __m256 acc[MB][A];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * A <= k8; k += 8 * A) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) {
        const __m256 wv = widen_bf16(wr + k + 8 * a);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m)
          acc[m][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(g.xf + (m0 + m) * g.K + k + 8 * a), acc[m][a]);
      }
    }
    for (; k < k8; k += 8) {
      const __m256 wv = widen_bf16(wr + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
        acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(g.xf + (m0 + m) * g.K + k), acc[m][0]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[m][0];
#pragma GCC unroll 4
      for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]);
      float total = hsum256(t);
      const float* xr = g.xf + (m0 + m) * g.K;
      for (int64_t kk = k8; kk < g.K; ++kk) total += xr[kk] * bf16_to_float(wr[kk]);
      g.y[(m0 + m) * g.N + n] = total;
    }
  }
}

// AVX512-BF16: one row at a time, every token, 32 weights per `vdpbf16ps`; A accumulator chains
// over k hide the instruction's latency. One row at a time keeps the weight read a single
// sequential stream, which the hardware prefetcher follows best (interleaving 2 or 4 rows, the
// obvious way to share activation loads, was slower than oneDNN on one core). The K tail is a
// masked load (zeros contribute nothing).
template <int MB, int A>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void gemv_bf16_t(const Gemv& g, int64_t m0,
                                                                              int64_t n0, int64_t n1) {
  const int64_t k32 = g.K / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (g.K - k32)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = g.w + n * g.K;
    __m512 acc[MB][A];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * A <= k32; k += 32 * A) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k + 32 * a);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m)
          acc[m][a] = _mm512_dpbf16_ps(acc[m][a], wv, (__m512bh)_mm512_loadu_si512(g.x + (m0 + m) * g.K + k + 32 * a));
      }
    }
    for (; k < g.K; k += 32) {
      const __mmask32 mask = k < k32 ? ~__mmask32(0) : tail;
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, g.x + (m0 + m) * g.K + k));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m512 t = acc[m][0];
#pragma GCC unroll 4
      for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[m][a]);
      g.y[(m0 + m) * g.N + n] = _mm512_reduce_add_ps(t);
    }
  }
}

template <int MB>
void gemv_bf16_rows(const Gemv& g, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int A = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);  // accumulators MB * A <= 8
  gemv_bf16_t<MB, A>(g, m0, n0, n1);
}

void gemv_bf16(const Gemv& g, int64_t n0, int64_t n1) {
  for_token_blocks(g.M, 2 * g.K, n0, n1, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
    gemv_bf16_rows<decltype(mb)::value>(g, m0, t0, t1);
  });
}

void gemv_avx2(const Gemv& g, int64_t n0, int64_t n1) {
  for_token_blocks(g.M, 2 * g.K, n0, n1, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
    constexpr int MB = decltype(mb)::value;
    constexpr int A = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);  // accumulators MB * A <= 8 of AVX2's 16 ymm
    gemv_avx2_t<MB, A>(g, m0, t0, t1);
  });
}
#else   // not x86: never picked (cpu_has_* are false), see cpu_features.h
void gemv_bf16(const Gemv&, int64_t, int64_t) { BITCPM_NO_SIMD_PATH("bf16_gemv avx512bf16"); }
void gemv_avx2(const Gemv&, int64_t, int64_t) { BITCPM_NO_SIMD_PATH("bf16_gemv avx2"); }
#endif  // BITCPM_X86

// An ISA path of a kernel: its name (the ops' `isa` argument), whether this CPU runs it, its
// routine. A kernel lists its paths best first; the scalar one runs everywhere.
template <class Fn>
struct IsaPath {
  const char* name;
  bool (*runs)();
  Fn fn;
};

inline bool runs_everywhere() { return true; }

// The path named `isa`, or for "" the first one this CPU runs; nullptr when the CPU cannot run the
// named path or no path has that name.
template <class Fn, size_t P>
const IsaPath<Fn>* find_path(const std::array<IsaPath<Fn>, P>& paths, const std::string& isa) {
  for (const IsaPath<Fn>& p : paths) {
    if (isa.empty() ? p.runs() : isa == p.name) return p.runs() ? &p : nullptr;
  }
  return nullptr;
}

using RowsFn = void (*)(const Gemv&, int64_t, int64_t);
const std::array<IsaPath<RowsFn>, 3> kBf16Paths{{{"avx512bf16", cpu_has_avx512bf16, &gemv_bf16},
                                                  {"avx2", cpu_has_avx2, &gemv_avx2},
                                                  {"scalar", runs_everywhere, &gemv_scalar}}};


// ------------------------------------------------------------------------------------------
// int8_gemv: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k].
//
// Widening every int8 weight to fp32 for an FMA (3 instructions per 16 weights) made the loop
// compute bound on one core, slower than the bf16 head it should beat. Instead each token is
// rounded once to int16 (x16 = round(x * 32767 / max|x|): a relative step of 2^-16 of the token's
// largest entry, 256 times finer than bf16's own rounding of x) and the dot products are integer:
// int8 weights sign-extended to int16, `vpdpwssd` (AVX512-VNNI; AVX2: `vpmaddwd` + `vpaddd`)
// into int32, 32 weights per instruction. A block of kBlockK columns cannot overflow int32
// (256 * 32767 * 128 < 2^31); each block's sum is converted to fp32 and the blocks add in fp32.
// A token with a NaN or infinite entry cannot be rounded to integers: it takes the fp32 loop, so
// NaN/Inf propagate as in the dense matmul.

constexpr int64_t kBlockK = 256;  // columns per exact int32 partial sum
constexpr float kX16Max = 32767.f;

struct Int8Gemv {
  const int16_t* x;    // [M, Kp] int16, zero padded to Kp (multiple of kBlockK)
  const float* xinv;   // [M] max|x| / 32767: x ~= x16 * xinv
  const int8_t* q;     // [N, K]
  const float* scale;  // [N]
  float* y;            // [M, N]
  int64_t M, K, Kp, N;
};

// The scalar twin of the SIMD loops: the same int32 block sums, fp32 across blocks.
void int8_gemv_scalar(const Int8Gemv& g, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = g.q + n * g.K;
    for (int64_t m = 0; m < g.M; ++m) {
      const int16_t* xr = g.x + m * g.Kp;
      float acc = 0.f;
      for (int64_t k0 = 0; k0 < g.K; k0 += kBlockK) {
        int32_t block = 0;
        for (int64_t k = k0; k < std::min(g.K, k0 + kBlockK); ++k) block += int32_t(xr[k]) * int32_t(qr[k]);
        acc += static_cast<float>(block);
      }
      g.y[m * g.N + n] = acc * (g.xinv[m] * g.scale[n]);
    }
  }
}

#if BITCPM_X86
// AVX2: 16 weights per `vpmovsxbw` + `vpmaddwd` + `vpaddd`; the K tail is scalar.
template <int MB>
__attribute__((target("avx2,fma"))) void int8_gemv_avx2_t(const Int8Gemv& g, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t k16 = g.K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = g.q + n * g.K;
    __m256 tot[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < k16; k0 += kBlockK) {
      __m256i acc[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
      for (int64_t k = k0; k < std::min(k16, k0 + kBlockK); k += 16) {
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k)));
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.x + (m0 + m) * g.Kp + k));
          acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(w, xv));
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) tot[m] = _mm256_add_ps(tot[m], _mm256_cvtepi32_ps(acc[m]));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const int16_t* xr = g.x + (m0 + m) * g.Kp;
      int32_t tail = 0;  // < 16 columns, in the last block
      for (int64_t k = k16; k < g.K; ++k) tail += int32_t(xr[k]) * int32_t(qr[k]);
      const float t = hsum256(tot[m]) + static_cast<float>(tail);
      g.y[(m0 + m) * g.N + n] = t * (g.xinv[(m0 + m)] * g.scale[n]);
    }
  }
}

// AVX512-VNNI: one row at a time (one sequential stream, as gemv_bf16_t), 32 weights per
// `vpmovsxbw` shared by every token, one `vpdpwssd` per token, A int32 chains per token within a
// block; the K tail is a masked byte load (x16 is zero padded). AVX512 CPUs without VNNI take the
// AVX2 path (as the ternary kernel's int8 mode does).
template <int MB, int A>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int8_gemv_avx512_t(const Int8Gemv& g,
                                                                                      int64_t m0, int64_t n0,
                                                                                      int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = g.q + n * g.K;
    __m512 tot[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < g.K; k0 += kBlockK) {
      __m512i acc[MB][A];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
        for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_si512();
      if (k0 + kBlockK <= g.K) {  // a whole block: 8 steps, chain j % A (constant after unrolling)
#pragma GCC unroll 8
        for (int j = 0; j < kBlockK / 32; ++j) {
          const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + k0 + 32 * j)));
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m)
            acc[m][j % A] = _mm512_dpwssd_epi32(acc[m][j % A], w, _mm512_loadu_si512(g.x + (m0 + m) * g.Kp + k0 + 32 * j));
        }
      } else {  // the last, partial block: masked weight loads
        for (int64_t k = k0; k < g.K; k += 32) {
          const __mmask32 mask = k + 32 <= g.K ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (g.K - k)) - 1);
          const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, qr + k));
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], w, _mm512_loadu_si512(g.x + (m0 + m) * g.Kp + k));
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        __m512i t = acc[m][0];
#pragma GCC unroll 4
        for (int a = 1; a < A; ++a) t = _mm512_add_epi32(t, acc[m][a]);
        tot[m] = _mm512_add_ps(tot[m], _mm512_cvtepi32_ps(t));
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) g.y[(m0 + m) * g.N + n] = _mm512_reduce_add_ps(tot[m]) * (g.xinv[m0 + m] * g.scale[n]);
  }
}

void int8_gemv_avx512(const Int8Gemv& g, int64_t n0, int64_t n1) {
  for_token_blocks(g.M, g.K, n0, n1, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
    constexpr int MB = decltype(mb)::value;
    int8_gemv_avx512_t<MB, MB <= 2 ? 4 : (MB <= 4 ? 2 : 1)>(g, m0, t0, t1);
  });
}

void int8_gemv_avx2(const Int8Gemv& g, int64_t n0, int64_t n1) {
  for_token_blocks(g.M, g.K, n0, n1, [&](auto mb, int64_t m0, int64_t t0, int64_t t1) {
    int8_gemv_avx2_t<decltype(mb)::value>(g, m0, t0, t1);
  });
}
#else   // not x86: never picked (cpu_has_* are false), see cpu_features.h
void int8_gemv_avx512(const Int8Gemv&, int64_t, int64_t) { BITCPM_NO_SIMD_PATH("int8_gemv avx512vnni"); }
void int8_gemv_avx2(const Int8Gemv&, int64_t, int64_t) { BITCPM_NO_SIMD_PATH("int8_gemv avx2"); }
#endif  // BITCPM_X86

inline bool cpu_has_avx512_vnni() { return cpu_has_avx512() && cpu_has_vnni(); }

using Int8RowsFn = void (*)(const Int8Gemv&, int64_t, int64_t);
const std::array<IsaPath<Int8RowsFn>, 3> kInt8Paths{{{"avx512vnni", cpu_has_avx512_vnni, &int8_gemv_avx512},
                                                      {"avx2", cpu_has_avx2, &int8_gemv_avx2},
                                                      {"scalar", runs_everywhere, &int8_gemv_scalar}}};

// The best path of each kernel, decided once.
const IsaPath<RowsFn>& best_bf16_path() {
  static const IsaPath<RowsFn>& best = *find_path(kBf16Paths, "");
  return best;
}

const IsaPath<Int8RowsFn>& best_int8_path() {
  static const IsaPath<Int8RowsFn>& best = *find_path(kInt8Paths, "");
  return best;
}

}  // namespace

// x: [M, K] bf16 with M <= kMaxTokens, weight: [N, K] bf16 contiguous; returns [M, N] in bf16.
// `isa` "" picks the best path this CPU runs; tests force each one.
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const std::string& isa_name) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "bitcpm bf16_gemv: x and weight must be 2-D, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "bitcpm bf16_gemv: x and weight must be bfloat16, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.size(1) == weight.size(1), "bitcpm bf16_gemv: x has ", x.size(1), " columns, weight has ",
              weight.size(1));
  TORCH_CHECK(x.size(0) <= kMaxTokens, "bitcpm bf16_gemv: at most ", kMaxTokens, " tokens, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous(), "bitcpm bf16_gemv: weight must be contiguous");
  const IsaPath<RowsFn>* path = isa_name.empty() ? &best_bf16_path() : find_path(kBf16Paths, isa_name);
  TORCH_CHECK(path != nullptr, "bitcpm bf16_gemv: ISA path '", isa_name, "' is not available on this CPU");
  const RowsFn rows = path->fn;
  const at::Tensor xc = x.contiguous();
  // x widened to fp32 (exact) once per call, for the AVX2 path only; the others read bf16 directly.
  const at::Tensor xf = path->fn == &gemv_avx2 ? xc.to(at::kFloat) : at::Tensor();
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
  const Gemv g{reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<const uint16_t*>(weight.data_ptr()),
               y.data_ptr<float>(), x.size(0), x.size(1), weight.size(0),
               xf.defined() ? xf.data_ptr<float>() : nullptr};
  if (g.M > 0 && g.N > 0) {
    at::parallel_for(0, g.N, kRowGrain, [&](int64_t n0, int64_t n1) { rows(g, n0, n1); });
  }
  return y.to(at::kBFloat16);
}

std::string bf16_gemv_isa() { return best_bf16_path().name; }

// x: [M, K] (bf16, fp16 or fp32) with M <= kMaxTokens, qweight: [N, K] int8 contiguous, scales:
// [N] (any float dtype, used as fp32); returns [M, N] in x's dtype.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::string& isa_name) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "bitcpm int8_gemv: x and qweight must be 2-D, got ",
              x.sizes(), " and ", qweight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bitcpm int8_gemv: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "bitcpm int8_gemv: qweight must be int8, got ", qweight.scalar_type());
  TORCH_CHECK(x.size(1) == qweight.size(1), "bitcpm int8_gemv: x has ", x.size(1), " columns, qweight has ",
              qweight.size(1));
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0), "bitcpm int8_gemv: scales must be [",
              qweight.size(0), "] (one per qweight row), got ", scales.sizes());
  TORCH_CHECK(x.size(0) <= kMaxTokens, "bitcpm int8_gemv: at most ", kMaxTokens, " tokens, got ", x.size(0));
  TORCH_CHECK(qweight.is_contiguous(), "bitcpm int8_gemv: qweight must be contiguous");
  const IsaPath<Int8RowsFn>* path = isa_name.empty() ? &best_int8_path() : find_path(kInt8Paths, isa_name);
  TORCH_CHECK(path != nullptr, "bitcpm int8_gemv: ISA path '", isa_name, "' is not available on this CPU");
  const Int8RowsFn rows = path->fn;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  const int64_t Kp = (K + kBlockK - 1) / kBlockK * kBlockK;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  at::Tensor x16 = at::zeros({M, Kp}, x.options().dtype(at::kShort));
  std::vector<float> xinv(M);
  std::vector<int64_t> finite_tokens;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xf.data_ptr<float>() + m * K;
    float absmax = 0.f;
    for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(xr[k]));
    if (!std::isfinite(absmax) || std::any_of(xr, xr + K, [](float v) { return std::isnan(v); })) {
      // Dense semantics for non-finite tokens: the fp32 products, NaN and Inf included.
      const int8_t* q = qweight.data_ptr<int8_t>();
      float* yr = y.data_ptr<float>() + m * N;
      at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * static_cast<float>(q[n * K + k]);
          yr[n] = acc * sf.data_ptr<float>()[n];
        }
      });
      continue;
    }
    const float mul = absmax > 0.f ? kX16Max / absmax : 1.f;
    xinv[m] = absmax > 0.f ? absmax / kX16Max : 0.f;
    int16_t* x16r = x16.data_ptr<int16_t>() + m * Kp;
    for (int64_t k = 0; k < K; ++k)
      x16r[k] = static_cast<int16_t>(std::max(-kX16Max, std::min(kX16Max, std::nearbyint(xr[k] * mul))));
    finite_tokens.push_back(m);
  }
  if (static_cast<int64_t>(finite_tokens.size()) == M) {
    const Int8Gemv g{x16.data_ptr<int16_t>(), xinv.data(), qweight.data_ptr<int8_t>(), sf.data_ptr<float>(),
                     y.data_ptr<float>(), M, K, Kp, N};
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) { rows(g, n0, n1); });
  } else {
    for (const int64_t m : finite_tokens) {  // rare: a batch with a non-finite token, one token at a time
      at::Tensor ym = at::empty({1, N}, y.options());
      const Int8Gemv g{x16.data_ptr<int16_t>() + m * Kp, xinv.data() + m, qweight.data_ptr<int8_t>(),
                       sf.data_ptr<float>(), ym.data_ptr<float>(), 1, K, Kp, N};
      at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) { rows(g, n0, n1); });
      y[m].copy_(ym[0]);
    }
  }
  return y.to(x.scalar_type());
}

std::string int8_gemv_isa() { return best_int8_path().name; }

}  // namespace bitcpm_cpu

TORCH_LIBRARY_FRAGMENT(bitcpm_cpu, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, str isa=\"\") -> Tensor");
  m.impl("bf16_gemv", c10::DispatchKey::CPU, &bitcpm_cpu::bf16_gemv);
  m.def("bf16_gemv_isa() -> str", &bitcpm_cpu::bf16_gemv_isa);
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales, str isa=\"\") -> Tensor");
  m.impl("int8_gemv", c10::DispatchKey::CPU, &bitcpm_cpu::int8_gemv);
  m.def("int8_gemv_isa() -> str", &bitcpm_cpu::int8_gemv_isa);
}
