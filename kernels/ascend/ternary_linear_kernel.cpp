// bitcpm::ternary_linear on Ascend vector cores (AscendC): y = x @ dequant(codes, scales).T
//
// NOT COMPILED OR RUN BY THIS PROJECT YET: no CANN / NPU was available. The tiling and index
// arithmetic below is modelled line for line in vllm_bitcpm/ops/ascend_tiling.py and tested on
// CPU against the reference op (tests/test_ascend_tiling.py); names match.
//
// Reads packed layout v1 directly (vllm_bitcpm/ternary.py): codes uint8 (N, ceil(K/128)*32),
// byte j of a 32-byte block holds elements j, j+32, j+64, j+96 at bits 0/2/4/6 as t+1;
// scales (N, G), column k uses scales[:, k / group_size]; group_size is a multiple of 32 or K.
//
// Work split: N in tiles of tileN rows, contiguous balanced runs of tiles per core; each tile
// walks K in chunks of chunkBlocks 128-weight blocks and tokens in tiles of tileM.
// Unpack of a block, per quarter q (32 elements): the 32 bytes are read as 16 uint16 lanes,
// (lane >> 2q) & 0x0303 leaves field q of both bytes in place, the result read back as uint8,
// cast to float, minus 1, times the quarter's scale. A quarter lies inside one scale group.

#include "kernel_operator.h"

using namespace AscendC;

namespace {

constexpr int32_t kBlockWeights = 128;
constexpr int32_t kBlockBytes = 32;
constexpr int32_t kQuarter = 32;
constexpr int32_t kBufferNum = 1;

struct TernaryTilingData {
    uint32_t m, n, k, groupSize, numGroups, rowBytes;
    uint32_t tileN, tileM, chunkBlocks, totalTiles;
};

__aicore__ inline uint32_t MinU(uint32_t a, uint32_t b) { return a < b ? a : b; }

template <typename T>
class TernaryLinearKernel {
public:
    __aicore__ inline TernaryLinearKernel() {}

    __aicore__ inline void Init(GM_ADDR x, GM_ADDR codes, GM_ADDR scales, GM_ADDR y,
                                const TernaryTilingData &t)
    {
        t_ = t;
        xGm_.SetGlobalBuffer((__gm__ T *)x, t.m * t.k);
        codesGm_.SetGlobalBuffer((__gm__ uint8_t *)codes, t.n * t.rowBytes);
        scalesGm_.SetGlobalBuffer((__gm__ T *)scales, t.n * t.numGroups);
        yGm_.SetGlobalBuffer((__gm__ T *)y, t.m * t.n);
        chunkWeights_ = t.chunkBlocks * kBlockWeights;
        chunkBytes_ = t.chunkBlocks * kBlockBytes;
        pipe_.InitBuffer(codesQ_, kBufferNum, t.tileN * chunkBytes_);
        pipe_.InitBuffer(xQ_, kBufferNum, t.tileM * chunkWeights_ * sizeof(T));
        pipe_.InitBuffer(yQ_, kBufferNum, t.tileM * t.tileN * sizeof(T));
        pipe_.InitBuffer(wBuf_, t.tileN * chunkWeights_ * sizeof(float));   // dequantized tile
        pipe_.InitBuffer(xfBuf_, t.tileM * chunkWeights_ * sizeof(float));  // x chunk in fp32
        pipe_.InitBuffer(laneBuf_, kBlockBytes);                            // one quarter's fields
        pipe_.InitBuffer(maskBuf_, kBlockBytes);
        pipe_.InitBuffer(prodBuf_, chunkWeights_ * sizeof(float));
        pipe_.InitBuffer(workBuf_, chunkWeights_ * sizeof(float));
        pipe_.InitBuffer(sumBuf_, 8 * sizeof(float));
        pipe_.InitBuffer(accBuf_, t.tileM * t.tileN * sizeof(float));
        LocalTensor<uint16_t> mask = maskBuf_.Get<uint16_t>();
        Duplicate(mask, (uint16_t)0x0303, kBlockBytes / 2);
    }

