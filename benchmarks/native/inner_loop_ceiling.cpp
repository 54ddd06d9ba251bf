// What bounds the exact decode loops of kernels/cpu/ (rows_avx2.cpp, rows_avx512bf16.cpp) at M = 1 (AVX2 fp32 and
// AVX512-BF16), and would a lookup-table loop beat them?
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

// ------------------------------------------------------------------------------------------
// AVX2 (fp32 activations: how the kernel runs exact mode on CPUs without AVX512-BF16, bf16
// activations widened exactly). kAvx2Full is the kernel's exact decode loop (exact_rows_avx2_t,
// one token): per 8 weights `vpsrld` + `vpermilps` from {-s, 0, s, 0} (in each 128-bit half) + one FMA
// with x. kAvx2CrossLane is the same loop with the cross-lane `vpermps` on the 8-entry table it used
// before (the same weights; slower on AMD Zen 2/3, whose cross-lane permutes cost more).
// kAvx2FmaOnly drops the decode (the code word, as floats, goes straight into the FMA): the
// ceiling of any loop that spends one FMA per 8 weights. kAvx2LutTriples is the lookup-table
// idea for float activations on AVX2, in bit planes: t = p - n with p, n in {0, 1}; per column
// triple an 8-entry fp32 table of subset sums of (x0, x1, x2), so one `vpermps` looks up one
// plane of 3 columns for 8 rows at once. The repacked layout puts, per group of 8 rows, one
// 32-bit word per row per plane holding ten 3-bit fields (30 columns): per 240 weights 2 code
// loads, 10 table loads, 18 shifts, 20 `vpermps`, 20 add/sub (tables built inside the timing).
enum Avx2Variant { kAvx2Full = 0, kAvx2FmaOnly = 1, kAvx2LutTriples = 2, kAvx2CrossLane = 3 };

template <int V>
__attribute__((target("avx2,fma"))) __attribute__((noinline)) float run_avx2(const uint8_t* codes, const float* x,
                                                                            float* tables, int rows, int K) {
  __m256 total = _mm256_setzero_ps();
  if (V == kAvx2LutTriples) {
    const int nword = K / 30;
    for (int w = 0; w < nword * 10; ++w) {  // table of column triple w: entry i = sum of x[j] for set bits j of i
      const float* xc = x + 3 * w;
      float* t = tables + 8 * w;
      for (int i = 0; i < 8; ++i) t[i] = ((i & 1) ? xc[0] : 0.f) + ((i & 2) ? xc[1] : 0.f) + ((i & 4) ? xc[2] : 0.f);
    }
    for (int rg = 0; rg < rows / 8; ++rg) {
      const uint8_t* grp = codes + static_cast<size_t>(rg) * nword * 64;
      __m256 accp[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, accn[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int w = 0; w < nword; ++w) {
        const __m256i dp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + w * 64));
        const __m256i dn = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + w * 64 + 32));
        const float* tw = tables + w * 80;
#pragma GCC unroll 10
        for (int f = 0; f < 10; ++f) {
          const __m256 t = _mm256_loadu_ps(tw + 8 * f);
          const __m256i ip = f ? _mm256_srli_epi32(dp, 3 * f) : dp, in = f ? _mm256_srli_epi32(dn, 3 * f) : dn;
          accp[f & 1] = _mm256_add_ps(accp[f & 1], _mm256_permutevar8x32_ps(t, ip));
          accn[f & 1] = _mm256_add_ps(accn[f & 1], _mm256_permutevar8x32_ps(t, in));
        }
      }
      total = _mm256_add_ps(total, _mm256_sub_ps(_mm256_add_ps(accp[0], accp[1]), _mm256_add_ps(accn[0], accn[1])));
    }
  } else {
    const __m256 lut = _mm256_setr_ps(-1.f, 0.f, 1.f, 0.f, -1.f, 0.f, 1.f, 0.f);
    const int nblk = K / 128;
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = codes + static_cast<size_t>(r) * nblk * 32;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int blk = 0; blk < nblk; ++blk) {
        const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * 32));
        const float* xk = x + blk * 128;
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s)
#pragma GCC unroll 4
          for (int b = 0; b < 4; ++b) {
            const __m256 xv = _mm256_loadu_ps(xk + 32 * s + 8 * b);
            const __m256i idx = (8 * b + 2 * s) ? _mm256_srli_epi32(d, 8 * b + 2 * s) : d;
            const __m256 w = V == kAvx2FmaOnly     ? _mm256_castsi256_ps(d)
                             : V == kAvx2CrossLane ? _mm256_permutevar8x32_ps(lut, idx)
                                                   : _mm256_permutevar_ps(lut, idx);
            acc[s] = _mm256_fmadd_ps(w, xv, acc[s]);
          }
      }
      total = _mm256_add_ps(total, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    }
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, total);
  return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}

