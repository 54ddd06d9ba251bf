// Ternary GEMM, fp32 compute, for exact mode with several tokens (see ternary_gemm.h).
//
// Shape of the computation: the transposed product y^T = W . x^T, so the operand that must be
// rebuilt from 2-bit codes (W) is brgemm's A, which brgemm reads row-major: the kernel's own row
// decoder writes it directly, with no repacking. x^T (brgemm's B, [K][tokens]) is packed once per
// call, per tile of tokens (token_tile below). Per thread and tile of kGemmRows weight rows:
//   decode rows (kGemmRows x K fp32, <= 256 KiB for K = 4096: L2) ->
//   for each token tile: C (kGemmRows x tokens) = brgemm(A, x^T tile) over K blocks of kGemmKBlock
//   (add_C accumulates) -> C transposed into y.
// brgemm picks oneDNN's best ukernel for the CPU (AVX2 FMA, AVX512; AMX is bf16/int8 only, and
// the bf16 path is not routed here). Its kernel cache is per thread and keyed by the shape, so
// tile sizes are fixed (tails add one or two shapes); brgemm_release() ends each thread's run.
#include "ternary_gemm.h"

#include "cpu_features.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace bitcpm_cpu {
namespace {

constexpr int64_t kGemmRows = 16;      // weight rows per tile (brgemm's M)
constexpr int64_t kGemmMaxTokens = 24;  // tokens per tile at most (brgemm's N: 3 AVX2 vectors)
constexpr int64_t kGemmKBlock = 1024;  // K per brgemm call (A and B blocks of 64 KiB each)

// Tokens per tile: a multiple of 8 (an AVX2 vector of fp32 lanes), all tiles of one width, the
// last zero padded. brgemm runs a width that is not a multiple of 8 far slower than the padded
// width (10 tokens: 10.1 ms as 10 vs 8.0 ms as 16 over the four 0.5B layers, AVX2 Zen 3,
// benchmarks/prefill_gemm.py), and one width means one cached kernel. Of 8, 16 and 24 the width
// that pads least wins, the wider on a tie (fewer B loads per FMA).
int64_t token_tile(int64_t M) {
  int64_t best = 8;
  for (int64_t w = 16; w <= kGemmMaxTokens; w += 8) {
    if ((M + w - 1) / w * w <= (M + best - 1) / best * best) best = w;
  }
  return best;
}

}  // namespace

bool ternary_gemm_fp32_available() {
  return BITCPM_X86 != 0;  // oneDNN's ukernels are x86 (ATen has other fallbacks elsewhere)
}

void ternary_gemm_fp32(int64_t M, int64_t N, int64_t K, const float* x, float* y, const DecodeRowsFp32& decode) {
  namespace cpublas = at::native::cpublas;
  const int64_t mt = token_tile(M);
  const int64_t token_tiles = (M + mt - 1) / mt;
  // x^T per token tile: tile t holds tokens [t*mt, t*mt + mt) as [K][mt], zero past token M.
  std::vector<float> xt(static_cast<size_t>(token_tiles * mt * K));
  at::parallel_for(0, token_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * mt, real = std::min(mt, M - m0);
      float* dst = xt.data() + m0 * K;
      for (int64_t m = 0; m < mt; ++m) {
        if (m < real) {
          const float* src = x + (m0 + m) * K;
          for (int64_t k = 0; k < K; ++k) dst[k * mt + m] = src[k];
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k * mt + m] = 0.0f;
        }
      }
    }
  });
  const int64_t row_tiles = (N + kGemmRows - 1) / kGemmRows;
  at::parallel_for(0, row_tiles, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> w(static_cast<size_t>(kGemmRows * K));
    float c[kGemmRows * kGemmMaxTokens];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n0 = r * kGemmRows, nr = std::min(kGemmRows, N - n0);
      decode(n0, n0 + nr, w.data(), K);
      for (int64_t t = 0; t < token_tiles; ++t) {
        const int64_t m0 = t * mt, real = std::min(mt, M - m0);
        const float* b = xt.data() + m0 * K;
        for (int64_t k0 = 0; k0 < K; k0 += kGemmKBlock) {
          const int64_t kb = std::min(kGemmKBlock, K - k0);
          cpublas::brgemm(nr, mt, kb, /*ld_a=*/K, /*ld_b=*/mt, /*ld_c=*/mt, /*add_C=*/k0 > 0, w.data() + k0,
                          b + k0 * mt, c, /*is_vnni=*/false);
        }
        for (int64_t m = 0; m < real; ++m) {
          float* yr = y + (m0 + m) * N + n0;
          for (int64_t i = 0; i < nr; ++i) yr[i] = c[i * mt + m];
        }
      }
    }
    cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

}  // namespace bitcpm_cpu
