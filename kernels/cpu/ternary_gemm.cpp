// Ternary GEMM for exact mode with several tokens (see ternary_gemm.h): fp32 compute on every x86
// CPU, bf16 compute (vdpbf16ps; AMX where present) for bf16 activations on AVX512-BF16 CPUs.
//
// fp32: the transposed product y^T = W . x^T, so the operand that must be rebuilt from 2-bit codes
// (W) is brgemm's A, which brgemm reads row-major: the kernel's own row decoder writes it
// directly, with no repacking. x^T (brgemm's B, [K][tokens]) is packed once per call, per tile
// of tokens (token_tile below). Per thread and tile of kGemmRows weight rows:
//   decode rows (kGemmRows x K fp32, <= 256 KiB for K = 4096: L2) ->
//   for each token tile: C (kGemmRows x tokens) = brgemm(A, x^T tile) over K blocks of kGemmKBlock
//   (add_C accumulates) -> C transposed into y.
// bf16 and int8: y = x . W^T (the orientation of stock's oneDNN matmul; kVnniRows below says
// why): x is A as it is; per thread and tile of kVnniRows weight rows, the rows are decoded (bf16
// t * s, or int8 t) and rearranged into the VNNI layout [K/2][rows][2] or [K/4][rows][4]
// (vnni_pack), then for every 32 tokens C += brgemm(x block, tile) over K blocks. int8: A is
// q + 128 (u8, as vpdpbusd and AMX-INT8 take it), the offset removed with each row's sum of t.
// brgemm picks oneDNN's best ukernel for the CPU (AVX2 FMA, AVX512, AVX512-BF16, AMX for bf16).
// Its kernel cache is per thread and keyed by the shape, so tile sizes are fixed (tails add a few
// shapes); brgemm_release() ends each thread's run (and releases AMX tile state).
#include "ternary_gemm.h"

