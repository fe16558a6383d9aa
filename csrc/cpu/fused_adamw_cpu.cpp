// CPU backend of the fused guarded AdamW step: torch binding, chunking, threading, dispatch
// and the deterministic reduction. The arithmetic lives in adamw_kernel.h.
//
// Every tensor is cut into fixed-size chunks; each chunk writes its own telemetry partials,
// and the partials are summed per group in chunk order in double. So the telemetry depends
// neither on the number of threads nor on how at::parallel_for splits the chunks.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kernel_api.h"

namespace lbw_cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements; ~1.2 MB of p, g, m, v in fp32, fits L2

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

const Isa kDetected = detect_isa();
Isa g_isa = kDetected;  // lowered by set_isa() (tests compare ISAs bit for bit)

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

RangeFn select_kernel(DType p, DType g, bool write) {
  switch (g_isa) {
    case Isa::kAvx512: return avx512::select(p, g, write);
    case Isa::kAvx2: return avx2::select(p, g, write);
    default: return base::select(p, g, write);
  }
}

DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "lbw-guard cpu backend: ", what, " must be float32, bfloat16 or ",
                  "float16, got ", t.scalar_type());
  }
}

struct Chunk {
  int64_t tensor;
  int64_t offset;
  int64_t n;
};

at::Tensor fused_adamw_cpu(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                           std::vector<at::Tensor> exp_avgs,
                           std::vector<at::Tensor> exp_avg_sqs, at::Tensor coeffs,
                           std::vector<int64_t> group_ids, int64_t num_groups,
                           at::Tensor inv_grad_scale, at::Tensor clip_coef) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size() && group_ids.size() == params.size(),
              "lbw-guard cpu backend: params, grads, exp_avgs, exp_avg_sqs and group_ids must "
              "have the same length");
  TORCH_CHECK(num_groups >= 0, "num_groups must be >= 0");
  TORCH_CHECK(coeffs.device().is_cpu() && coeffs.dim() == 2 && coeffs.size(0) == T &&
                  coeffs.size(1) == kNumCoeffs,
              "coeffs must be a CPU tensor of shape [", T, ", ", int(kNumCoeffs), "]");
  coeffs = coeffs.to(at::kFloat).contiguous();
  const float inv_scale = inv_grad_scale.item<float>();
  const float clip = clip_coef.item<float>();

  // Work on contiguous tensors; non-contiguous params/states get a copy that is written back.
  std::vector<at::Tensor> p(T), g(T), m(T), v(T);
  std::vector<DType> pdt(T), gdt(T);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& pi = params[i];
    TORCH_CHECK(pi.device().is_cpu() && grads[i].device().is_cpu() &&
                    exp_avgs[i].device().is_cpu() && exp_avg_sqs[i].device().is_cpu(),
                "lbw-guard cpu backend: tensor ", i, " is not on the CPU");
    TORCH_CHECK(grads[i].numel() == pi.numel() && exp_avgs[i].numel() == pi.numel() &&
                    exp_avg_sqs[i].numel() == pi.numel(),
                "lbw-guard cpu backend: tensor ", i, ": param, grad and states differ in size");
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat &&
                    exp_avg_sqs[i].scalar_type() == at::kFloat,
                "lbw-guard cpu backend: optimizer states must be float32");
    TORCH_CHECK(group_ids[i] >= 0 && group_ids[i] < num_groups, "group id ", group_ids[i],
                " out of range [0, ", num_groups, ")");
    pdt[i] = to_dtype(pi, "params");
    gdt[i] = to_dtype(grads[i], "grads");
    p[i] = pi.detach().contiguous();
    g[i] = grads[i].contiguous();
    m[i] = exp_avgs[i].contiguous();
    v[i] = exp_avg_sqs[i].contiguous();
    for (int64_t off = 0; off < pi.numel(); off += kChunk)
      chunks.push_back({i, off, std::min(kChunk, pi.numel() - off)});
  }

  const auto* ctab = coeffs.data_ptr<float>();
  std::vector<Partials> partials(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t i = ch.tensor;
      const float* row = ctab + i * kNumCoeffs;
      const RangeFn fn = select_kernel(pdt[i], gdt[i], row[kGate] != 0.0f);
      const int64_t pbytes = p[i].element_size(), gbytes = g[i].element_size();
      RangeArgs a{static_cast<char*>(p[i].data_ptr()) + ch.offset * pbytes,
                  static_cast<const char*>(g[i].const_data_ptr()) + ch.offset * gbytes,
                  m[i].data_ptr<float>() + ch.offset,
                  v[i].data_ptr<float>() + ch.offset,
                  ch.n,
                  row,
                  inv_scale,
                  clip};
      fn(a, partials[c]);
    }
  });

  // Fixed-order reduction: chunk by chunk, sums in double, counts exact in int64.
  std::vector<double> sums(num_groups * 4, 0.0);
  std::vector<int64_t> counts(num_groups * 2, 0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t gid = group_ids[chunks[c].tensor];
    for (int k = 0; k < 4; ++k) sums[gid * 4 + k] += partials[c].sums[k];
    counts[gid * 2] += partials[c].outliers;
    counts[gid * 2 + 1] += partials[c].nonfinite;
  }
  at::Tensor out = at::empty({num_groups, 6}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (int64_t gi = 0; gi < num_groups; ++gi) {
    for (int k = 0; k < 4; ++k) o[gi * 6 + k] = sums[gi * 4 + k];
    o[gi * 6 + 4] = static_cast<double>(counts[gi * 2]);
    o[gi * 6 + 5] = static_cast<double>(counts[gi * 2 + 1]);
  }

  for (int64_t i = 0; i < T; ++i) {  // write back the copies made for non-contiguous tensors
    if (!params[i].is_contiguous()) params[i].detach().copy_(p[i]);
    if (!exp_avgs[i].is_contiguous()) exp_avgs[i].copy_(m[i]);
    if (!exp_avg_sqs[i].is_contiguous()) exp_avg_sqs[i].copy_(v[i]);
  }
  return out;
}

std::string get_isa() { return isa_name(g_isa); }

// Use a narrower instruction set than detected ("base", "avx2", "avx512"); returns the one
// now in use. Results are bit-identical across ISAs; this exists to test exactly that.
std::string set_isa(const std::string& name) {
  Isa want = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kBase;
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "base", "unknown isa ", name);
  g_isa = static_cast<int>(want) <= static_cast<int>(kDetected) ? want : kDetected;
  return isa_name(g_isa);
}

}  // namespace
}  // namespace lbw_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lbw-guard fused guarded AdamW step, CPU C++ backend";
  m.def("fused_adamw", &lbw_cpu::fused_adamw_cpu, "Fused guarded AdamW step (see contract.py)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("coeffs"), py::arg("group_ids"), py::arg("num_groups"),
        py::arg("inv_grad_scale"), py::arg("clip_coef"));
  m.def("isa", &lbw_cpu::get_isa, "Instruction set in use");
  m.def("set_isa", &lbw_cpu::set_isa, py::arg("name"),
        "Use a narrower instruction set than detected (for tests)");
}
