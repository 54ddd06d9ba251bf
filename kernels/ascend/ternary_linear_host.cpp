// Host side of the AscendC ternary kernel: checks operands, computes the tiling, launches, and
// registers the kernel for the PrivateUse1 (NPU) dispatch key of bitcpm::ternary_linear.
//
// NOT COMPILED OR RUN BY THIS PROJECT YET (no CANN here). The tiling mirrors
// vllm_bitcpm/ops/ascend_tiling.py::make_tiling, which is tested on CPU.
//
// The op's schema is defined in Python (vllm_bitcpm/ops/__init__.py) before this library is
// imported by vllm_bitcpm/ops/npu.py; TORCH_LIBRARY_IMPL only adds the NPU kernel.

#include <torch/extension.h>
#include <torch/library.h>

#include "acl/acl.h"
#include "aclrtlaunch_bitcpm_ternary_linear_bf16.h"
#include "aclrtlaunch_bitcpm_ternary_linear_fp16.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"

namespace {

constexpr int64_t kBlockWeights = 128;
constexpr int64_t kBlockBytes = 32;
constexpr int64_t kQuarter = 32;

struct TernaryTilingData {  // same field order as the kernel's
    uint32_t m, n, k, groupSize, numGroups, rowBytes;
    uint32_t tileN, tileM, chunkBlocks, totalTiles;
};

TernaryTilingData ComputeTiling(int64_t m, int64_t n, int64_t k, int64_t groupSize, int64_t coreNum)
{
    TernaryTilingData t{};
    t.m = m;
    t.n = n;
    t.k = k;
    t.groupSize = std::min(groupSize, k);
    t.numGroups = (k + groupSize - 1) / groupSize;
    t.rowBytes = (k + kBlockWeights - 1) / kBlockWeights * kBlockBytes;
    t.tileN = 16;
    t.tileM = 8;
    t.chunkBlocks = 8;
    t.totalTiles = (n + t.tileN - 1) / t.tileN;
    return t;
}

int64_t VectorCoreNum()
{
    // Vector cores of the current device; fall back to a safe count if the query fails.
    int32_t device = 0;
    int64_t cores = 0;
    if (aclrtGetDevice(&device) == ACL_SUCCESS &&
        aclGetDeviceCapability(device, ACL_DEVICE_INFO_VECTOR_CORE_NUM, &cores) == ACL_SUCCESS &&
        cores > 0) {
        return cores;
    }
    return 8;
}

// Same math as vllm_bitcpm/ops/reference.py, in ATen: the path for what the kernel does not
// take (float32 activations, group sizes that are not multiples of 32).
at::Tensor ReferenceLinear(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                           int64_t groupSize, const c10::optional<at::Tensor> &bias)
{
    const int64_t k = x.size(-1);
    const int64_t n = codes.size(0);
    auto blocks = codes.view({n, -1, 1, kBlockBytes});
    auto shifts = at::tensor({0, 2, 4, 6}, codes.options()).view({1, 1, 4, 1});
    auto trits = at::bitwise_and(at::bitwise_right_shift(blocks, shifts), 3)
                     .reshape({n, -1})
                     .narrow(1, 0, k)
                     .to(x.scalar_type())
                     .sub(1);
    auto full = scales.to(x.scalar_type()).repeat_interleave(groupSize, 1).narrow(1, 0, k);
    return at::linear(x, trits.mul(full), bias);
}

at::Tensor TernaryLinearNpu(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                            int64_t groupSize, const c10::optional<at::Tensor> &bias,
                            bool int8Activations)
{
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2,
                "ternary_linear (npu): codes must be 2-D uint8");
    const int64_t k = x.size(-1);
    const int64_t n = codes.size(0);
    TORCH_CHECK(codes.size(1) == (k + kBlockWeights - 1) / kBlockWeights * kBlockBytes,
                "ternary_linear (npu): codes have ", codes.size(1), " bytes per row, K=", k,
                " needs ceil(K/128)*32");
    TORCH_CHECK(groupSize > 0 && scales.size(0) == n &&
                    scales.size(1) == (k + groupSize - 1) / groupSize,
                "ternary_linear (npu): scales must be (N, ceil(K/group_size))");
    if (int8Activations) {
        // Per-token absmax int8 (reference.quantize_activations_int8); q is exact in fp16/bf16.
        auto xf = x.to(at::kFloat);
        auto absmax = xf.abs().amax(-1, true);
        auto inv = at::where(absmax > 0, 127.0 / absmax, at::ones_like(absmax));
        auto q = at::round(xf * inv).clamp(-127, 127).to(x.scalar_type());
        auto y = TernaryLinearNpu(q, codes, scales, groupSize, c10::nullopt, false).to(at::kFloat) / inv;
        if (bias.has_value()) {
            y = y + bias->to(at::kFloat);
        }
        return y.to(x.scalar_type());
    }
    const bool kernelDtype = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
    const bool kernelGroups = groupSize >= k || groupSize % kQuarter == 0;
    if (!kernelDtype || !kernelGroups || scales.scalar_type() != x.scalar_type()) {
        if (kernelDtype && kernelGroups) {
            return TernaryLinearNpu(x, codes, scales.to(x.scalar_type()), groupSize, bias, false);
        }
        return ReferenceLinear(x, codes, scales, groupSize, bias);
    }
    auto x2d = x.reshape({-1, k}).contiguous();
    const int64_t m = x2d.size(0);
    auto y = at::empty({m, n}, x.options());
    TernaryTilingData tiling = ComputeTiling(m, n, k, groupSize, VectorCoreNum());
    const uint32_t blockDim = static_cast<uint32_t>(
        std::max<int64_t>(1, std::min<int64_t>(VectorCoreNum(), tiling.totalTiles)));
    auto tilingCpu = at::from_blob(&tiling, {static_cast<int64_t>(sizeof(tiling))}, at::kByte);
    auto tilingDev = tilingCpu.to(x.device());
    auto codesC = codes.contiguous();
    auto scalesC = scales.contiguous();
    auto stream = c10_npu::getCurrentNPUStream().stream(false);
    if (x.scalar_type() == at::kHalf) {
        ACLRT_LAUNCH_KERNEL(bitcpm_ternary_linear_fp16)
        (blockDim, stream, x2d.data_ptr(), codesC.data_ptr(), scalesC.data_ptr(), y.data_ptr(),
         tilingDev.data_ptr());
    } else {
        ACLRT_LAUNCH_KERNEL(bitcpm_ternary_linear_bf16)
        (blockDim, stream, x2d.data_ptr(), codesC.data_ptr(), scalesC.data_ptr(), y.data_ptr(),
         tilingDev.data_ptr());
    }
    if (bias.has_value()) {
        y.add_(bias->to(y.scalar_type()));
    }
    auto outShape = x.sizes().vec();
    outShape.back() = n;
    return y.view(outShape);
}

}  // namespace

TORCH_LIBRARY_IMPL(bitcpm, PrivateUse1, m)
{
    m.impl("ternary_linear", &TernaryLinearNpu);
}

// Importable as vllm_bitcpm._ascend_kernels (loading it runs the registration above).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module)
{
    module.doc() = "bitcpm AscendC ternary kernel (registers bitcpm::ternary_linear for NPU)";
}
