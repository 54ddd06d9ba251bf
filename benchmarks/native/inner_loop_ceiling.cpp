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

enum Variant { kFull = 0, kDotOnly = 1, kDecodeOnly = 2, kTwoTables = 3 };

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
  const char* names[] = {"full (shift + permute + vdpbf16ps)", "dot products only", "decode only",
                         "full, two tables (half the shifts)"};
  float (*fns[])(const uint8_t*, const uint16_t*, int, int) = {run<kFull>, run<kDotOnly>, run<kDecodeOnly>,
                                                               run<kTwoTables>};
  std::printf("[");
  for (int v = 0; v < 4; ++v) {
    double best = 1e30;
    volatile float sink = 0;
    for (int rep = 0; rep < 200; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      sink = sink + fns[v](codes.data(), x.data(), rows, nchunk);
      const auto t1 = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    }
    const double weights = static_cast<double>(rows) * K;
    std::printf("%s{\"variant\": \"%s\", \"seconds\": %.9g, \"gweights_per_s\": %.4g}", v ? ", " : "", names[v], best,
                weights / best / 1e9);
  }
  std::printf("]\n");
  return 0;
}