#include "cpu_features.h"
#include "row_kernels.h"  // vnni_pack

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace bitcpm_cpu {
namespace {

constexpr int64_t kGemmRows = 16;      // weight rows per tile (brgemm's M)
constexpr int64_t kGemmMaxTokens = 24;  // tokens per tile at most (brgemm's N: 3 AVX2 vectors)
constexpr int64_t kGemmKBlock = 1024;  // K per brgemm call (A and B blocks of 64 KiB each)
// bf16: the other orientation, y = x . W^T as stock's oneDNN matmul computes it. x (bf16, row-major)
// is brgemm's A as it is, and the decoded rows are B in the VNNI layout vdpbf16ps and AMX read:
// kVnniRows rows (two zmm of fp32 C; an AMX tile is 16) by kVnniTokens tokens per call, any
// token count (brgemm's M needs no padding). The fp32 orientation above run on bf16 (16 rows x
// 16..48 padded tokens) took 1.13-1.26x stock's time at 32..512 tokens, this one 1.05-1.18x
// (AVX512-BF16 Zen 4, one thread, the four 0.5B layers; 64 rows per tile was no faster). int8
// uses the same tiles (its op: 170 G multiply-adds/s at 512 tokens against stock bf16's 108, one
// Zen 4 thread, benchmarks/prefill_gemm.py).
constexpr int64_t kVnniRows = 32;
constexpr int64_t kVnniTokens = 32;

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

// The bf16 and int8 GEMMs: y = x . W^T with x (M x K, TA) as brgemm's A as it is. Per thread and
// tile of kVnniRows weight rows: decode(n0, n1, rows, ld, sums) writes the tile row-major (TB) and,
// for int8, each row's sum of t; vnni_pack rearranges it into B's VNNI layout ([K/2][rows][2]
// bf16 pairs or [K/4][rows][4] int8 quads: 32-bit words either way); then for every kVnniTokens
// tokens brgemm accumulates C (TC) over K blocks and finish(n0, nr, m0, mb, C, ld_c, sums) takes it.
template <typename TA, typename TB, typename TC, typename Decode, typename Finish>
void vnni_gemm(int64_t M, int64_t N, int64_t K, const TA* a, const Decode& decode, const Finish& finish) {
  namespace cpublas = at::native::cpublas;
  constexpr int64_t per_word = 4 / sizeof(TB);  // K elements per 32-bit word of B
  const int64_t row_tiles = (N + kVnniRows - 1) / kVnniRows;
  at::parallel_for(0, row_tiles, 1, [&](int64_t r0, int64_t r1) {
    std::vector<TB> rows(static_cast<size_t>(kVnniRows * K));  // the tile, row-major
    std::vector<TB> b(static_cast<size_t>(kVnniRows * K));     // the same, VNNI
    std::vector<int32_t> sums(kVnniRows);
    std::vector<TC> c(static_cast<size_t>(kVnniTokens * kVnniRows));  // one block of y
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n0 = r * kVnniRows, nr = std::min(kVnniRows, N - n0);
      decode(n0, n0 + nr, rows.data(), K, sums.data());
      vnni_pack(reinterpret_cast<const uint32_t*>(rows.data()), K / per_word, nr, K / per_word, kVnniRows,
                reinterpret_cast<uint32_t*>(b.data()));
      for (int64_t m0 = 0; m0 < M; m0 += kVnniTokens) {
        const int64_t mb = std::min(kVnniTokens, M - m0);
        for (int64_t k0 = 0; k0 < K; k0 += kGemmKBlock) {
          const int64_t kb = std::min(kGemmKBlock, K - k0);
          // B's block at k0 starts at word k0 / per_word, each word row kVnniRows words: k0 * kVnniRows elements.
          cpublas::brgemm(mb, kVnniRows, kb, /*ld_a=*/K, /*ld_b=*/kVnniRows, /*ld_c=*/kVnniRows, /*add_C=*/k0 > 0,
                          a + m0 * K + k0, b.data() + k0 * kVnniRows, c.data(), /*is_vnni=*/true);
        }
        finish(n0, nr, m0, mb, c.data(), kVnniRows, sums.data());
      }
    }
    cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

}  // namespace

bool ternary_gemm_fp32_available() {
  return BITCPM_X86 != 0;  // oneDNN's ukernels are x86 (ATen has other fallbacks elsewhere)
}

void ternary_gemm_fp32(int64_t M, int64_t N, int64_t K, const float* x, const StoreBlock& store,
                       const DecodeRowsFp32& decode) {
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
    float ct[kGemmMaxTokens * kGemmRows];  // c transposed: tokens x rows, as store takes it
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
        for (int64_t m = 0; m < real; ++m)
          for (int64_t i = 0; i < nr; ++i) ct[m * kGemmRows + i] = c[i * mt + m];
        store(m0, real, n0, nr, ct, kGemmRows);
      }
    }
    cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

void ternary_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* x, const StoreBlock& store,
                       const DecodeRowsBf16& decode) {
  TORCH_CHECK(K % 32 == 0, "ternary_gemm_bf16: K must be a multiple of 32 (VNNI pairs, 16-word transposes), got ",
              K);
  vnni_gemm<c10::BFloat16, c10::BFloat16, float>(
      M, N, K, reinterpret_cast<const c10::BFloat16*>(x),
      [&](int64_t n0, int64_t n1, c10::BFloat16* out, int64_t ld, int32_t*) {
        decode(n0, n1, reinterpret_cast<uint16_t*>(out), ld);
      },
      [&](int64_t n0, int64_t nr, int64_t m0, int64_t mb, const float* c, int64_t ld_c, const int32_t*) {
        store(m0, mb, n0, nr, c, ld_c);
      });
}

void ternary_gemm_int8(int64_t M, int64_t N, int64_t K, const uint8_t* xu, const DecodeRowsS8& decode,
                       const FinishInt8& finish) {
  TORCH_CHECK(K % 64 == 0, "ternary_gemm_int8: K must be a multiple of 64 (VNNI quads, 16-word transposes), got ", K);
  vnni_gemm<uint8_t, int8_t, int32_t>(M, N, K, xu, decode, finish);
}

}  // namespace bitcpm_cpu