// AVX2 integer activations (the int8 and int16 options, int8_rows_avx2_t in rows_avx2.cpp) for T
// tokens: per 32 weights the decode is `vpsrlw` + `vpand` (codes t+1 as unsigned bytes, shared by
// the T tokens), then per token one `vpmaddubsw` with the int8 activations (int16: a second one on
// the low bytes), `vpaddw`, and per 128 weights `vpmaddwd` into int32 (int16: two) + `vpaddd`.
// Decode = false feeds the code word itself to `vpmaddubsw` (no shift, no mask): the ceiling of
// any loop that spends these multiply-adds per weight and token. Counted in weight-token products.
template <int T, bool Int16, bool Decode>
__attribute__((target("avx2,fma"))) __attribute__((noinline)) int run_avx2_int(const uint8_t* codes, const int8_t* q,
                                                                              const int8_t* qlo, int rows, int K) {
  const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1), k256 = _mm256_set1_epi16(256);
  const int nblk = K / 128;
  __m256i total = _mm256_setzero_si256();
  for (int r = 0; r < rows; ++r) {
    const uint8_t* row = codes + static_cast<size_t>(r) * nblk * 32;
    __m256i acc[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    for (int blk = 0; blk < nblk; ++blk) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * 32));
      __m256i c[4];
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) c[s] = Decode ? _mm256_and_si256(s ? _mm256_srli_epi16(d, 2 * s) : d, m3) : d;
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m256i* qt = reinterpret_cast<const __m256i*>(q + static_cast<size_t>(t) * K + blk * 128);
        __m256i a = _mm256_maddubs_epi16(c[0], _mm256_loadu_si256(qt));
#pragma GCC unroll 3
        for (int s = 1; s < 4; ++s) a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c[s], _mm256_loadu_si256(qt + s)));
        if (Int16) {
          const __m256i* lt = reinterpret_cast<const __m256i*>(qlo + static_cast<size_t>(t) * K + blk * 128);
          __m256i b = _mm256_maddubs_epi16(c[0], _mm256_loadu_si256(lt));
#pragma GCC unroll 3
          for (int s = 1; s < 4; ++s) b = _mm256_add_epi16(b, _mm256_maddubs_epi16(c[s], _mm256_loadu_si256(lt + s)));
          acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(a, k256), _mm256_madd_epi16(b, ones)));
        } else {
          acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(a, ones));
        }
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) total = _mm256_add_epi32(total, acc[t]);
  }
  alignas(32) uint32_t out[8];  // a checksum: wrapping is fine
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), total);
  return static_cast<int>(out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7]);
}

