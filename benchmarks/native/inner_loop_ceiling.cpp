// What bounds the exact AVX512-BF16 decode loop of kernels/cpu/ternary_linear.cpp at M = 1?
//
// Runs the kernel's inner loop (per 32 weights: `vpsrlw`, `vpermw`, an activation load,
// `vdpbf16ps`) on codes and activations that stay in L2, and two variants that drop one part:
// "dot products only" feeds the code words straight to `vdpbf16ps` (no decode), "decode only"
// keeps the shift + permute and replaces the dot product by an XOR. If "full" runs as fast as
// "dot products only", the decode is free and `vdpbf16ps` throughput is the ceiling.
// Built and run by benchmarks/inner_loop_ceiling.py (plain g++, no torch).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

enum Variant { kFull = 0, kDotOnly = 1, kDecodeOnly = 2, kTwoTables = 3, kLutPairs = 4, kLutTriples = 5 };

template <int V>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) __attribute__((noinline)) float run(
    const uint8_t* codes, const uint16_t* x, int rows, int nchunk) {
  const __m512i table = _mm512_set1_epi64(0x00003F800000BF80LL);
  // kTwoTables: a second table whose entries repeat 4 times decodes bits 3:2 of the same index,
  // so one shift serves two steps (4 shifts per 8 steps instead of 7).
  const __m512i table_hi = _mm512_set_epi64(0, 0x3F803F803F803F80LL, 0, static_cast<long long>(0xBF80BF80BF80BF80ULL), 0,
                                            0x3F803F803F803F80LL, 0, static_cast<long long>(0xBF80BF80BF80BF80ULL));
  __m512 total = _mm512_setzero_ps();
  __m512i bits = _mm512_setzero_si512();
  for (int r = 0; r < rows; ++r) {
    const uint8_t* row = codes + static_cast<size_t>(r) * nchunk * 64;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int ch = 0; ch < nchunk; ++ch) {
      const __m512i d = _mm512_loadu_si512(row + ch * 64);
      const uint16_t* xk = x + ch * 256;
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512i xv = _mm512_loadu_si512(xk + 32 * t);
        if (V == kDotOnly) {
          acc[t % 4] = _mm512_dpbf16_ps(acc[t % 4], (__m512bh)d, (__m512bh)xv);
        } else if (V == kTwoTables) {
          const __m512i idx = (t / 2) ? _mm512_srli_epi16(d, 4 * (t / 2)) : d;
          const __m512i w = _mm512_permutexvar_epi16(idx, (t & 1) ? table_hi : table);
          acc[t % 4] = _mm512_dpbf16_ps(acc[t % 4], (__m512bh)w, (__m512bh)xv);
        } else {
          const __m512i w = _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 2 * t), table);
          if (V == kFull) acc[t % 4] = _mm512_dpbf16_ps(acc[t % 4], (__m512bh)w, (__m512bh)xv);
          else bits = _mm512_xor_si512(bits, _mm512_xor_si512(w, xv));
        }
      }
    }
    total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
  return _mm512_reduce_add_ps(total) + static_cast<float>(_mm512_reduce_add_epi32(bits));
}

