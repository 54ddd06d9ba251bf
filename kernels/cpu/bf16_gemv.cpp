// CPU kernel for bitcpm_cpu::bf16_gemv: y = x @ W^T for a few bf16 tokens and a dense bf16 W.
//
// Why: once the linear layers are ternary, the high-precision lm_head (BitCPM4-0.5B: 73448 x
// 1024 bf16, 144 MiB) is the largest read of a decode step, and a decode-sized matmul over it is
// a pure memory stream. oneDNN's bf16 GEMM (vLLM's CPU path) reads it at ~13 GB/s on one core of
// the development VM; a plain streaming loop that keeps several rows in flight does better (see
// benchmarks/kernels.py, "lm_head" rows). Results are the dense matmul's up to float summation
// order: bf16 x bf16 products are exact in fp32 and sums are fp32, rounded once to bf16.
//
// Paths, chosen at run time from what the CPU supports: AVX512-BF16 (`vdpbf16ps`, 32 MACs per
// instruction), AVX2 (bf16 widened to fp32 by a 16-bit shift, FMA), scalar. Rows are split
// across ATen's threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_features.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

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

__attribute__((target("avx2,fma"))) inline __m256 widen_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// AVX2: one row at a time, 8 weights per FMA per token; the K tail is scalar.
__attribute__((target("avx2,fma"))) void gemv_avx2(const Gemv& g, int64_t n0, int64_t n1) {
  const int64_t k8 = g.K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = g.w + n * g.K;
    for (int64_t m = 0; m < g.M; ++m) {
      const uint16_t* xr = g.x + m * g.K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= k8; k += 16) {
        a0 = _mm256_fmadd_ps(widen_bf16(wr + k), widen_bf16(xr + k), a0);
        a1 = _mm256_fmadd_ps(widen_bf16(wr + k + 8), widen_bf16(xr + k + 8), a1);
      }
      if (k < k8) a0 = _mm256_fmadd_ps(widen_bf16(wr + k), widen_bf16(xr + k), a0);
      float acc = hsum256(_mm256_add_ps(a0, a1));
      for (k = k8; k < g.K; ++k) acc += bf16_to_float(xr[k]) * bf16_to_float(wr[k]);
      g.y[m * g.N + n] = acc;
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

// Token blocks of 8/4/2/1 over a tile of rows small enough to stay in L1, so W streams from
// memory once whatever M is.
void gemv_bf16(const Gemv& g, int64_t n0, int64_t n1) {
  const int64_t tile = std::max<int64_t>(1, kTileBytes / (2 * g.K));
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    int64_t m0 = 0;
    for (; m0 + 8 <= g.M; m0 += 8) gemv_bf16_rows<8>(g, m0, t0, t1);
    if (g.M - m0 >= 4) { gemv_bf16_rows<4>(g, m0, t0, t1); m0 += 4; }
    if (g.M - m0 >= 2) { gemv_bf16_rows<2>(g, m0, t0, t1); m0 += 2; }
    if (g.M - m0 >= 1) gemv_bf16_rows<1>(g, m0, t0, t1);
  }
}

using RowsFn = void (*)(const Gemv&, int64_t, int64_t);

// The routine for an ISA path name ("" = the best this CPU runs, decided once), or nullptr when
// the CPU cannot run it.
RowsFn gemv_routine(const std::string& isa) {
  static const std::string best = cpu_has_avx512bf16() ? "avx512bf16" : (cpu_has_avx2() ? "avx2" : "scalar");
  const std::string& name = isa.empty() ? best : isa;
  if (name == "avx512bf16") return cpu_has_avx512bf16() ? &gemv_bf16 : nullptr;
  if (name == "avx2") return cpu_has_avx2() ? &gemv_avx2 : nullptr;
  if (name == "scalar") return &gemv_scalar;
  return nullptr;
}

std::string best_gemv_isa() {
  const RowsFn fn = gemv_routine("");
  return fn == &gemv_bf16 ? "avx512bf16" : (fn == &gemv_avx2 ? "avx2" : "scalar");
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
  const RowsFn rows = gemv_routine(isa_name);
  TORCH_CHECK(rows != nullptr, "bitcpm bf16_gemv: ISA path '", isa_name, "' is not available on this CPU");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
  const Gemv g{reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<const uint16_t*>(weight.data_ptr()),
               y.data_ptr<float>(), x.size(0), x.size(1), weight.size(0)};
  if (g.M > 0 && g.N > 0) {
    at::parallel_for(0, g.N, kRowGrain, [&](int64_t n0, int64_t n1) { rows(g, n0, n1); });
  }
  return y.to(at::kBFloat16);
}

std::string bf16_gemv_isa() { return best_gemv_isa(); }

}  // namespace bitcpm_cpu

TORCH_LIBRARY_FRAGMENT(bitcpm_cpu, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, str isa=\"\") -> Tensor");
  m.impl("bf16_gemv", c10::DispatchKey::CPU, &bitcpm_cpu::bf16_gemv);
  m.def("bf16_gemv_isa() -> str", &bitcpm_cpu::bf16_gemv_isa);
}
