// bitcpm::ternary_linear on CPUs: operand checks, which path runs for which call, and the op's
// registration (packed layout version 1, see vllm_bitcpm/ternary.py).
//
// Layout recap: each row of `codes` is a run of 128-weight blocks of 32 bytes; byte j of a block
// holds elements j, j+32, j+64, j+96 at bits 0, 2, 4, 6 as the code t+1 in {0,1,2}.
//
// The kernel files, one job each (kernels/README.md has the instruction counts and figures):
//   isa_paths.{h,cpp}      which path this CPU runs (run-time CPU checks, VLLM_BITCPM_ISA's cap)
//   cpu_features.h         the CPU checks themselves; x86 SIMD code sits behind BITCPM_X86
//   ternary_linear_rows.h  what a row kernel gets (Ctx), scale loading, pick_tokens
//   row_kernels.h          every path's row kernels (decode loops), with
//     rows_scalar.cpp      the scalar twin every SIMD path is tested against
//     rows_avx2.cpp        fp32: `vpsrld` + `vpermilps` decode, one FMA per token; int8: `vpmaddubsw`
//     rows_avx512.cpp      the same on 16 lanes; int8 with VNNI `vpdpbusd`
//     rows_avx512bf16.cpp  bf16 x: `vpermw` decode, `vdpbf16ps`
//     rows_neon.cpp        aarch64: `tbl` decode, `fmla`; int8 `sdot` / `smull`
//   int8_quantize.{h,cpp}  per-token int8 / int16 activations, scalar twin and AVX2
//   ternary_gemm.{h,cpp}   exact mode for several tokens: tiles decoded once, PyTorch's brgemm
//   lm_head_gemv.cpp       the lm_head's decode kernels (bf16 and int8 head), a separate op
//
// Which path runs (ternary_linear_impl below):
//   exact mode, decode (M < kFusedGemmMinM; bf16 path: M < kGemmMinM): the row kernels, several
//     tokens per pass over a row's codes.
//   exact mode, several tokens (M >= kFusedGemmMinM), fp32 compute (AVX2, AVX512, and fp32
//     activations anywhere): the ternary GEMM; the scalar path keeps tiles of rows dequantized
//     for at::mm.
//   exact mode, bf16 activations on AVX512-BF16 CPUs: the bf16 row kernels below kBf16GemmMinM
//     tokens, then the bf16 ternary GEMM (rows decoded to bf16 in the VNNI layout, brgemm).
//   int8 mode: x quantized once per call (int8_quantize.cpp), then the int8 row kernels; on
//     AVX512-VNNI CPUs with whole-row scales, from kGemmMinM tokens the int8 ternary GEMM.
//   int16 mode: x quantized to int16 split in two int8 planes, then the x86 int8 row kernels'
//     int16 twin (AVX2, also on AVX512 CPUs); the scalar twin elsewhere (NEON has no int16 kernel).
//   aarch64: the NEON row kernels; prefill (M >= kGemmMinM) by fp32 tiles for at::mm.
//
// Everything is compiled for the baseline ISA (no -mavx2): SIMD code lives in functions marked
// __attribute__((target(...))) that run only after a run-time CPU check, so one binary runs on
// every CPU of its architecture.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Python.h>

#include "cpu_features.h"
#include "int8_quantize.h"
#include "isa_paths.h"
#include "row_kernels.h"  // Ctx, RowFn, every path's row kernels
#include "ternary_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <string>
#include <vector>