    __aicore__ inline void Process()
    {
        // CoreTiles: contiguous balanced run of row tiles for this core.
        uint32_t core = GetBlockIdx();
        uint32_t cores = GetBlockNum();
        uint32_t base = t_.totalTiles / cores;
        uint32_t extra = t_.totalTiles % cores;
        uint32_t first = core * base + MinU(core, extra);
        uint32_t count = base + (core < extra ? 1 : 0);
        for (uint32_t tile = first; tile < first + count; ++tile) {
            uint32_t row0 = tile * t_.tileN;
            uint32_t rows = MinU(t_.tileN, t_.n - row0);
            for (uint32_t m0 = 0; m0 < t_.m; m0 += t_.tileM) {
                ProcessTile(row0, rows, m0, MinU(t_.tileM, t_.m - m0));
            }
        }
    }

private:
    __aicore__ inline void ProcessTile(uint32_t row0, uint32_t rows, uint32_t m0, uint32_t mt)
    {
        LocalTensor<float> acc = accBuf_.Get<float>();
        Duplicate(acc, 0.0f, t_.tileM * t_.tileN);
        for (uint32_t byte0 = 0; byte0 < t_.rowBytes; byte0 += chunkBytes_) {
            uint32_t nbytes = MinU(chunkBytes_, t_.rowBytes - byte0);
            uint32_t k0 = (byte0 / kBlockBytes) * kBlockWeights;
            uint32_t kValid = MinU(nbytes / kBlockBytes * kBlockWeights, t_.k - k0);
            CopyInCodes(row0, rows, byte0, nbytes);
            CopyInX(m0, mt, k0, kValid);
            Dequantize(row0, rows, k0, nbytes);
            Accumulate(rows, mt, kValid, acc);
        }
        CopyOutY(row0, rows, m0, mt, acc);
    }

    __aicore__ inline void CopyInCodes(uint32_t row0, uint32_t rows, uint32_t byte0, uint32_t nbytes)
    {
        LocalTensor<uint8_t> c = codesQ_.AllocTensor<uint8_t>();
        for (uint32_t r = 0; r < rows; ++r) {  // one DMA per row: nbytes is a multiple of 32
            DataCopy(c[r * chunkBytes_], codesGm_[(row0 + r) * t_.rowBytes + byte0], nbytes);
        }
        codesQ_.EnQue(c);
    }

    __aicore__ inline void CopyInX(uint32_t m0, uint32_t mt, uint32_t k0, uint32_t kValid)
    {
        LocalTensor<T> xl = xQ_.AllocTensor<T>();
        Duplicate(xl, (T)0, t_.tileM * chunkWeights_);  // zero past K: padding codes stay inert
        DataCopyExtParams params{1, static_cast<uint32_t>(kValid * sizeof(T)), 0, 0, 0};
        DataCopyPadExtParams<T> pad{false, 0, 0, (T)0};
        for (uint32_t i = 0; i < mt; ++i) {  // K need not be 32-byte aligned: padded copy
            DataCopyPad(xl[i * chunkWeights_], xGm_[(m0 + i) * t_.k + k0], params, pad);
        }
        xQ_.EnQue(xl);
    }

    // UnpackBlock + scale: codes of `rows` rows -> fp32 weights (rows, chunkWeights_).
    __aicore__ inline void Dequantize(uint32_t row0, uint32_t rows, uint32_t k0, uint32_t nbytes)
    {
        LocalTensor<uint8_t> c = codesQ_.DeQue<uint8_t>();
        LocalTensor<float> w = wBuf_.Get<float>();
        LocalTensor<uint16_t> lanes = laneBuf_.Get<uint16_t>();
        LocalTensor<uint16_t> mask = maskBuf_.Get<uint16_t>();
        uint32_t blocks = nbytes / kBlockBytes;
        Duplicate(w, 0.0f, t_.tileN * chunkWeights_);
        for (uint32_t r = 0; r < rows; ++r) {
            for (uint32_t b = 0; b < blocks; ++b) {
                uint32_t blockK0 = k0 + b * kBlockWeights;
                LocalTensor<uint16_t> src = c[r * chunkBytes_ + b * kBlockBytes].template ReinterpretCast<uint16_t>();
                for (uint32_t q = 0; q < 4; ++q) {
                    uint32_t qk0 = blockK0 + kQuarter * q;
                    if (qk0 >= t_.k) {
                        break;  // padding quarter: its scale index may be past the last group
                    }
                    // quarter_scale_index
                    float s = ToFloat(scalesGm_.GetValue((row0 + r) * t_.numGroups + qk0 / t_.groupSize));
                    ShiftRight(lanes, src, (uint16_t)(2 * q), kBlockBytes / 2);
                    PipeBarrier<PIPE_V>();
                    And(lanes, lanes, mask, kBlockBytes / 2);
                    PipeBarrier<PIPE_V>();
                    LocalTensor<float> dst = w[r * chunkWeights_ + b * kBlockWeights + q * kQuarter];
                    LocalTensor<half> h = prodBuf_.Get<half>();
                    Cast(h, lanes.template ReinterpretCast<uint8_t>(), RoundMode::CAST_NONE, kQuarter);
                    PipeBarrier<PIPE_V>();
                    Cast(dst, h, RoundMode::CAST_NONE, kQuarter);
                    PipeBarrier<PIPE_V>();
                    Adds(dst, dst, -1.0f, kQuarter);
                    PipeBarrier<PIPE_V>();
                    Muls(dst, dst, s, kQuarter);
                    PipeBarrier<PIPE_V>();
                }
            }
        }
        codesQ_.FreeTensor(c);
    }