template <typename Fn>
double best_seconds(Fn&& fn) {
  double best = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 200; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    sink = sink + fn();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

int main(int argc, char** argv) {
  const int K = argc > 1 ? std::atoi(argv[1]) : 1024;
  const int rows = argc > 2 ? std::atoi(argv[2]) : 1024;  // 1024 x 1024 weights: 256 KiB of codes
  const int nchunk = K / 256;
  std::vector<uint8_t> codes(static_cast<size_t>(rows) * nchunk * 64);
  for (auto& c : codes) c = static_cast<uint8_t>(std::rand());
  std::vector<uint16_t> x(K, 0x3F80);
  std::vector<float> xf(K, 1.0f), tables(static_cast<size_t>(K) * 16);
  const char* sep = "";
  auto emit = [&](const char* isa, const char* name, double seconds, double weights) {
    std::printf("%s{\"isa\": \"%s\", \"variant\": \"%s\", \"seconds\": %.9g, \"gweights_per_s\": %.4g}", sep, isa,
                name, seconds, weights / seconds / 1e9);
    sep = ", ";
  };
  std::printf("[");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    const int k30 = K / 30 * 30;
    emit("avx2", "fp32: shift + vpermilps + FMA per 8 weights (the kernel's loop)",
         best_seconds([&] { return run_avx2<kAvx2Full>(codes.data(), xf.data(), tables.data(), rows, K); }),
         double(rows) * K);
    emit("avx2", "fp32: shift + vpermps (cross-lane) + FMA per 8 weights (the kernel's loop before)",
         best_seconds([&] { return run_avx2<kAvx2CrossLane>(codes.data(), xf.data(), tables.data(), rows, K); }),
         double(rows) * K);
    emit("avx2", "fp32: FMA only (no decode)",
         best_seconds([&] { return run_avx2<kAvx2FmaOnly>(codes.data(), xf.data(), tables.data(), rows, K); }),
         double(rows) * K);
    emit("avx2", "fp32 lookup table, column triples in bit planes (vpermps + vaddps, 8 rows)",
         best_seconds([&] { return run_avx2<kAvx2LutTriples>(codes.data(), xf.data(), tables.data(), rows, k30); }),
         double(rows) * k30);
    // Integer activations: small values keep every int16 pair sum in range whatever the codes.
    std::vector<int8_t> q(static_cast<size_t>(K) * 8), qlo(static_cast<size_t>(K) * 8);
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(std::rand() % 16 - 8), qlo[i] = q[i];
    auto run_int = [&](auto fn, int tokens, const char* name) {
      emit("avx2", name, best_seconds([&] { return float(fn(codes.data(), q.data(), qlo.data(), rows, K)); }),
           double(rows) * K * tokens);
    };
    run_int(run_avx2_int<1, false, true>, 1, "int8, 1 token: vpsrlw + vpand + vpmaddubsw per 32 (the kernel's loop)");
    run_int(run_avx2_int<1, false, false>, 1, "int8, 1 token: vpmaddubsw only (no decode)");
    run_int(run_avx2_int<8, false, true>, 8, "int8, 8 tokens: one decode, 8 x vpmaddubsw per 32 (the kernel's loop)");
    run_int(run_avx2_int<8, false, false>, 8, "int8, 8 tokens: vpmaddubsw only (no decode)");
    run_int(run_avx2_int<1, true, true>, 1, "int16, 1 token: two vpmaddubsw per 32 (the kernel's loop)");
    run_int(run_avx2_int<1, true, false>, 1, "int16, 1 token: vpmaddubsw only (no decode)");
    run_int(run_avx2_int<8, true, true>, 8, "int16, 8 tokens: one decode, 16 x vpmaddubsw per 32 (the kernel's loop)");
    run_int(run_avx2_int<8, true, false>, 8, "int16, 8 tokens: vpmaddubsw only (no decode)");
  }
  if (__builtin_cpu_supports("avx512bf16")) {
    const char* names[] = {"full (shift + permute + vdpbf16ps)", "dot products only", "decode only",
                           "full, two tables (half the shifts)", "lookup table, column pairs (vpermps + vaddps)",
                           "lookup table, column triples (vpermt2ps + vaddps)"};
    float (*fns[])(const uint8_t*, const uint16_t*, int, int) = {run<kFull>, run<kDotOnly>, run<kDecodeOnly>,
                                                                 run<kTwoTables>};
    for (int v = 0; v < 6; ++v) {
      const int kv = v == kLutTriples ? K / 18 * 18 : K;
      const double t = best_seconds([&] {
        if (v < 4) return fns[v](codes.data(), x.data(), rows, nchunk);
        if (v == kLutPairs) return run_lut<kLutPairs>(codes.data(), xf.data(), tables.data(), rows, K);
        return run_lut<kLutTriples>(codes.data(), xf.data(), tables.data(), rows, kv);
      });
      emit("avx512bf16", names[v], t, double(rows) * kv);
    }
  }
  std::printf("]\n");
  return 0;
}