// Lookup-table loops (bitnet.cpp's TL idea, for float activations): the codes are repacked so a
// 64-byte load holds one 32-bit word per row for 16 rows. kLutPairs: a word holds 16 columns'
// 2-bit codes; a 4-bit field (two columns) indexes a 16-entry fp32 table of t0*x0 + t1*x1,
// built once per call for each column pair, and `vpermps` looks it up for the 16 rows at once,
// `vaddps` accumulates: 32 weights per shift + permute + add. kLutTriples: a word holds six
// 5-bit base-3 fields (18 columns), a 32-entry table per column triple (27 used), `vpermt2ps`:
// 48 weights per shift + permute + add. The table build is inside the timing.
template <int V>
__attribute__((target("avx512f,avx512bw,avx512vl"))) __attribute__((noinline)) float run_lut(
    const uint8_t* codes, const float* x, float* tables, int rows, int K) {
  constexpr int kCols = V == kLutPairs ? 16 : 18;      // columns per 32-bit word
  constexpr int kFields = V == kLutPairs ? 8 : 6;      // table lookups per word
  constexpr int kTableFloats = V == kLutPairs ? 16 : 32;
  const int nword = K / kCols;
  // Build the tables: entry i of field f = sum over its columns j of digit_j(i) * x[col j].
  for (int w = 0; w < nword * kFields; ++w) {
    const float* xc = x + w * (kCols / kFields);
    float* t = tables + w * kTableFloats;
    for (int i = 0; i < kTableFloats; ++i) {
      if (V == kLutPairs) t[i] = float((i & 3) - 1) * xc[0] + float(((i >> 2) & 3) - 1) * xc[1];
      else t[i] = float(i % 3 - 1) * xc[0] + float(i / 3 % 3 - 1) * xc[1] + float(i / 9 % 3 - 1) * xc[2];
    }
  }
  __m512 total = _mm512_setzero_ps();
  for (int rg = 0; rg < rows / 16; ++rg) {
    const uint8_t* grp = codes + static_cast<size_t>(rg) * nword * 64;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int w = 0; w < nword; ++w) {
      const __m512i d = _mm512_loadu_si512(grp + w * 64);
      const float* tw = tables + w * kFields * kTableFloats;
#pragma GCC unroll 8
      for (int f = 0; f < kFields; ++f) {
        if (V == kLutPairs) {
          const __m512i idx = f ? _mm512_srli_epi32(d, 4 * f) : d;
          acc[f % 4] = _mm512_add_ps(acc[f % 4], _mm512_permutexvar_ps(idx, _mm512_loadu_ps(tw + 16 * f)));
        } else {
          const __m512i idx = f ? _mm512_srli_epi32(d, 5 * f) : d;
          const __m512 v = _mm512_permutex2var_ps(_mm512_loadu_ps(tw + 32 * f), idx, _mm512_loadu_ps(tw + 32 * f + 16));
          acc[f % 4] = _mm512_add_ps(acc[f % 4], v);
        }
      }
    }
    total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
  return _mm512_reduce_add_ps(total);
}

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("{\"error\": \"this CPU has no AVX512-BF16\"}\n");
    return 0;
  }
  const int K = argc > 1 ? std::atoi(argv[1]) : 1024;
  const int rows = argc > 2 ? std::atoi(argv[2]) : 1024;  // 1024 x 1024 weights: 256 KiB of codes
  const int nchunk = K / 256;
  std::vector<uint8_t> codes(static_cast<size_t>(rows) * nchunk * 64);
  for (auto& c : codes) c = static_cast<uint8_t>(std::rand());
  std::vector<uint16_t> x(K, 0x3F80);
  std::vector<float> xf(K, 1.0f), tables(static_cast<size_t>(K) * 16);
  const char* names[] = {"full (shift + permute + vdpbf16ps)", "dot products only", "decode only",
                         "full, two tables (half the shifts)", "lookup table, column pairs (vpermps + vaddps)",
                         "lookup table, column triples (vpermt2ps + vaddps)"};
  float (*fns[])(const uint8_t*, const uint16_t*, int, int) = {run<kFull>, run<kDotOnly>, run<kDecodeOnly>,
                                                               run<kTwoTables>};
  std::printf("[");
  for (int v = 0; v < 6; ++v) {
    double best = 1e30;
    volatile float sink = 0;
    for (int rep = 0; rep < 200; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      if (v < 4) sink = sink + fns[v](codes.data(), x.data(), rows, nchunk);
      else if (v == kLutPairs) sink = sink + run_lut<kLutPairs>(codes.data(), xf.data(), tables.data(), rows, K);
      else sink = sink + run_lut<kLutTriples>(codes.data(), xf.data(), tables.data(), rows, K / 18 * 18);
      const auto t1 = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    }
    const double weights = static_cast<double>(rows) * (v == kLutTriples ? K / 18 * 18 : K);
    std::printf("%s{\"variant\": \"%s\", \"seconds\": %.9g, \"gweights_per_s\": %.4g}", v ? ", " : "", names[v], best,
                weights / best / 1e9);
  }
  std::printf("]\n");
  return 0;
}
