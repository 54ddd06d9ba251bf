// What a row kernel of bitcpm::ternary_linear gets (Ctx) and the helpers every path shares
// (row_kernels.h lists the kernels: rows_scalar.cpp, rows_avx2.cpp, rows_avx512.cpp,
// rows_avx512bf16.cpp, rows_neon.cpp).
//
// Packed layout version 1 (vllm_bitcpm/ternary.py): each row of `codes` is a run of 128-weight
// blocks of 32 bytes; byte j of a block holds elements j, j+32, j+64, j+96 at bits 0, 2, 4, 6 as
// the code t+1 in {0,1,2}.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace bitcpm_cpu {

constexpr int64_t kBlockWeights = 128;
constexpr int64_t kBlockBytes = 32;

// Everything a row kernel needs; pointers are to contiguous buffers.
struct Ctx {
  int64_t M, K, N, G, gs, nblk, Kp, row_bytes;
  int gs_shift;           // log2(gs) when gs is a power of two, else -1
  const uint8_t* codes;   // (N, row_bytes)
  const void* scales;     // (N, G) in scale_dtype
  at::ScalarType scale_dtype;
  float* y;               // (M, N) float32
  // exact mode
  const float* x;         // (M, K) natural order (scalar path)
  const float* xp;        // (M, Kp) zero padded: x86 paths permuted, NEON paths natural order
  // exact mode, bf16 activations (AVX512-BF16 path)
  const uint16_t* xb;     // (M, Kc) bf16 bits, permuted into the bf16 decode order, zero padded
  int64_t Kc;             // nchunk * 256
  // int8 and int16 modes: per-token integers qv, x ~= qv / inv. int8: qv = q. int16: qv = 256 * q
  // + qlo, two int8 planes (high and low bytes, qlo in [-128, 127]), so the x86 kernels multiply
  // both with vpmaddubsw and reuse the int8 mode's decode.
  const int8_t* q;        // (M, Kp) natural order, zero padded
  const int8_t* qlo;      // (M, Kp) int16 mode's low bytes; nullptr in int8 mode
  const int32_t* qsum;    // (M, G) sums of qv
  const int32_t* qlane;   // (M, G, 16): per-lane sums of qv, the lane layout of the x86 SIMD dots
  const float* inv;       // (M)
};

// Activation modes of the op (its `activations` argument: "exact", "int8", "int16").
enum class Activations { kExact, kInt8, kInt16 };

// int16 mode's largest |qv| (vllm_bitcpm.ops.reference.INT16_MAX): 127 * 256 + 127, the biggest
// value whose high byte stays an int8 when lo is in [-128, 127].
constexpr int32_t kInt16Max = 32639;
// int16 mode: int32 sums must stay exact, so K is capped (BitCPM's largest K is 16384); the op
// refuses larger K in this mode. What binds: the per-group sums of qv (qsum) and the scalar
// twin's dot product, both <= kInt16Max * K < 2^31. The SIMD kernels' int32 lanes hold sums of
// codes (0..2) times qv over K/8 elements, and reduce only after the per-lane sums of qv
// (qlane) are subtracted, when every partial sum is a dot over part of K and within the bound.
constexpr int64_t kInt16MaxK = 65536;

// A row kernel: rows [n0, n1) of y for tokens [m0, m0 + its token count); sbuf holds G floats.
using RowFn = void (*)(const Ctx&, int64_t n0, int64_t n1, int64_t m0, float* sbuf);

// Tokens per call of a row kernel at most (the dispatch's token tile; accumulators live in
// registers, one set per token).
constexpr int kMaxTokenTile = 8;

// The row kernel Pick<MB>::fn for mb tokens (1..kMaxTokenTile; larger mb gets the 8-token one).
template <template <int> class Pick>
RowFn pick_tokens(int mb) {
  switch (mb) {
    case 1: return Pick<1>::fn;
    case 2: return Pick<2>::fn;
    case 3: return Pick<3>::fn;
    case 4: return Pick<4>::fn;
    case 5: return Pick<5>::fn;
    case 6: return Pick<6>::fn;
    case 7: return Pick<7>::fn;
    default: return Pick<8>::fn;
  }
}
static_assert(kMaxTokenTile == 8, "pick_tokens covers 1..8 tokens");

inline int64_t group_of(const Ctx& c, int64_t k) {
  if (c.G == 1) return 0;
  const int64_t g = c.gs_shift >= 0 ? (k >> c.gs_shift) : k / c.gs;
  return g < c.G ? g : c.G - 1;  // padding past K (codes 1, x 0) may sit beyond the last group
}

inline void load_row_scales(const Ctx& c, int64_t n, float* out) {
  const int64_t G = c.G;
  switch (c.scale_dtype) {
    case at::kFloat: {
      const float* s = static_cast<const float*>(c.scales) + n * G;
      std::memcpy(out, s, G * sizeof(float));
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* s = static_cast<const c10::BFloat16*>(c.scales) + n * G;
      for (int64_t g = 0; g < G; ++g) out[g] = static_cast<float>(s[g]);
      break;
    }
    case at::kHalf: {
      const c10::Half* s = static_cast<const c10::Half*>(c.scales) + n * G;
      for (int64_t g = 0; g < G; ++g) out[g] = static_cast<float>(s[g]);
      break;
    }
    default:
      TORCH_CHECK(false, "ternary_linear: unsupported scale dtype");
  }
}

// Whole-row scale of row n (G == 1), read in place (no per-row call and buffer round trip).
inline float whole_row_scale(const Ctx& c, int64_t n) {
  switch (c.scale_dtype) {
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(c.scales)[n]);
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(c.scales)[n]);
    default: return static_cast<const float*>(c.scales)[n];
  }
}

}  // namespace bitcpm_cpu