namespace bitcpm_cpu {
namespace {

constexpr int64_t kGemmMinM = 32;     // exact mode: at or above this many tokens use dequant + GEMM
// bf16 activations on AVX512-BF16 with whole-row or >= 128-wide groups: the vdpbf16ps decode loops
// up to this many tokens, the bf16 ternary GEMM above. The loops took 0.88-1.04x stock bf16's time
// at 16..48 tokens against the GEMM's 1.08-1.18x; from 64 tokens both ran at 1.09-1.12x (one
// thread; two threads: the same crossover; AVX512-BF16 Zen 4, the four 0.5B layers summed).
constexpr int64_t kBf16GemmMinM = 64;
// exact mode, fp32 compute: at or above this many tokens the ternary GEMM (ternary_gemm.cpp) runs
// instead of the per-row decode loops (benchmarks/prefill_gemm.py sweeps M).
constexpr int64_t kFusedGemmMinM = 8;
// Tokens past the last multiple of 8 that go to the decode loops instead of a zero-padded GEMM tile:
// at 9..11 and 17..18 tokens the op took 0.82-1.04x stock fp32's time this way against 0.93-1.13x
// padded, and 4 tokens past were level (AVX2 Zen 3, benchmarks/prefill_gemm.py, two runs each).
constexpr int64_t kGemmTailTokens = 3;
constexpr int64_t kRowTile = 16;      // rows per inner tile (codes of a tile stay in L1/L2)
// Calls below this many multiply-adds stay on the calling thread. Every BitCPM4-0.5B layer is
// above it (qkv 1.3M and o 1M used to stay on one thread at 2M; splitting them too cut the
// profiled ternary time of a 2-thread decode step, benchmarks/profile_decode.py --threads 2).
constexpr int64_t kMinParallelMacs = int64_t(1) << 18;

// ------------------------------------------------------------------------------------------
// Drivers

// Token tile per ISA / mode (accumulator registers: 16 ymm on AVX2, 32 zmm on AVX512).
int token_tile(Isa isa, bool integer_mode) {
  return isa >= Isa::kAvx512 || !integer_mode ? kMaxTokenTile : 4;
}

Activations parse_activations(c10::string_view name) {
  if (name == "exact") return Activations::kExact;
  if (name == "int8") return Activations::kInt8;
  if (name == "int16") return Activations::kInt16;
  TORCH_CHECK_VALUE(false, "ternary_linear: activations must be one of exact, int8, int16, got '", std::string(name), "'");
  return Activations::kExact;  // not reached
}

// The integer modes' activations for every token: q (and qlo in int16 mode), per-group sums,
// inv, and where the row kernel reads them (lane_sums) the per-lane sums. Owns the buffers c
// points into.
struct QuantizedActivations {
  at::Tensor q, qlo, qsum, inv, qlane;
  QuantizedActivations(Ctx& c, const at::Tensor& x, Activations act, bool simd, bool lane_sums) {
    q = at::empty({c.M, c.Kp}, x.options().dtype(at::kChar));
    if (act == Activations::kInt16) qlo = at::empty({c.M, c.Kp}, x.options().dtype(at::kChar));
    qsum = at::empty({c.M, c.G}, x.options().dtype(at::kInt));
    inv = at::empty({c.M}, x.options().dtype(at::kFloat));
    c.q = q.data_ptr<int8_t>();
    c.qlo = qlo.defined() ? qlo.data_ptr<int8_t>() : nullptr;
    c.qsum = qsum.data_ptr<int32_t>();
    c.inv = inv.data_ptr<float>();
    if (simd && lane_sums) {
      qlane = at::empty({c.M, c.G, 16}, x.options().dtype(at::kInt));
      c.qlane = qlane.data_ptr<int32_t>();
    }
    at::parallel_for(0, c.M, 16, [&](int64_t a, int64_t b) {
      for (int64_t m = a; m < b; ++m) {
        int8_t* qr = q.data_ptr<int8_t>() + m * c.Kp;
        int8_t* lr = c.qlo ? const_cast<int8_t*>(c.qlo) + m * c.Kp : nullptr;
        int32_t* qs = qsum.data_ptr<int32_t>() + m * c.G;
        float* iv = inv.data_ptr<float>() + m;
        if (simd) quantize_row_avx2(c, c.x + m * c.K, qr, lr, qs, iv);
        else quantize_row_scalar(c, c.x + m * c.K, qr, lr, qs, iv);
        if (c.qlane) lane_qsums_avx2(c, qr, lr, const_cast<int32_t*>(c.qlane) + m * c.G * 16);
      }
    });
  }
};

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

// The aarch64 paths (row kernels in rows_neon.cpp): x and q in natural order, zero
// padded to whole blocks. int8: the scalar twin's quantization (the reference's rounding; one
// pass over x, small beside the rows). Exact mode, prefill (M >= kGemmMinM): fp32 tiles of rows
// dequantized for at::mm, as the scalar path does (PyTorch's brgemm ukernel, which the x86
// paths use from kFusedGemmMinM tokens, is x86 only); below it the NEON decode loops.
void run_neon(Ctx& c, const at::Tensor& x, at::Tensor& y32, Activations act, Isa isa) {
  if (act == Activations::kExact) {
    const at::Tensor xp = at::constant_pad_nd(x, {0, c.Kp - c.K}).contiguous();
    c.xp = xp.data_ptr<float>();
    if (c.M < kGemmMinM) {
      run_rows(c, kMaxTokenTile, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
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
  const QuantizedActivations qa(c, x, act, /*simd=*/false, /*lane_sums=*/false);
  if (act == Activations::kInt16) {  // no NEON int16 kernel: the scalar twin (the plugin does not pick it)
    run_rows(c, 1, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
      int8_rows_scalar(c, a, b, m0, m0 + mb, s);
    });
    return;
  }
  const bool dotprod = isa == Isa::kNeonDotprod;
  run_rows(c, kMaxTokenTile, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
    neon_int8_rows(static_cast<int>(mb), dotprod)(c, a, b, m0, s);
  });
}

at::Tensor ternary_linear_impl(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                               int64_t group_size, const c10::optional<at::Tensor>& bias, Activations act,
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
  TORCH_CHECK_VALUE(act != Activations::kInt16 || K <= kInt16MaxK, "ternary_linear: int16 activations take K <= ",
                    kInt16MaxK, " (exact int32 sums), got K=", K);
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
  at::Tensor y_direct;  // set by the GEMM paths that write 16-bit results directly (store_block)
  if (Mrows > 0 && N > 0) {
    if (K == 0) {
      y32.zero_();
    } else {
      // bf16 activations, exact mode, AVX512-BF16: decode sizes with whole-row or >= 128-wide
      // groups run the vdpbf16ps kernel below kBf16GemmMinM tokens; otherwise from kGemmMinM
      // tokens with bf16 scales, the bf16 GEMM.
      // Both read x as it is (no float copy).
      const bool bf16_isa = isa == Isa::kAvx512Bf16 && act == Activations::kExact && xt == at::kBFloat16 && gs_ok;
      const bool bf16_decode = bf16_isa && Mrows < kBf16GemmMinM && (G == 1 || group_size >= kBlockWeights);
      const bool bf16_prefill = bf16_isa && !bf16_decode && Mrows >= kGemmMinM && st == at::kBFloat16;
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
      // The GEMM paths hand their result over block by block (store_block): with 16-bit
      // activations it is rounded once straight into the output (bias added in fp32 first, as
      // y32 + bias then .to(dtype) does), so a large y is never written in fp32 and read back
      // (at 2048 tokens, two threads, AVX512-BF16: exact 1.24x -> 1.08x stock's time, int8 0.87x ->
      // 0.74x; benchmarks/prefill_gemm.py --tokens 2048 --threads 2).
      const at::Tensor bias32 = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
      const float* bias_f = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
      auto store_block = [&](int64_t m0, int64_t mb, int64_t n0, int64_t nr, const float* cc, int64_t ld_c) {
        if (!y_direct.defined()) {  // fp32 output: into y32 (a bias is added at the end, as elsewhere)
          for (int64_t m = 0; m < mb; ++m) std::memcpy(c.y + (m0 + m) * N + n0, cc + m * ld_c, nr * sizeof(float));
          return;
        }
        auto write = [&](auto* out) {
          using T = std::remove_pointer_t<decltype(out)>;
          for (int64_t m = 0; m < mb; ++m) {
            T* o = out + (m0 + m) * N + n0;
            const float* src = cc + m * ld_c;
            for (int64_t i = 0; i < nr; ++i) o[i] = T(bias_f ? src[i] + bias_f[n0 + i] : src[i]);
          }
        };
        if (xt == at::kBFloat16) write(y_direct.data_ptr<c10::BFloat16>());
        else write(y_direct.data_ptr<c10::Half>());
      };
      if (!bf16_path) c.x = x.data_ptr<float>();

      if (is_neon(isa)) {
        run_neon(c, x, y32, act, isa);
      } else if (bf16_path) {
        c.Kc = (nblk + 1) / 2 * kChunkWeights;
        at::Tensor xb = at::empty({Mrows, c.Kc}, x.options());
        c.xb = reinterpret_cast<const uint16_t*>(xb.data_ptr());
        permute_x_bf16(c, reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(xb.data_ptr()));
        if (bf16_prefill) {
          y_direct = at::empty({Mrows, N}, x_in.options());
          // Several tokens: the bf16 ternary GEMM (ternary_gemm.cpp): 32-row tiles decoded once to
          // bf16 (t * s exact with bf16 scales), in the VNNI layout, reused for every 32 tokens.
          ternary_gemm_bf16(Mrows, N, c.Kc, c.xb, store_block, [&](int64_t a, int64_t b, uint16_t* out, int64_t ld) {
            dequant_rows_bf16(c, a, b, out, ld);
          });
        } else {
          run_rows(c, token_tile(isa, false), [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            bf16_exact_rows(static_cast<int>(mb), G == 1)(c, a, b, m0, s);
          });
        }
      } else if (act == Activations::kExact) {
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
            const int tokens = static_cast<int>(mb);
            RowFn fn = isa >= Isa::kAvx512 ? avx512_exact_rows(tokens, G == 1) : avx2_exact_rows(tokens, G == 1);
            fn(cc, a, b, m0, s);
          });
        };
        if (isa != Isa::kScalar && Mrows >= kFusedGemmMinM && ternary_gemm_fp32_available()) {
          // Several tokens: the ternary GEMM (ternary_gemm.cpp) decodes each 16-row tile once into
          // L1/L2 and runs brgemm on it for every tile of tokens. Products x * (t*s) are exact in
          // fp32 as in the dense layer, so only the summation order differs. The GEMM pads its
          // token tiles to multiples of 8; up to 3 tokens past one (a decode batch of 10) cost less
          // in the decode loops than padded to 8 more (kGemmTailTokens).
          // 16-bit activations: the blocks are rounded once into the output (store_block).
          const int64_t tail = Mrows % 8 <= kGemmTailTokens ? Mrows % 8 : 0;
          const int64_t gemm_m = Mrows - tail;
          if (xt != at::kFloat) y_direct = at::empty({Mrows, N}, x_in.options());
          ternary_gemm_fp32(gemm_m, N, c.Kp, c.xp, store_block, [&](int64_t a, int64_t b, float* out, int64_t ld) {
            std::vector<float> sbuf(G);
            dequant_rows_avx2(c, a, b, out, ld, sbuf.data());  // store bound: AVX512 CPUs use it too
          });
          if (tail > 0) {
            Ctx rest = c;  // the last `tail` tokens: row kernels index x and y from these pointers
            rest.M = tail;
            rest.xp = c.xp + gemm_m * c.Kp;
            rest.y = c.y + gemm_m * N;
            decode_loops(rest);
            if (y_direct.defined()) store_block(gemm_m, tail, 0, N, rest.y, N);  // fp32 rows of y32 -> output
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
              else dequant_rows_avx2(c, a, b, dst, ld, sbuf.data());  // AVX512 CPUs too: store bound
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
        // AVX512 int8 needs VNNI (vpdpbusd) and whole 64-element halves per group; otherwise
        // the AVX2 routine runs (it handles group_size 32). int16: the AVX2 routine on every x86
        // SIMD path (an AVX512 twin is not written yet).
        const bool use512 = act == Activations::kInt8 && isa >= Isa::kAvx512 && cpu_has_vnni() &&
                            (G == 1 || group_size >= 64);
        // Per-lane sums: every AVX2 integer kernel reads them, the AVX512 one only with groups
        // (with whole-row scales it subtracts the per-row sum c.qsum).
        // From kGemmMinM tokens with whole-row scales (BitCPM4), the int8 ternary GEMM (u8 x s8
        // brgemm, ternary_gemm.cpp): 0.91x the row kernels' time at 32 tokens, 0.70x at 512
        // (AVX512-BF16 Zen 4, one thread, the four 0.5B layers); below 32 the row kernels were as
        // fast or faster (1.04-1.11x at 16-24 tokens).
        const bool int8_gemm = use512 && G == 1 && Mrows >= kGemmMinM && ternary_gemm_fp32_available();
        const QuantizedActivations qa(c, x, act, /*simd=*/isa != Isa::kScalar,
                                      /*lane_sums=*/!int8_gemm && (!use512 || G > 1));
        if (int8_gemm) {
          if (xt != at::kFloat) y_direct = at::empty({Mrows, N}, x_in.options());
          // q + 128 as u8 (the sign bit flipped): brgemm's A.
          at::Tensor xu = at::empty({Mrows, c.Kp}, x.options().dtype(at::kByte));
          const int8_t* q = c.q;
          uint8_t* u = xu.data_ptr<uint8_t>();
          at::parallel_for(0, Mrows * c.Kp, 1 << 16, [&](int64_t a, int64_t b) {
            for (int64_t i = a; i < b; ++i) u[i] = static_cast<uint8_t>(q[i]) ^ 0x80u;
          });
          ternary_gemm_int8(
              Mrows, N, c.Kp, u,
              [&](int64_t a, int64_t b, int8_t* out, int64_t ld, int32_t* sums) { decode_rows_s8(c, a, b, out, ld, sums); },
              [&](int64_t n0, int64_t nr, int64_t m0, int64_t mb, const int32_t* cc, int64_t ld_c, const int32_t* sums) {
                float s[64], out[64 * 64];
                int32_t offset[64];
                for (int64_t i = 0; i < nr; ++i) {
                  load_row_scales(c, n0 + i, s + i);
                  offset[i] = 128 * sums[i];
                }
                // Token by token, rows contiguous (vectorizes). The scalar twin's arithmetic
                // (acc starts at 0, one group, then / inv): the same bits.
                for (int64_t m = 0; m < mb; ++m) {
                  const int32_t* cr = cc + m * ld_c;
                  const float inv = c.inv[m0 + m];
                  for (int64_t i = 0; i < nr; ++i) out[m * nr + i] = (0.f + s[i] * static_cast<float>(cr[i] - offset[i])) / inv;
                }
                store_block(m0, mb, n0, nr, out, nr);
              });
        } else if (isa == Isa::kScalar) {
          run_rows(c, 1, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            int8_rows_scalar(c, a, b, m0, m0 + mb, s);
          });
        } else if (act == Activations::kInt16) {
          run_rows(c, token_tile(Isa::kAvx2, true), [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            avx2_int16_rows(static_cast<int>(mb))(c, a, b, m0, s);
          });
        } else {
          const Isa eff = use512 ? Isa::kAvx512 : Isa::kAvx2;
          const int mbt = token_tile(eff, true);
          run_rows(c, mbt, [&](int64_t a, int64_t b, int64_t m0, int64_t mb, float* s) {
            RowFn fn = use512 ? avx512_vnni_int8_rows(static_cast<int>(mb)) : avx2_int8_rows(static_cast<int>(mb));
            fn(c, a, b, m0, s);
          });
        }
      }
    }
  }
  if (y_direct.defined()) return y_direct.reshape(out_shape);  // bias already added
  if (bias.has_value() && bias->defined()) y32.add_(bias->to(at::kFloat));
  at::Tensor y = xt == at::kFloat ? y32 : y32.to(xt);
  return y.reshape(out_shape);
}

at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              int64_t group_size, const c10::optional<at::Tensor>& bias,
                              c10::string_view activations) {
  return ternary_linear_impl(x, codes, scales, group_size, bias, parse_activations(activations), best_isa());
}

at::Tensor ternary_linear_isa(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              int64_t group_size, const c10::optional<at::Tensor>& bias,
                              c10::string_view activations, c10::string_view isa) {
  return ternary_linear_impl(x, codes, scales, group_size, bias, parse_activations(activations),
                             parse_isa(std::string(isa)));
}

std::vector<std::string> isa_available() {
  std::vector<std::string> out;
  for (Isa isa : runnable_isas()) out.push_back(isa_name(isa));
  return out;
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
      "str activations='exact', str isa='auto') -> Tensor");
  m.impl("ternary_linear_isa", c10::DispatchKey::CPU, &bitcpm_cpu::ternary_linear_isa);
}

// A plain Python module: importing it loads the library, which runs the registrations above.
static struct PyModuleDef bitcpm_cpu_module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                               "bitcpm CPU kernels (registered with torch.library)", -1, nullptr};
PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&bitcpm_cpu_module); }