    __aicore__ inline void Accumulate(uint32_t rows, uint32_t mt, uint32_t kValid, LocalTensor<float> &acc)
    {
        LocalTensor<T> xl = xQ_.DeQue<T>();
        LocalTensor<float> xf = xfBuf_.Get<float>();
        LocalTensor<float> w = wBuf_.Get<float>();
        LocalTensor<float> prod = prodBuf_.Get<float>();
        LocalTensor<float> work = workBuf_.Get<float>();
        LocalTensor<float> sum = sumBuf_.Get<float>();
        uint32_t len = (kValid + 7) / 8 * 8;  // whole 32-byte repeats; zeros past K
        Cast(xf, xl, RoundMode::CAST_NONE, mt * chunkWeights_);
        PipeBarrier<PIPE_V>();
        for (uint32_t i = 0; i < mt; ++i) {
            for (uint32_t r = 0; r < rows; ++r) {
                Mul(prod, xf[i * chunkWeights_], w[r * chunkWeights_], len);
                PipeBarrier<PIPE_V>();
                ReduceSum(sum, prod, work, len);
                PipeBarrier<PIPE_V>();
                uint32_t idx = i * t_.tileN + r;
                acc.SetValue(idx, acc.GetValue(idx) + sum.GetValue(0));
            }
        }
        xQ_.FreeTensor(xl);
    }

    __aicore__ inline void CopyOutY(uint32_t row0, uint32_t rows, uint32_t m0, uint32_t mt,
                                    LocalTensor<float> &acc)
    {
        LocalTensor<T> yl = yQ_.AllocTensor<T>();
        Cast(yl, acc, RoundMode::CAST_RINT, t_.tileM * t_.tileN);
        yQ_.EnQue(yl);
        yl = yQ_.DeQue<T>();
        DataCopyExtParams params{1, static_cast<uint32_t>(rows * sizeof(T)), 0, 0, 0};
        for (uint32_t i = 0; i < mt; ++i) {
            DataCopyPad(yGm_[(m0 + i) * t_.n + row0], yl[i * t_.tileN], params);
        }
        yQ_.FreeTensor(yl);
    }

    __aicore__ inline float ToFloat(T v) { return static_cast<float>(v); }

    TernaryTilingData t_;
    uint32_t chunkWeights_ = 0;
    uint32_t chunkBytes_ = 0;
    TPipe pipe_;
    GlobalTensor<T> xGm_, scalesGm_, yGm_;
    GlobalTensor<uint8_t> codesGm_;
    TQue<QuePosition::VECIN, kBufferNum> codesQ_, xQ_;
    TQue<QuePosition::VECOUT, kBufferNum> yQ_;
    TBuf<TPosition::VECCALC> wBuf_, xfBuf_, laneBuf_, maskBuf_, prodBuf_, workBuf_, sumBuf_, accBuf_;
};

}  // namespace

// Entry points, one per activation dtype; launched by ternary_linear_host.cpp with
// ACLRT_LAUNCH_KERNEL. `tiling` points to a TernaryTilingData in device memory.
#define BITCPM_TERNARY_ENTRY(NAME, T)                                                          \
    extern "C" __global__ __aicore__ void NAME(GM_ADDR x, GM_ADDR codes, GM_ADDR scales,       \
                                               GM_ADDR y, GM_ADDR tiling)                      \
    {                                                                                          \
        TernaryTilingData t;                                                                   \
        __gm__ uint32_t *src = (__gm__ uint32_t *)tiling;                                      \
        uint32_t *dst = reinterpret_cast<uint32_t *>(&t);                                      \
        for (uint32_t i = 0; i < sizeof(TernaryTilingData) / sizeof(uint32_t); ++i) {          \
            dst[i] = src[i];                                                                   \
        }                                                                                      \
        TernaryLinearKernel<T> op;                                                             \
        op.Init(x, codes, scales, y, t);                                                       \
        op.Process();                                                                          \
    }

BITCPM_TERNARY_ENTRY(bitcpm_ternary_linear_fp16, half)
BITCPM_TERNARY_ENTRY(bitcpm_ternary_linear_bf16, bfloat16_t)
