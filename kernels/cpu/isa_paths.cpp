// Run-time choice of the ternary_linear path (declarations and the order of paths: isa_paths.h).

#include "isa_paths.h"

#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace bitcpm_cpu {

Isa detect_isa(bool capped) {
  if (capped ? cpu_has_avx512bf16() : cpu_supports_avx512bf16()) return Isa::kAvx512Bf16;
  if (capped ? cpu_has_avx512() : cpu_supports_avx512()) return Isa::kAvx512;
  if (capped ? cpu_has_avx2() : cpu_supports_avx2()) return Isa::kAvx2;
  if (capped ? cpu_has_neon_dotprod() : cpu_supports_neon_dotprod()) return Isa::kNeonDotprod;
  if (capped ? cpu_has_neon() : cpu_supports_neon()) return Isa::kNeon;
  return Isa::kScalar;
}

Isa best_isa() {
  static const Isa isa = detect_isa(true);
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeonDotprod: return "neon-dotprod";
    case Isa::kNeon: return "neon";
    default: return "scalar";
  }
}

std::vector<Isa> runnable_isas() {
  static const std::vector<Isa> paths = [] {
    const std::vector<Isa> ladder = BITCPM_X86     ? std::vector<Isa>{Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}
                                    : BITCPM_ARM64 ? std::vector<Isa>{Isa::kScalar, Isa::kNeon, Isa::kNeonDotprod}
                                                   : std::vector<Isa>{Isa::kScalar};
    std::vector<Isa> out;
    for (Isa isa : ladder) {
      out.push_back(isa);
      if (isa == best_isa()) break;
    }
    return out;
  }();
  return paths;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kNeon, Isa::kNeonDotprod}) {
    if (name != isa_name(isa)) continue;
    const std::vector<Isa> ok = runnable_isas();
    TORCH_CHECK_VALUE(std::find(ok.begin(), ok.end(), isa) != ok.end(), "bitcpm_cpu: isa '", name,
                      "' is not supported by this CPU (best: ", isa_name(best_isa()), ")");
    return isa;
  }
  TORCH_CHECK_VALUE(false, "bitcpm_cpu: unknown isa '", name,
                    "' (auto, scalar, avx2, avx512, avx512bf16, neon, neon-dotprod)");
  return Isa::kScalar;
}

std::string isa_label(Isa isa) {
  std::string s = isa_name(isa);
  if (!is_neon(isa) && isa >= Isa::kAvx512 && cpu_supports_vnni()) s += "+vnni";
  return s;
}

}  // namespace bitcpm_cpu
